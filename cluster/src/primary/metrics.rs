//! The primary's HTTP endpoint ([`Settings::metrics`](crate::Settings::metrics)): `/metrics`
//! for Prometheus (`metrics/exposition.rs`), `/status`, a self-contained HTML page
//! (`metrics/page.rs`) with a chart of the last minutes (`metrics/history.rs`), `/readyz`
//! (200 `ready` while the cluster is ready, else 503 `not ready`: a balancer's health
//! check) and `/healthz` (200 while the primary runs).
//!
//! A driver-side server, not a second owner: it reads the cluster through a
//! [`Link`] (a snapshot per request and one per second for the history, each a
//! `Command::Stats` on the driver's bounded channel; the readiness from its watch) and
//! never touches the event queue. Its socket is bound before the driver starts, so an
//! address in use fails [`Primary::start`](crate::Primary::start)
//! ([`Error::Metrics`]).
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once (past it a new one is closed
//! at once); HTTP/1 only; a request head must arrive within [`HEADER_READ_TIMEOUT`] (an
//! idle keep-alive connection is closed after as long); a connection is asked to close
//! (after its response in flight) once it is [`MAX_CONNECTION_AGE`] old; a request waits
//! at most [`ANSWER_TIMEOUT`] for the driver's snapshot (then 503). `GET` and `HEAD`
//! only (405 otherwise), 404 for other paths. It ends when the driver ends or the
//! [`Primary`](crate::Primary) handle is dropped, and its connections with it.

mod exposition;
mod history;
mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use self::exposition::{ReloadDurations, Snapshot};
use self::history::History;
use self::page::Page;
use super::link::Link;
use super::stats::Stats;
use crate::error::Error;

/// How many connections are served at once; past it, a new one is closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;

/// How long a request head may take to arrive (an idle keep-alive connection waits as
/// long for its next request).
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How old a connection may grow before it is asked to close after its current response.
pub(crate) const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// How long a request waits for the driver's snapshot before it is answered 503.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the history records a sample.
const TICK: Duration = Duration::from_secs(1);

/// How long the accept loop backs off after an accept error (no descriptors left).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How often an upgrade's new primary tries the address its old primary still holds.
const RETRY_BIND: Duration = Duration::from_millis(100);

/// Serves on `address` once it is free: an upgrade's new primary, whose old primary
/// holds the address until it stops. Ends (bound or not) when the returned guard is
/// dropped or the driver ends.
pub(crate) fn serve_once_free(
    address: SocketAddr,
    link: Link,
    dropped_output: Arc<AtomicU64>,
) -> DropGuard {
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let bound = async {
            loop {
                match MetricsListener::bind(address).await {
                    Ok(listener) => break listener,
                    Err(e) => tracing::debug!(error = %e, "metrics address still held"),
                }
                tokio::time::sleep(RETRY_BIND).await;
            }
        };
        let listener = tokio::select! {
            listener = bound => listener,
            () = stopped.cancelled() => return,
            () = link.closed() => return,
        };
        tracing::info!(%address, "serving metrics, now that the old primary let the address go");
        let _serving = listener.serve(link, dropped_output);
        stopped.cancelled().await;
    });
    stop.drop_guard()
}

/// The endpoint's listening socket, bound before the driver starts.
#[derive(Debug)]
pub(crate) struct MetricsListener {
    listener: TcpListener,
    address: SocketAddr,
}

impl MetricsListener {
    /// Binds `address` (close-on-exec, `SO_REUSEADDR`); a port in use is an error.
    pub(crate) async fn bind(address: SocketAddr) -> Result<Self, Error> {
        let error = |source| Error::Metrics { address, source };
        let listener = TcpListener::bind(address).await.map_err(error)?;
        let address = listener.local_addr().map_err(error)?;
        Ok(Self { listener, address })
    }

    /// The bound address (the port chosen, for port 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// Spawns the server and its history's ticker. They end when the driver ends or the
    /// returned guard is dropped.
    pub(crate) fn serve(self, link: Link, dropped_output: Arc<AtomicU64>) -> DropGuard {
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            link,
            recorded: Mutex::new(Recorded::default()),
            dropped_output,
            primary_pid: std::process::id(),
        });
        tracing::debug!(address = %self.address, "serving metrics");
        tokio::spawn(until_ended(
            Arc::clone(&shared),
            stop.clone(),
            record(Arc::clone(&shared)),
        ));
        tokio::spawn(until_ended(
            Arc::clone(&shared),
            stop.clone(),
            accept(self.listener, shared),
        ));
        stop.drop_guard()
    }
}

/// What the requests and the ticker share.
#[derive(Debug)]
struct Shared {
    link: Link,
    recorded: Mutex<Recorded>,
    dropped_output: Arc<AtomicU64>,
    primary_pid: u32,
}

/// What the server keeps between snapshots: the history and the reload durations.
#[derive(Debug, Default)]
struct Recorded {
    history: History,
    reloads: ReloadDurations,
}

impl Shared {
    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot from the driver, seen by the reload durations; `None` if the driver
    /// has ended or did not answer in time.
    async fn stats(&self) -> Option<Stats> {
        let stats = tokio::time::timeout(ANSWER_TIMEOUT, self.link.stats()).await;
        let stats = stats.ok()?.ok()?;
        self.recorded().reloads.see(&stats);
        Some(stats)
    }
}

/// Runs `task` until the driver ends or `stop` is cancelled.
async fn until_ended(shared: Arc<Shared>, stop: CancellationToken, task: impl Future<Output = ()>) {
    tokio::select! {
        () = task => {}
        () = stop.cancelled() => {}
        () = shared.link.closed() => {}
    }
}

/// Records a sample of the totals every [`TICK`].
async fn record(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(stats) = shared.stats().await {
            shared
                .recorded()
                .history
                .record(stats.uptime, &stats.totals);
        }
    }
}

/// Accepts connections and serves each in a task of its own, at most
/// [`MAX_CONNECTIONS`] at once; dropping this future aborts them all.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        connections.spawn(serve(stream, permit, Arc::clone(&shared)));
                    }
                    // Full: closed at once, the client sees a reset or an empty reply.
                    Err(_) => drop(stream),
                },
                Err(error) => {
                    tracing::warn!(%error, "metrics endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Serves one connection: HTTP/1, bounded in time (see the module docs).
async fn serve(stream: TcpStream, _permit: OwnedSemaphorePermit, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(answer(&shared, &request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => return,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(HEADER_READ_TIMEOUT, connection).await;
}

/// The answer to one request.
async fn answer(shared: &Shared, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => match shared.stats().await {
            Some(stats) => {
                let snapshot = Snapshot {
                    stats,
                    dropped_output_lines: shared.dropped_output.load(Ordering::Relaxed),
                };
                let text = exposition::encode(snapshot, &shared.recorded().reloads);
                typed(StatusCode::OK, exposition::CONTENT_TYPE, text)
            }
            None => unavailable(),
        },
        "/status" => match shared.stats().await {
            Some(stats) => {
                let rates = shared.recorded().history.rates();
                let page = Page {
                    stats: &stats,
                    rates: &rates,
                    primary_pid: shared.primary_pid,
                };
                typed(StatusCode::OK, "text/html; charset=utf-8", page.render())
            }
            None => unavailable(),
        },
        "/readyz" => match shared.link.ready() {
            true => plain(StatusCode::OK, "ready\n"),
            false => plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        },
        "/healthz" => plain(StatusCode::OK, "ok\n"),
        "/" => plain(
            StatusCode::OK,
            "cluster primary: /metrics (OpenMetrics), /status, /readyz, /healthz\n",
        ),
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn unavailable() -> Response<Full<Bytes>> {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "the primary did not answer\n",
    )
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    typed(status, "text/plain; charset=utf-8", text.to_owned())
}

fn typed(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// A snapshot with every kind of line the endpoint shows, for the unit tests.
#[cfg(test)]
pub(crate) fn sample_stats() -> Stats {
    use super::stats::{
        ExitCause, LastExit, ReloadReport, SlotStats, Totals, Usage, WorkerState, WorkerStats,
    };
    use crate::protocol::WorkerId;
    let worker = |id: u64, slot: usize, pid: u32, state: WorkerState| WorkerStats {
        id: WorkerId(id),
        pid,
        slot,
        state,
        uptime: Duration::from_secs(90),
        handed: 7 * id,
        in_flight: 0,
        restarts: 0,
        listening: vec![crate::Endpoint::Inet(
            "127.0.0.1:8080".parse().expect("address"),
        )],
        usage: Some(Usage {
            rss_bytes: 1_000_000 * id,
            cpu_time: Duration::from_millis(1500),
            cpu_percent: Some(2.5),
        }),
        spare: false,
        build: Some("<b>\"x\"&'y'".to_owned()),
    };
    let mut totals = Totals {
        starts: 5,
        reloads_succeeded: 2,
        reloads_failed: 1,
        handed: 1234,
        accept_pauses: 3,
        dropped_events: 4,
        ..Totals::default()
    };
    totals.exits.add(ExitCause::Crash);
    totals.exits.add(ExitCause::Signal);
    totals.exits.add(ExitCause::Signal);
    let slot = |slot: usize, worker: Option<u64>, restarts: u32| SlotStats {
        slot,
        worker: worker.map(WorkerId),
        restarts,
        last_exit: None,
        failed: false,
    };
    let mut slots = vec![slot(0, Some(1), 0), slot(1, Some(4), 2), slot(2, None, 9)];
    slots[1].last_exit = Some(LastExit {
        id: WorkerId(2),
        status: child::ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        },
        cause: ExitCause::Signal,
    });
    slots[2].failed = true;
    Stats {
        workers: vec![
            worker(1, 0, 4101, WorkerState::Listening),
            // Slot 1 during a reload step: the old worker drains, the new one is current.
            worker(3, 1, 4103, WorkerState::Disconnecting),
            worker(4, 1, 4104, WorkerState::Forked),
        ],
        slots,
        queued: 6,
        failed_slots: vec![2],
        ready: false,
        stopping: false,
        policy: crate::Policy::RoundRobin,
        uptime: Duration::from_secs(3725),
        reload: None,
        last_reload: Some(ReloadReport {
            replaced: vec![0, 1],
            failed: Vec::new(),
            took: Duration::from_millis(3200),
            interrupted: false,
        }),
        totals,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, watch};

    use super::*;
    use crate::primary::command::Command;

    /// A driver that answers every `Stats` with the sample snapshot, and the readiness.
    fn fake_driver() -> (Link, watch::Sender<bool>) {
        let (commands, mut rx) = mpsc::channel(64);
        let (ready_tx, ready) = watch::channel(false);
        tokio::spawn(async move {
            while let Some(command) = rx.recv().await {
                if let Command::Stats(reply) = command {
                    let _ = reply.send(sample_stats());
                }
            }
        });
        (Link { commands, ready }, ready_tx)
    }

    /// One request with `Connection: close`: the whole response as text.
    async fn exchange(address: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let request = format!("{request}\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        let read = stream.read_to_string(&mut response);
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("a response in time")
            .expect("read");
        response
    }

    #[tokio::test(flavor = "current_thread")]
    async fn routes_methods_and_readiness() {
        let (link, ready) = fake_driver();
        let listener = MetricsListener::bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let address = listener.local_addr();
        let _guard = listener.serve(link, Arc::new(AtomicU64::new(7)));

        let metrics = exchange(address, "GET /metrics HTTP/1.1").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains(exposition::CONTENT_TYPE), "{metrics}");
        assert!(metrics.contains("cluster_dropped_output_lines_total 7\n"));
        assert!(metrics.ends_with("# EOF\n"), "{metrics}");
        let head = exchange(address, "HEAD /metrics HTTP/1.1").await;
        assert!(
            head.starts_with("HTTP/1.1 200") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let status = exchange(address, "GET /status HTTP/1.1").await;
        assert!(status.contains("<td class=\"pid\">4104</td>"), "{status}");

        let post = exchange(address, "POST /metrics HTTP/1.1").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.contains("allow: GET, HEAD"), "{post}");
        let missing = exchange(address, "GET /nowhere HTTP/1.1").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");

        let not_ready = exchange(address, "GET /readyz HTTP/1.1").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(not_ready.ends_with("\r\n\r\nnot ready\n"), "{not_ready}");
        ready.send_replace(true);
        let now_ready = exchange(address, "GET /readyz HTTP/1.1").await;
        assert!(now_ready.ends_with("\r\n\r\nready\n"), "{now_ready}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn connections_past_the_bound_are_closed_and_a_drop_ends_the_server() {
        let (link, _ready) = fake_driver();
        let listener = MetricsListener::bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind");
        let address = listener.local_addr();
        let guard = listener.serve(link.clone(), Arc::new(AtomicU64::new(0)));
        // Idle connections hold every permit (until the head timeout, 5 s); the server
        // accepts in order, so the next one finds none left.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(address).await.expect("connect"));
        }
        let mut one_more = TcpStream::connect(address).await.expect("connect");
        let _ = one_more.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").await;
        let mut response = Vec::new();
        let read = one_more.read_to_end(&mut response);
        let read = tokio::time::timeout(HEADER_READ_TIMEOUT / 2, read).await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "closed at once without an answer: {read:?} {response:?}"
        );
        // One of them is served once it asks.
        let mut first = idle.remove(0);
        first
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        first.read_to_string(&mut answer).await.expect("read");
        assert!(answer.ends_with("ok\n"), "{answer}");
        drop(idle);
        // Dropping the guard ends the server and its Link: the driver's channel closes.
        drop(guard);
        let (commands, ready) = (link.commands.clone(), link.ready.clone());
        drop(link);
        let probe = Link { commands, ready };
        let gone = async {
            while probe.commands.strong_count() > 1 {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the server's Links are dropped");
    }
}
