//! `httpd-demo`: a cluster HTTP server. The primary is a small supervisor; the workers are
//! this same binary, started by it, serving HTTP/1.1 with hyper.
//!
//! ```text
//! httpd-demo [--workers N] [--host ADDR] [--port PORT] [--policy rr|shared|reuseport]
//!            [--grace SECONDS] [--reload-timeout SECONDS] [--allow-crash] [--control PATH]
//!            [--metrics ADDR] [--stop-delay SECONDS]
//!            [--log-format text|json]
//! ```
//!
//! Signals on the primary: SIGTERM/SIGINT graceful stop, SIGHUP rolling reload (workers
//! start from the binary on disk now), SIGTTIN/SIGTTOU one worker more/less, SIGUSR2
//! upgrade of the primary itself (a new primary from the binary on disk takes over the
//! listening sockets; this one drains and exits; a SIGTERM/SIGINT before the new one is
//! ready stops both). Under systemd it adopts socket-activated
//! listeners and notifies its state (see `systemd/` and the README). Once the first worker listens, the primary prints
//! `listening on http://ADDR` on standard output; logs go to standard error, among them
//! `cluster ready` / `cluster not ready` when the primary-level readiness changes.
//! Workers answer `GET /healthz` and `GET /readyz` (503 once their stop begins).

mod app;
mod event_log;
mod serve;

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use cluster::{Event, Policy, Primary, RestartPolicy, Settings, Worker};

use crate::event_log::LogFormat;
use crate::serve::{Accept, Drained};

/// Each connection allocates and frees a task, hyper's connection state and two 8 KiB
/// buffers; mimalloc's per-size free lists do it in about half the instructions glibc's
/// malloc takes (2.7k instead of 5.2k per connection, callgrind).
/// Workers start with [`LEAN_ALLOCATOR`] in their environment.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's documented option to commit its arenas' memory as it is used rather than
/// all at once: a worker's resident set stays where glibc's malloc left it (about 6 MB
/// instead of 13) at no measured cost per request. Options are read when the allocator
/// starts, before `main`, hence the environment of the workers the primary starts.
const LEAN_ALLOCATOR: (&str, &str) = ("MIMALLOC_ARENA_EAGER_COMMIT", "0");

#[derive(Debug, Clone, Parser)]
#[command(about = "A cluster HTTP server: one primary, N worker processes")]
struct Args {
    /// Number of worker processes, at least 1 (default: the number of CPUs).
    #[arg(long, value_parser = at_least_one_worker)]
    workers: Option<usize>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// How connections reach workers.
    #[arg(long, value_enum, default_value_t = PolicyArg::Rr)]
    policy: PolicyArg,
    /// Seconds a stopping worker may take to finish in-flight requests.
    #[arg(long, default_value_t = 10)]
    grace: u64,
    /// Seconds a reload waits for a new worker to listen before it keeps the old one.
    #[arg(long, default_value_t = 60)]
    reload_timeout: u64,
    /// Enable `GET /crash`, which makes the handling worker panic.
    #[arg(long)]
    allow_crash: bool,
    /// Create a control socket here (mode 0600): `cluster status --control PATH`,
    /// `cluster reload|scale|stop --control PATH` talk to it.
    #[arg(long, value_name = "PATH")]
    control: Option<std::path::PathBuf>,
    /// Serve the primary's /metrics (Prometheus), /status and /readyz on this address
    /// (127.0.0.1:9100; port 0 picks a free one). Off by default.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Seconds the primary keeps serving, not ready (/readyz 503), between a stop signal
    /// and the drain, for a balancer's health checks to notice.
    #[arg(long, default_value_t = 0)]
    stop_delay: u64,
    /// How the primary writes its events on standard error: `json` is one JSON object per
    /// event (fork, exit, ...) for programs that check them.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// `--workers`: a count of at least 1; a cluster with no worker would run with no
/// listener, serving nothing.
fn at_least_one_worker(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1 (with no worker nothing listens)".to_owned()),
        Ok(workers) => Ok(workers),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PolicyArg {
    /// Round-robin: the primary accepts and hands connections to workers.
    Rr,
    /// The workers accept on one shared socket.
    Shared,
    /// One SO_REUSEPORT socket per worker.
    Reuseport,
}

impl From<PolicyArg> for Policy {
    fn from(policy: PolicyArg) -> Self {
        match policy {
            PolicyArg::Rr => Policy::RoundRobin,
            PolicyArg::Shared => Policy::Shared,
            PolicyArg::Reuseport => Policy::ReusePort,
        }
    }
}

/// The primary runs with [`LEAN_ALLOCATOR`] too: with mimalloc's eager commit, a burst of
/// a thousand connections left its resident set 6 MB higher for good (11.7 MB to 17.9 MB,
/// measured; `cargo xtask chaos` reports it as drift), with the option it stays at about
/// 6 MB through any number of bursts. The option is read before `main`, so a process
/// started without it execs itself once with it, first thing: same pid, arguments and
/// descriptors (`LISTEN_FDS` sockets included). If the exec fails it runs on as it is.
fn lean_allocator() {
    if std::env::var_os(LEAN_ALLOCATOR.0).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut command = std::process::Command::new(exe);
    command
        .arg0(args.next().unwrap_or_default())
        .args(args)
        .env(LEAN_ALLOCATOR.0, LEAN_ALLOCATOR.1);
    let _ = command.exec();
}

fn main() -> anyhow::Result<()> {
    lean_allocator();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    // Before anything opens a descriptor: LISTEN_FDS may count more than were passed.
    cluster::take_inherited_sockets();
    let args = Args::parse();
    // One thread per process: the cluster gives parallelism, as nginx does.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if cluster::is_worker() {
        runtime.block_on(worker(args))
    } else {
        runtime.block_on(primary(args))
    }
}

async fn primary(args: Args) -> anyhow::Result<()> {
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let build = app::build_id();
    tracing::info!(pid = std::process::id(), workers, policy = ?args.policy, build, "primary running");
    let format = args.log_format;
    if format == LogFormat::Json {
        json_line(&event_log::primary_line("primary-start"));
    }
    let grace = Duration::from_secs(args.grace);
    let settings = Settings::new()
        .args(std::env::args_os().skip(1))
        .env(LEAN_ALLOCATOR.0, LEAN_ALLOCATOR.1)
        .workers(workers)
        .policy(args.policy.into())
        .restart(RestartPolicy::new())
        // Workers' output comes through the primary, each line prefixed with the worker's
        // id (as PM2 does), so interleaved logs still say who wrote them.
        .silent(true)
        // The primary's deadline is a little longer than the workers' own grace, so a
        // worker that drains in time is never killed.
        .drain_deadline(grace + Duration::from_secs(1))
        .reload_timeout(Duration::from_secs(args.reload_timeout))
        // A new primary (SIGUSR2) gets as long as a reload step to be ready.
        .upgrade_timeout(Duration::from_secs(args.reload_timeout))
        .stop_delay(Duration::from_secs(args.stop_delay));
    let settings = match args.metrics {
        Some(address) => settings.metrics(address),
        None => settings,
    };
    let settings = match &args.control {
        Some(path) => settings.control_socket(path),
        None => settings,
    };
    let mut primary = Primary::start(settings)
        .await
        .context("starting the cluster")?;
    if let Some(address) = primary.metrics_address() {
        tracing::info!("metrics on http://{address}");
    }
    let mut events = primary.take_events().context("events already taken")?;
    let primary = primary;
    let (result, fatal) = {
        let logging = log_events(&primary, &mut events, workers, format);
        let running = primary.run_until_signal();
        tokio::pin!(logging, running);
        tokio::select! {
            result = &mut running => (result, None),
            fatal = &mut logging => match fatal {
                Some(fatal) => (Ok(()), Some(fatal)),
                // The events end when the cluster has stopped; a stop during an upgrade
                // returns once the new primary is gone too.
                None => (running.await, None),
            },
        }
    };
    if fatal.is_some() {
        primary.stop().await.context("stopping the cluster")?;
    }
    drop(primary);
    // The last exits, after the stop.
    while let Some(event) = events.recv().await {
        show(&event, format);
    }
    if format == LogFormat::Json {
        json_line(&event_log::primary_line("primary-exit"));
    }
    result.context("running the cluster")?;
    if let Some(reason) = fatal {
        anyhow::bail!("cannot serve: {reason}");
    }
    tracing::info!("primary exiting");
    Ok(())
}

/// One line of a worker's output, on the primary's stream of the same kind.
fn print_worker_line(id: cluster::WorkerId, stream: cluster::OutputStream, line: &str) {
    let _ = match stream {
        cluster::OutputStream::Stdout => writeln!(std::io::stdout().lock(), "worker {id} | {line}"),
        _ => writeln!(std::io::stderr().lock(), "worker {id} | {line}"),
    };
}

/// One line of `--log-format json` on standard error.
fn json_line(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A worker's output line is printed with its id, any other event logged (as a JSON line
/// with `--log-format json`).
fn show(event: &Event, format: LogFormat) {
    match event {
        Event::Output { id, stream, line } => print_worker_line(*id, *stream, line),
        event => match format {
            LogFormat::Text => log_event(event),
            LogFormat::Json => {
                if let Some(line) = event_log::event_line(event) {
                    json_line(&line);
                }
            }
        },
    }
}

/// Shows every event, prints the address once the first worker listens, and logs each
/// change of the cluster's readiness (`cluster ready` / `cluster not ready`, from
/// [`cluster::Stats::ready`]: every slot's worker listening and no stop begun). Returns
/// why to give up, like nginx: a listen that retrying cannot fix, or every slot lost;
/// `None` once the events end.
async fn log_events(
    primary: &Primary,
    events: &mut cluster::Events,
    workers: usize,
    format: LogFormat,
) -> Option<String> {
    let mut announced = false;
    let mut ready = false;
    let mut failed_slots = 0;
    while let Some(event) = events.recv().await {
        if let Event::Listening { address, .. } = &event
            && !announced
        {
            announced = true;
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "listening on http://{address}");
            let _ = stdout.flush();
        }
        show(&event, format);
        if let Event::SlotFailed { cause, .. } = &event {
            failed_slots += 1;
            if matches!(cause, cluster::SlotFailure::Listen { .. }) {
                return Some(cause.to_string());
            }
            if failed_slots >= workers {
                return Some(format!("every worker keeps crashing ({cause})"));
            }
        }
        let changes_readiness = matches!(
            event,
            Event::Listening { .. }
                | Event::Disconnect { .. }
                | Event::Exit { .. }
                | Event::GoingDown { .. }
                | Event::SlotFailed { .. }
        );
        if !changes_readiness {
            continue;
        }
        let Ok(stats) = primary.stats().await else {
            continue;
        };
        if stats.ready != ready {
            ready = stats.ready;
            let workers = stats.workers.len();
            if ready {
                tracing::info!(workers, "cluster ready");
            } else {
                tracing::info!(workers, "cluster not ready");
            }
        }
    }
    None
}

fn log_event(event: &Event) {
    match event {
        Event::Fork { id, pid } => tracing::info!(%id, pid, "worker started"),
        Event::Online { id } => tracing::debug!(%id, "worker online"),
        Event::Listening { id, address, .. } => tracing::info!(%id, %address, "worker listening"),
        Event::Disconnect { id } => tracing::debug!(%id, "worker disconnected"),
        Event::Exit {
            id,
            status,
            exited_after_disconnect,
            cause,
        } => {
            tracing::info!(%id, %status, %cause, asked_to_stop = exited_after_disconnect, "worker exited")
        }
        Event::Message { id, .. } => tracing::debug!(%id, "message from worker"),
        Event::GoingDown { id, reason } => {
            tracing::warn!(%id, ?reason, "worker crashed, starting a replacement")
        }
        Event::Misbehaved { id, reason } => tracing::warn!(%id, ?reason, "worker misbehaved"),
        Event::SlotFailed { slot, id, cause } => {
            tracing::error!(slot, %id, %cause, "slot given up")
        }
        Event::ReloadFailed {
            slot,
            id,
            kept,
            reason,
        } => {
            let reason = match reason {
                cluster::ReloadFailure::CrashLoop => "its new workers keep crashing".to_owned(),
                cluster::ReloadFailure::NotListening { waited } => {
                    format!("its new worker was not listening after {waited:?}")
                }
                other => format!("{other:?}"),
            };
            tracing::error!(slot, new = ?id, %kept, reason, "reload failed for a slot; the old worker keeps serving")
        }
        other => tracing::debug!(?other, "cluster event"),
    }
}

/// Adapts the cluster listener to the serve loop.
struct ClusterListener(cluster::Listener);

impl Accept for ClusterListener {
    async fn accept(&mut self) -> Option<std::io::Result<tokio::net::TcpStream>> {
        self.0.accept().await.transpose()
    }

    /// Once the worker stops, `accept` yields the hand-offs it still holds, then `None`.
    async fn leftover(&mut self) -> Option<std::io::Result<tokio::net::TcpStream>> {
        self.0.accept().await.transpose()
    }
}

async fn worker(args: Args) -> anyhow::Result<()> {
    let worker = Worker::connect()
        .await
        .context("connecting to the primary")?;
    let id = worker.id();
    tracing::info!(%id, pid = std::process::id(), "worker running");
    let address = SocketAddr::new(args.host, args.port);
    let listener = match worker.listen(address).await {
        Ok(listener) => listener,
        Err(cluster::ListenError::Stopping { .. }) => {
            // Told to stop before it listened: nothing to serve or drain.
            tracing::info!(%id, "stopped before listening, exiting");
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("listening on {address}")),
    };
    let state = app::AppState::new(id.get(), args.allow_crash);
    let grace = Duration::from_secs(args.grace);
    let stopping = async {
        let reason = worker.stopping().await;
        tracing::info!(%id, ?reason, "worker stopping");
    };
    let drained = serve::serve(ClusterListener(listener), stopping, grace, state).await;
    match drained {
        Drained::Clean => tracing::info!(%id, "worker drained, exiting"),
        Drained::TimedOut => tracing::warn!(%id, "grace period over, dropping open connections"),
    }
    // A worker whose handler panicked exits non-zero, as Node's uncaughtException does.
    if worker.panicked() {
        std::process::exit(1);
    }
    Ok(())
}
