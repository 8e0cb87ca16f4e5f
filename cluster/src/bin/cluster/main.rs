//! `cluster`: runs a program as supervised workers behind this crate's primary: Node
//! programs (spoken to in Node's own cluster protocol, so an unmodified
//! `http.createServer().listen()` becomes a worker) and Rust programs built on `cluster`
//! alike. See `cluster --help` and the README's `cluster` section.
//!
//! ```text
//! cluster [OPTIONS] -- app.js [ARGS...]
//! cluster [OPTIONS] -- node [NODE_FLAGS] app.js [ARGS...]
//! cluster [OPTIONS] -- PROGRAM [ARGS...]
//! ```
//!
//! Signals: TERM/INT graceful stop, HUP rolling reload, TTIN/TTOU one worker more/less,
//! USR1 reopens the `--log-file` (after logrotate renamed it; ignored without one).
//! Each worker output line is printed as `NAME ID | line` (NAME defaults to `worker`);
//! `listening on ADDRESS` is printed once per address, when its first worker listens.
//! Output goes through bounded queues written by threads of their own (`output.rs`), so
//! a stalled stdout or stderr never blocks the primary; with `--log-file` all of it goes
//! to that file instead (`logfile.rs`), the error that ends the command also to stderr.
//! Exits 1 with a message when PROGRAM cannot start, never connects, cannot listen, or
//! its workers keep failing (`watch.rs`).

mod control;
mod invocation;
mod limits;
mod logfile;
mod output;
mod watch;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cluster::{Policy, Primary, RestartPolicy, Settings};
use nix::sys::signal::{SigSet, Signal};

use self::control::ControlCommand;
use self::invocation::Invocation;
use self::output::{Kind, Sink};
use self::watch::Watch;

/// How long a worker may take to connect to its channel before it is reported (a Node
/// worker reports online before its script runs, a Rust one at `Worker::connect`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const EXAMPLES: &str = "\
Examples:
  cluster -w 4 -- app.js 3000                         a Node script (.js, .mjs, .cjs)
  cluster -w 4 -- node --max-old-space-size=512 app.js 3000
                                                      node and its flags (execArgv)
  cluster --node-args '--enable-source-maps' -- app.js
  cluster -- ./server.js                              a script whose #! line runs node
  cluster -w 2 --policy shared -- ./target/release/my-server --port 8000
                                                      a program built on the cluster crate

Signals to the cluster process: TERM/INT stop gracefully (workers finish their
requests within --grace), HUP reloads (each worker replaced by a new one that listens
first), TTIN/TTOU add or remove a worker, USR1 reopens the --log-file (logrotate's
postrotate: systemctl kill -s USR1 --kill-whom=main my-app.service).";

/// Runs PROGRAM as N supervised workers: Node programs in Node's own cluster protocol,
/// programs built on the cluster crate in this crate's.
#[derive(Debug, Parser)]
#[command(
    name = "cluster",
    version,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Args {
    /// Talk to a running cluster instead of starting one.
    #[command(subcommand)]
    subcommand: Option<ControlCommand>,
    /// How many workers (default: one per CPU; at most 1024).
    #[arg(long, short = 'w')]
    workers: Option<usize>,
    /// How connections reach workers: rr (the primary hands them out), shared (one
    /// socket, every worker accepts) or reuseport (a socket per worker, the kernel
    /// balances).
    #[arg(long, default_value = "rr")]
    policy: Policy,
    /// How long a stopping worker may finish its requests before it is killed (seconds,
    /// or with a unit: 500ms, 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// On SIGTERM, turn not ready at once (/readyz answers 503, `cluster status` says
    /// stopping) and keep serving this long before the workers drain, so a balancer's
    /// health check stops sending first (Kubernetes' preStop sleep).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    stop_delay: Duration,
    /// Give a slot up after this many crashes within a minute (restarts back off from
    /// 100 ms, doubling up to 10 s); the command ends when every slot is given up.
    #[arg(long, default_value_t = 10)]
    max_restarts: u32,
    /// A worker that exits 0 or disconnects itself sooner than this after its start
    /// counts as a crash (PM2's min_uptime); later, it is replaced at once, uncounted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    min_uptime: Duration,
    /// How long a new worker may take to listen (and, with --wait-ready, to say it is
    /// ready) during a reload before the old worker is kept for its slot.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    listen_timeout: Duration,
    /// A Node worker counts as ready only once it calls process.send('ready') (PM2's
    /// wait_ready): a reload stops an old worker only after its replacement said so.
    #[arg(long)]
    wait_ready: bool,
    /// The cluster's name: the prefix of worker output lines (default `worker`) and the
    /// control socket's name (default: the program's file name without its extension,
    /// `app` for app.js).
    #[arg(long)]
    name: Option<String>,
    /// Where to create the control socket that `cluster status|reload|scale|stop` talk
    /// to (default: /run/cluster/NAME.sock for root, $XDG_RUNTIME_DIR/cluster/NAME.sock
    /// for others; mode 0600, the owner and root only).
    #[arg(long, value_name = "PATH", conflicts_with = "no_control")]
    control: Option<std::path::PathBuf>,
    /// Create no control socket.
    #[arg(long)]
    no_control: bool,
    /// Replace a worker (gracefully: its successor listens first) whose memory (RSS)
    /// stays above SIZE: 64M, 1.5G, 512K (PM2's max_memory_restart).
    #[arg(long, value_name = "SIZE", value_parser = control::parse_size)]
    max_memory_restart: Option<u64>,
    /// Keep N extra workers booted up to their listen(): a crashed worker's slot, a
    /// scale-up or a reload step gets one at once instead of waiting for a Node boot.
    #[arg(long, value_name = "N", default_value_t = 0)]
    warm_spares: usize,
    /// Write the workers' lines and the command's own messages to this file (appended,
    /// created with mode 0640) instead of stdout and stderr; SIGUSR1 reopens it after a
    /// rotation renamed it. The error that ends the command goes to stderr too.
    #[arg(long, value_name = "PATH")]
    log_file: Option<std::path::PathBuf>,
    /// The Node executable for .js/.mjs/.cjs programs.
    #[arg(long, default_value = "node")]
    node: std::ffi::OsString,
    /// Options for node, before the script (split like a shell would):
    /// --node-args '--max-old-space-size=512 --enable-source-maps'.
    #[arg(long, allow_hyphen_values = true)]
    node_args: Option<String>,
    /// Keep Node's own server.close() on a stop or reload, which drops idle keep-alive
    /// connections at once, instead of answering their next request with
    /// `Connection: close`.
    #[arg(long)]
    no_keepalive_drain: bool,
    /// Serve /metrics (Prometheus, OpenMetrics text), /status (an HTML page) and
    /// /readyz (a balancer's health check) over HTTP on this address: 127.0.0.1:9100
    /// (port 0: any free port; the command prints `metrics on http://ADDRESS`).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// How the primary's events are written on stderr: text lines, or json (one object
    /// per event, for programs that check them).
    #[arg(long, value_enum, default_value = "text")]
    log_format: watch::LogFormat,
    /// The program and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        value_name = "PROGRAM [ARGS]"
    )]
    command: Vec<std::ffi::OsString>,
}

/// What the primary logs without `RUST_LOG`: warnings, but not those of the core about
/// single workers, which the command prints itself from their events (`watch.rs`).
const DEFAULT_LOG: &str = "warn,cluster::primary::core::workers=error,\
                           cluster::primary::core::serving=error";

/// `500ms`, `30s`, `2m`, or a plain number of seconds (`1.5`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (500ms, 30s, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// The signals the primary acts on. They are blocked from the start of `main` until the
/// primary listens for them, so one sent while it starts (a SIGTERM 30 ms after the
/// command began) waits and is acted on instead of killing the process by default.
fn primary_signals() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGUSR2,
        Signal::SIGUSR1,
    ] {
        set.add(signal);
    }
    set
}

fn main() -> std::process::ExitCode {
    // Before any thread exists, so that every thread inherits the mask.
    let _ = primary_signals().thread_block();
    // The sinks and the log open no descriptor: the sockets passed by systemd or an
    // upgrade are taken below, before the runtime opens any (logged through the sink).
    let stdout = Sink::new(std::io::stdout(), "stdout");
    let stderr = Sink::new(std::io::stderr(), "stderr");
    let log = stderr.clone();
    tracing_subscriber::fmt()
        .with_writer(move || log.log_writer())
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .init();
    cluster::take_inherited_sockets();
    let mut args = Args::parse();
    if let Some(command) = args.subcommand.take() {
        // A client of a running cluster: no sink, no runtime, plain output.
        return match control::run(command) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::FAILURE,
            Err(e) => {
                eprintln!("cluster: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let code = match run(args, &stdout, &stderr) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            stderr.line_and_terminal(Kind::Log, &format!("cluster: {e:#}"));
            std::process::ExitCode::FAILURE
        }
    };
    // What is still queued gets a moment; a stream nobody reads does not hold the exit.
    stdout.finish(Duration::from_secs(1));
    stderr.finish(Duration::from_secs(1));
    code
}

fn run(args: Args, stdout: &Sink, stderr: &Sink) -> anyhow::Result<()> {
    if let Some(path) = &args.log_file {
        redirect_to_log_file(path, stdout, stderr)?;
    }
    let invocation = Invocation::parse(args.command, &args.node, args.node_args.as_deref())?;
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    limits::check(workers)?;
    let restart = RestartPolicy::new()
        .crash_loop_limit(args.max_restarts, Duration::from_secs(60))
        .min_uptime(args.min_uptime);
    let settings = Settings::new()
        .workers(workers)
        .connect_timeout(CONNECT_TIMEOUT)
        .policy(args.policy)
        .restart(restart)
        .silent(true)
        .drain_deadline(args.grace)
        .stop_delay(args.stop_delay)
        .warm_spares(args.warm_spares)
        .reload_timeout(args.listen_timeout)
        .wait_ready(args.wait_ready);
    let settings = match args.max_memory_restart {
        Some(bytes) => settings.max_worker_rss(bytes),
        None => settings,
    };
    let program = match &invocation {
        Invocation::Node { script, .. } => std::path::PathBuf::from(script),
        Invocation::Program { program, .. } => std::path::PathBuf::from(program),
    };
    let control = match args.no_control {
        true => None,
        false => Some(control::SocketPath::new(
            args.control.as_deref(),
            args.name.as_deref(),
            &program,
        )?),
    };
    let settings = match args.metrics {
        Some(address) => settings.metrics(address),
        None => settings,
    };
    let (settings, shown) = match invocation {
        Invocation::Node {
            node,
            node_args,
            script,
            args: script_args,
        } => {
            let shown = std::path::Path::new(&script).display().to_string();
            let settings = settings
                .program(script)
                .args(script_args)
                .node(node)
                .node_args(node_args)
                .node_keepalive_drain(!args.no_keepalive_drain);
            (settings, shown)
        }
        Invocation::Program { program, args } => {
            let shown = std::path::Path::new(&program).display().to_string();
            (settings.program(program).args(args), shown)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    // Installed now, acted on once `supervise` unblocks the primary's signals.
    let usr1 = {
        let _runtime = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
    };
    runtime.spawn(reopen_on_signal(
        usr1.context("handling SIGUSR1")?,
        stderr.clone(),
    ));
    let prefix = args.name.unwrap_or_else(|| "worker".to_owned());
    let watch = Watch::new(prefix, shown, workers, stdout.clone(), stderr.clone())
        .log_format(args.log_format);
    runtime.block_on(supervise(settings, control, watch, [stdout, stderr]))
}

/// Starts the primary, with its control socket at `control`'s first path, or at its
/// fallback when another cluster of the same default name answers there.
async fn start(
    settings: Settings,
    control: Option<control::SocketPath>,
) -> Result<Primary, cluster::Error> {
    let Some(control) = control else {
        return Primary::start(settings).await;
    };
    let first = Primary::start(settings.clone().control_socket(control.first())).await;
    match (first, control.fallback()) {
        (Err(cluster::Error::ControlInUse { .. }), Some(fallback)) => {
            Primary::start(settings.control_socket(fallback)).await
        }
        (first, _) => first,
    }
}

async fn supervise(
    settings: Settings,
    control: Option<control::SocketPath>,
    mut watch: Watch,
    sinks: [&Sink; 2],
) -> anyhow::Result<()> {
    let shown = watch.program().to_owned();
    let mut primary = start(settings, control)
        .await
        .with_context(|| format!("cannot start {shown}"))?;
    // The metrics endpoint: where it is, and the lines the sinks drop, which it serves.
    if let Some(address) = primary.metrics_address() {
        sinks[0].line(Kind::Log, &format!("metrics on http://{address}"));
    }
    for sink in sinks {
        sink.count_drops(primary.dropped_output_lines());
    }
    let mut events = primary.take_events().context("events already taken")?;
    let primary = primary;
    let (result, fatal) = {
        let watching = watch.until_fatal(&mut events);
        let running = primary.run_until_signal();
        tokio::pin!(watching, running);
        tokio::select! {
            biased;
            result = &mut running => (result, None),
            // Polled only after run_until_signal's first poll has installed its signal
            // handlers: a signal held back by the mask since the start is delivered now.
            fatal = async {
                let _ = primary_signals().thread_unblock();
                (&mut watching).await
            } => match fatal {
                Some(fatal) => (Ok(()), Some(fatal)),
                // The events end when the cluster has stopped; a stop during an upgrade
                // returns once the new primary is gone too.
                None => (running.await, None),
            },
        }
    };
    if fatal.is_some() {
        // Nothing is served (no listener, no channel, or a crash loop): the workers are
        // asked with SIGTERM rather than left the whole grace to notice the disconnect.
        for worker in primary.stats().await.map(|s| s.workers).unwrap_or_default() {
            let _ = primary.kill(worker.id, cluster::Signal::SIGTERM).await;
        }
        primary.stop().await.context("stopping the workers")?;
    }
    drop(primary);
    while let Some(event) = events.recv().await {
        watch.show(&event);
    }
    result.context("running the workers")?;
    match fatal {
        Some(fatal) => Err(anyhow::anyhow!("{shown}: {}", watch.explain(fatal))),
        None => Ok(()),
    }
}

/// Sends every line `stdout` and `stderr` queue from now on to the log file at `path`
/// instead, through one sink of its own (so the file has them in the order they were
/// queued).
fn redirect_to_log_file(
    path: &std::path::Path,
    stdout: &Sink,
    stderr: &Sink,
) -> anyhow::Result<()> {
    let file = Sink::log_file(path, stderr)
        .with_context(|| format!("cannot open the log file {}", path.display()))?;
    stdout.redirect(&file);
    stderr.redirect(&file);
    Ok(())
}

/// Reopens the log file on every SIGUSR1 (`signal`); without a log file, says the signal
/// is ignored. Only asks the writer thread (see [`Sink::reopen`]): never blocks the loop.
async fn reopen_on_signal(mut signal: tokio::signal::unix::Signal, sink: Sink) {
    while signal.recv().await.is_some() {
        if !sink.reopen() {
            sink.line(
                Kind::Log,
                "cluster: SIGUSR1 ignored: there is no --log-file to reopen",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags_before_the_program_are_checked_and_the_program_keeps_its_own() {
        let parse = |line: &str| Args::try_parse_from(line.split_whitespace());
        let error = parse("cluster --frobnicate -- app.js").expect_err("unknown flag");
        assert_eq!(error.kind(), clap::error::ErrorKind::UnknownArgument);
        let args =
            parse("cluster -w 2 -- node --max-old-space-size=64 app.js --port 1").expect("parsed");
        assert_eq!(
            args.command,
            ["node", "--max-old-space-size=64", "app.js", "--port", "1"]
        );
        let args = parse("cluster app.js --port 1").expect("without --");
        assert_eq!(args.command, ["app.js", "--port", "1"]);
        let args = parse("cluster --node-args --inspect -- app.js").expect("node args");
        assert_eq!(args.node_args.as_deref(), Some("--inspect"));
    }
}
