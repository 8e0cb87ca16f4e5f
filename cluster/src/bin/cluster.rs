//! `cluster`: runs a program as supervised workers behind this crate's primary, Node
//! programs (`.js`, `.mjs`, `.cjs`, run with `node`, spoken to in Node's own cluster
//! protocol, so an unmodified `http.createServer().listen()` becomes a worker) and Rust
//! programs built on `cluster` alike.
//!
//! ```text
//! cluster [--workers N] [--policy rr|shared] [--grace SECONDS] [--name NAME]
//!         [--max-restarts N] [--node PATH] [--no-keepalive-drain] -- PROGRAM [ARGS...]
//! ```
//!
//! Signals: TERM/INT graceful stop, HUP rolling reload, TTIN/TTOU one worker more/less.
//! Each worker output line is printed as `NAME ID | line` (NAME defaults to `worker`);
//! `listening on ADDRESS` is printed once per address, when its first worker listens.
//! Exits 1 with a message when PROGRAM cannot start or every worker keeps crashing.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use cluster::{Event, OutputStream, Policy, Primary, RestartPolicy, Settings};

/// Runs PROGRAM as N supervised workers (Node's cluster protocol for .js/.mjs/.cjs).
#[derive(Debug, Parser)]
#[command(name = "cluster", version)]
struct Args {
    /// How many workers (default: one per CPU).
    #[arg(long, short = 'w')]
    workers: Option<usize>,
    /// How connections reach workers: rr (the primary hands them out) or shared (one
    /// socket, every worker accepts); reuseport is accepted too.
    #[arg(long, default_value = "rr")]
    policy: Policy,
    /// How long a stopping worker may finish its requests before it is killed.
    #[arg(long, default_value_t = 30)]
    grace: u64,
    /// Give a slot up after this many crashes within a minute (restarts back off from
    /// 100 ms, doubling up to 10 s); the command ends when every slot is given up.
    #[arg(long, default_value_t = 10)]
    max_restarts: u32,
    /// The prefix of worker output lines.
    #[arg(long, default_value = "worker")]
    name: String,
    /// The Node executable for .js/.mjs/.cjs programs.
    #[arg(long, default_value = "node")]
    node: OsString,
    /// Keep Node's own server.close() on a stop or reload, which drops idle keep-alive
    /// connections at once, instead of answering their next request with
    /// `Connection: close`.
    #[arg(long)]
    no_keepalive_drain: bool,
    /// The program and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    cluster::take_inherited_sockets();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether `program` is a Node script.
fn is_node_script(program: &Path) -> bool {
    matches!(
        program.extension().and_then(|e| e.to_str()),
        Some("js" | "mjs" | "cjs")
    )
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut command = args.command.into_iter();
    let program = command.next().context("no PROGRAM given")?;
    let program_args: Vec<OsString> = command.collect();
    let workers = args.workers.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    anyhow::ensure!(workers > 0, "--workers must be at least 1");
    let grace = Duration::from_secs(args.grace);
    let mut settings = Settings::new()
        .program(program.clone())
        .args(program_args)
        .workers(workers)
        .policy(args.policy)
        .restart(RestartPolicy::new().crash_loop_limit(args.max_restarts, Duration::from_secs(60)))
        .silent(true)
        .drain_deadline(grace);
    let shown = Path::new(&program).display().to_string();
    if is_node_script(Path::new(&program)) {
        // Node would start and exit at once: say so now rather than crash-loop.
        anyhow::ensure!(
            Path::new(&program).is_file(),
            "cannot start {shown}: no such file"
        );
        settings = settings
            .node(args.node)
            .node_keepalive_drain(!args.no_keepalive_drain);
    }
    let mut primary = Primary::start(settings)
        .await
        .with_context(|| format!("cannot start {shown}"))?;
    let mut events = primary.take_events().context("events already taken")?;
    let primary = primary;
    let (result, fatal) = {
        let watching = watch(&mut events, &args.name, workers);
        tokio::pin!(watching);
        tokio::select! {
            result = primary.run_until_signal() => (result, None),
            fatal = &mut watching => (Ok(()), fatal),
        }
    };
    if fatal.is_some() {
        primary.stop().await.context("stopping the workers")?;
    }
    drop(primary);
    while let Some(event) = events.recv().await {
        show(&event, &args.name);
    }
    result.context("running the workers")?;
    if let Some(reason) = fatal {
        anyhow::bail!("{shown}: {reason}");
    }
    Ok(())
}

/// Shows events until one says the cluster cannot serve (a listen that retrying cannot
/// fix, or every slot given up); `None` once the events end.
async fn watch(events: &mut cluster::Events, name: &str, workers: usize) -> Option<String> {
    let mut announced = HashSet::new();
    let mut failed_slots = 0;
    while let Some(event) = events.recv().await {
        if let Event::Listening { address, .. } = &event {
            if announced.insert(address.clone()) {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "listening on {address}");
                let _ = stdout.flush();
            }
        }
        show(&event, name);
        if let Event::SlotFailed { cause, .. } = &event {
            failed_slots += 1;
            if matches!(cause, cluster::SlotFailure::Listen { .. }) {
                return Some(format!("cannot listen: {cause}"));
            }
            if failed_slots >= workers {
                return Some(format!("every worker keeps crashing ({cause})"));
            }
        }
    }
    None
}

fn show(event: &Event, name: &str) {
    match event {
        Event::Output { id, stream, line } => {
            let _ = match stream {
                OutputStream::Stdout => writeln!(std::io::stdout().lock(), "{name} {id} | {line}"),
                _ => writeln!(std::io::stderr().lock(), "{name} {id} | {line}"),
            };
        }
        Event::Fork { id, pid } => eprintln!("cluster: worker {id} started (pid {pid})"),
        Event::Listening { id, address, .. } => {
            eprintln!("cluster: worker {id} is listening on {address}")
        }
        Event::Exit {
            id,
            status,
            exited_after_disconnect,
        } => eprintln!(
            "cluster: worker {id} exited ({status}{})",
            match exited_after_disconnect {
                true => ", asked to stop",
                false => "",
            }
        ),
        Event::GoingDown { id, reason } => eprintln!("cluster: worker {id} going down: {reason}"),
        Event::Misbehaved { id, reason } => eprintln!("cluster: worker {id} misbehaved: {reason}"),
        Event::SlotFailed { slot, id, cause } => {
            eprintln!("cluster: slot {slot} given up (last worker {id}): {cause}")
        }
        Event::ReloadFailed { slot, kept, .. } => {
            eprintln!("cluster: reload failed for slot {slot}; worker {kept} keeps serving")
        }
        other => tracing::debug!(?other, "cluster event"),
    }
}
