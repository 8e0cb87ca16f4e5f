//! The cluster tests' application: a primary or a worker, by `cluster::role()`.
//!
//! As a worker it listens on `CLUSTER_APP_LISTEN` (default `127.0.0.1:0`) and, for each
//! connection, writes `worker <id> pid <pid> port <port>\n`, reads one line, panics if it
//! is `panic`, else writes `echo <line>\n` and closes. `CLUSTER_APP_MODE_<id>` (or
//! `CLUSTER_APP_MODE`) changes that: `exit:<code>` exits at once, `refuse` refuses every
//! hand-off, `stall` listens but never accepts, `double` listens twice on port 0,
//! `hostile` sends a malformed control frame, `flood` listens on port 0 until the primary
//! stops it, `lazy` never reads user messages until asked to stop and then reports what
//! it kept (`kept <n> dropped <n> first <message>`, up to the message `end`), `args`
//! reports its arguments (`args <a> <b> ...`), `env` reports `env <CLUSTER_APP_X> slot
//! <slot>`, `chatty` prints a line to stdout and one to stderr, `self-disconnect` serves
//! one connection then disconnects itself, `relisten` listens, closes and listens again
//! (then reports `relisten <port>`), `report-stop` prints `stop <reason>` on stdout
//! when it is told to stop. A failed listen is reported to the primary as the user message
//! `listen-error <errno>`, then the worker exits with code 3. With
//! `CLUSTER_APP_RAISE_NOFILE` set, a worker raises its descriptor limit to the hard one;
//! with `CLUSTER_APP_NOFILE=<n>`, it lowers it to `n`.
//!
//! As a primary (`cluster_app <workers>`) it runs until a signal and prints each event as
//! a line on stdout: `fork <id> <pid>`, `listening <id> <address>`,
//! `exit <id> <status> <exited after disconnect>`.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinSet;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cluster::role() {
        cluster::Role::Worker(id) => runtime.block_on(worker(id)),
        cluster::Role::Primary => runtime.block_on(primary()),
    }
}

async fn primary() -> anyhow::Result<()> {
    let workers = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(2);
    let drain_ms = std::env::var("CLUSTER_APP_DRAIN_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let settings = cluster::Settings::new()
        .workers(workers)
        .drain_deadline(std::time::Duration::from_millis(drain_ms));
    let mut primary = cluster::Primary::start(settings).await?;
    let mut events = primary.take_events().context("events")?;
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let line = match event {
                cluster::Event::Fork { id, pid } => format!("fork {id} {pid}"),
                cluster::Event::Listening { id, address, .. } => {
                    format!("listening {id} {address}")
                }
                cluster::Event::Exit {
                    id,
                    status,
                    exited_after_disconnect,
                    ..
                } => format!("exit {id} {status} {exited_after_disconnect}"),
                _ => continue,
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    });
    primary.run_until_signal().await?;
    let _ = writeln!(std::io::stdout().lock(), "stopped");
    Ok(())
}

async fn worker(id: cluster::WorkerId) -> anyhow::Result<()> {
    {
        // Which side runs short of descriptors is the test's choice.
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        if std::env::var_os("CLUSTER_APP_RAISE_NOFILE").is_some() {
            setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        }
        if let Some(soft) = std::env::var("CLUSTER_APP_NOFILE")
            .ok()
            .and_then(|n| n.parse().ok())
        {
            setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?;
        }
    }
    let mode = std::env::var(format!("CLUSTER_APP_MODE_{id}"))
        .or_else(|_| std::env::var("CLUSTER_APP_MODE"))
        .unwrap_or_else(|_| "serve".into());
    if mode == "hostile" {
        let mut channel = child::parent_channel()?.context("no channel")?;
        channel.send_control(&u64::MAX, Vec::new()).await?;
        std::future::pending::<()>().await;
    }
    let worker = cluster::Worker::connect().await?;
    if let Some(code) = mode.strip_prefix("exit:") {
        std::process::exit(code.parse()?);
    }
    match mode.as_str() {
        "flood" => {
            let mut held = Vec::new();
            while let Ok(listener) = worker.listen("127.0.0.1:0".parse()?).await {
                held.push(listener);
            }
            worker.stopping().await;
            return Ok(());
        }
        "lazy" => return lazy(&worker).await,
        "args" => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            worker.send(&format!("args {}", args.join(" "))).await?;
            worker.stopping().await;
            return Ok(());
        }
        "env" => {
            let x = std::env::var("CLUSTER_APP_X").unwrap_or_default();
            let slot = worker.slot().map_or(-1, |s| s as i64);
            worker.send(&format!("env {x} slot {slot}")).await?;
        }
        "chatty" => {
            writeln!(std::io::stdout(), "hello stdout from {id}")?;
            eprintln!("hello stderr from {id}");
        }
        "report-stop" => {
            let reason = worker.stopping().await;
            writeln!(std::io::stdout(), "stop {reason:?}")?;
            return Ok(());
        }
        _ => {}
    }
    let address: SocketAddr = std::env::var("CLUSTER_APP_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:0".into())
        .parse()?;
    if mode == "relisten" {
        // Listen, close, listen again on the same address (Node's close + listen).
        let first = worker.listen(address).await;
        drop(first);
    }
    let mut listeners = Vec::new();
    for _ in 0..if mode == "double" { 2 } else { 1 } {
        match worker.listen(address).await {
            Ok(listener) => listeners.push(listener),
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(-1);
                worker.send(&format!("listen-error {errno}")).await?;
                std::process::exit(3);
            }
        }
    }
    if mode == "relisten" {
        let port = listeners[0].local_addr().port();
        worker.send(&format!("relisten {port}")).await?;
    }
    if mode == "refuse" {
        listeners.iter().for_each(|l| l.set_refusing(true));
    }
    if mode == "stall" {
        worker.stopping().await;
        return Ok(());
    }
    let self_disconnect = mode == "self-disconnect";
    let worker = std::sync::Arc::new(worker);
    let mut accepting = JoinSet::new();
    for mut listener in listeners {
        let worker = std::sync::Arc::clone(&worker);
        let greeting = format!(
            "worker {id} pid {} port {}\n",
            std::process::id(),
            listener.local_addr().port()
        );
        accepting.spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok(Some(stream)) = listener.accept().await {
                connections.spawn(serve(stream, greeting.clone()));
                if self_disconnect {
                    worker.disconnect();
                }
            }
            // Stopping: finish the connections in flight.
            while connections.join_next().await.is_some() {}
        });
    }
    while accepting.join_next().await.is_some() {}
    if worker.panicked() {
        std::process::exit(1);
    }
    Ok(())
}

/// Reads nothing until asked to stop, then reports what the bounded queue kept.
async fn lazy(worker: &cluster::Worker) -> anyhow::Result<()> {
    worker.stopping().await;
    let mut kept = 0;
    let mut first = None;
    while let Some(message) = worker.recv().await {
        let text: String = message.decode()?;
        kept += 1;
        first.get_or_insert_with(|| text.clone());
        if text == "end" {
            break;
        }
    }
    let first = first.unwrap_or_default();
    let dropped = worker.dropped_messages();
    worker
        .send(&format!("kept {kept} dropped {dropped} first {first}"))
        .await?;
    Ok(())
}

async fn serve(stream: tokio::net::TcpStream, greeting: String) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    write.write_all(greeting.as_bytes()).await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    let line = line.trim_end();
    if line == "panic" {
        panic!("asked to panic");
    }
    write.write_all(format!("echo {line}\n").as_bytes()).await
}
