//! Serving HTTP/1.1 with keep-alive on accepted connections, and draining them.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

use crate::app::AppState;

mod activity;
mod conn;

use activity::{ActivityCell, DrainStep, IDLE_CLOSE};

/// How a serve loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// Every connection finished its last response and closed.
    Clean,
    /// The grace period ended with connections still open; they were dropped.
    TimedOut,
}

/// A source of accepted connections.
pub(crate) trait Accept {
    /// The next connection, or `None` once the source has closed.
    fn accept(&mut self) -> impl Future<Output = Option<io::Result<TcpStream>>>;

    /// After the stop: the next connection handed to this worker before it (a cluster
    /// worker's round-robin hand-offs are its to serve), or `None` when there is none.
    fn leftover(&mut self) -> impl Future<Output = Option<io::Result<TcpStream>>> {
        std::future::ready(None)
    }
}

impl Accept for tokio::net::TcpListener {
    async fn accept(&mut self) -> Option<io::Result<TcpStream>> {
        Some(tokio::net::TcpListener::accept(self).await.map(|(s, _)| s))
    }
}

/// Serves every connection that `listener` yields until `stopping` resolves or the
/// listener closes, then drains: no new connections, `/readyz` answers 503, every
/// response says `Connection: close` (a keep-alive connection's next request is still
/// answered), connections idle for [`IDLE_CLOSE`] are closed, and so are those whose
/// request head stopped arriving that long ago, and whatever is still open after `grace`
/// is dropped.
///
/// Each connection is a detached task (no join set to insert it into and reap it from);
/// [`Open`] counts them, and the `phase` watch tells them when to drain and when to give up.
pub(crate) async fn serve(
    mut listener: impl Accept,
    stopping: impl Future<Output = ()>,
    grace: Duration,
    state: Arc<AppState>,
) -> Drained {
    let (phase, phases) = watch::channel(Phase::Serving);
    let open = Arc::new(Open::default());
    let http = conn::builder();
    tokio::pin!(stopping);
    // Each connection is a task of its own, counted open until it ends.
    let spawn_conn = |stream| {
        let guard = Open::enter(&open);
        tokio::spawn(conn::serve_one(
            &http,
            stream,
            Arc::clone(&state),
            phases.clone(),
            guard,
        ));
    };
    loop {
        // Accepting first: under load the loop takes every ready connection before it
        // looks at `stopping` again.
        let stream = tokio::select! {
            biased;
            next = listener.accept() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(err)) => {
                    // A failed accept (a reset before accept, fd exhaustion) is about one
                    // connection: log it and go on.
                    tracing::warn!(error = %err, "accept failed");
                    continue;
                }
                None => break,
            },
            () = &mut stopping => break,
        };
        spawn_conn(stream);
    }
    state.start_draining();
    // Connections the primary handed over before the stop are this worker's to serve
    // (under a stop or an upgrade there is no other worker to take them): `accept`
    // returns them, then `None`. They get `Connection: close` like the rest.
    while let Some(next) = listener.leftover().await {
        match next {
            Ok(stream) => spawn_conn(stream),
            Err(err) => tracing::warn!(error = %err, "accept failed"),
        }
    }
    drop(listener);
    let in_flight = *state.in_flight().borrow();
    tracing::info!(
        id = state.worker_id(),
        in_flight,
        open = open.count(),
        "draining: no new connections"
    );
    let _ = phase.send(Phase::Draining);
    let drained = tokio::select! {
        () = open.all_closed() => Drained::Clean,
        () = tokio::time::sleep(grace) => Drained::TimedOut,
    };
    if drained == Drained::TimedOut {
        // The connections still open drop what they were doing and close.
        let _ = phase.send(Phase::Abort);
    }
    drained
}

/// Where the serve loop is, as its connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Accepting and serving.
    Serving,
    /// Stopped accepting; connections finish as [`watch_connection`] says.
    Draining,
    /// The grace period is over: every connection is dropped.
    Abort,
}

/// How many connections are open, and a wake-up for when the last one closes.
#[derive(Debug, Default)]
struct Open {
    count: AtomicUsize,
    none_left: Notify,
}

/// One open connection in [`Open`]'s count, until dropped (also when its task panics).
struct OpenGuard(Arc<Open>);

impl Open {
    fn enter(open: &Arc<Self>) -> OpenGuard {
        open.count.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(open))
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Resolves once no connection is open.
    async fn all_closed(&self) {
        loop {
            // Registered before the check, so the last guard's wake-up is not missed.
            let notified = self.none_left.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}

/// How long a request head may take to arrive, and a connection may sit idle, while
/// serving (hyper's default header read timeout, which this replaces).
pub(crate) const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Drives one connection; once draining starts, ends it without losing a request.
///
/// While serving, [`activity::serving_step`] bounds a request head and an idle
/// connection to [`HEAD_TIMEOUT`] with one timer per connection, armed only if the
/// connection is still open after its first poll (a `Connection: close` request already
/// in the socket is answered and closed without one) and re-armed only when it fires.
///
/// Draining, the rule is [`activity::drain_step`]: a connection in use is left open, so that its
/// next request is answered with `Connection: close` (after which hyper stops reading and
/// closes); one idle for [`IDLE_CLOSE`] is shut down (hyper closes an idle connection at
/// once); one whose request head stopped arriving [`IDLE_CLOSE`] ago is dropped (hyper
/// would wait for the rest of it). At [`Phase::Abort`] the connection is dropped.
async fn watch_connection<C>(
    mut connection: Pin<Box<C>>,
    activity: ActivityCell,
    mut phases: watch::Receiver<Phase>,
    _open: OpenGuard,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    let first = std::future::poll_fn(|cx| Poll::Ready(connection.as_mut().poll(cx))).await;
    if let Poll::Ready(result) = first {
        if let Err(err) = result {
            tracing::debug!(error = %err, "connection ended with an error");
        }
        return;
    }
    let mut seen = Phase::Serving;
    let mut shut_down = false;
    let recheck = tokio::time::sleep(HEAD_TIMEOUT);
    tokio::pin!(recheck);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            phase = phases.wait_for(|p| *p > seen), if seen != Phase::Abort => {
                seen = phase.map_or(Phase::Abort, |p| *p);
                match seen {
                    Phase::Abort => return,
                    _ => recheck.as_mut().reset(tokio::time::Instant::now()),
                }
            }
            () = recheck.as_mut(), if !shut_down => {
                let now = tokio::time::Instant::now();
                let step = if seen == Phase::Draining {
                    activity::drain_step(activity.get(), now, IDLE_CLOSE)
                } else {
                    activity::serving_step(activity.get(), now, HEAD_TIMEOUT)
                };
                match step {
                    DrainStep::Close => {
                        connection.as_mut().graceful_shutdown();
                        shut_down = true;
                    }
                    DrainStep::Drop => {
                        tracing::debug!("dropping a connection whose request head stalled");
                        return;
                    }
                    DrainStep::Recheck(at) => recheck.as_mut().reset(at),
                }
            }
        }
    };
    if let Err(err) = result {
        tracing::debug!(error = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    /// Reads one HTTP/1.1 response with a Content-Length body; returns the head and body.
    async fn read_response(reader: &mut BufReader<TcpStream>) -> (String, String) {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).await.unwrap() > 0,
                "eof in head: {head}"
            );
            if line == "\r\n" {
                break;
            }
            head.push_str(&line.to_ascii_lowercase());
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("content-length")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        reader.read_exact(&mut body).await.unwrap();
        (head, String::from_utf8(body).unwrap())
    }

    struct Server {
        addr: std::net::SocketAddr,
        state: Arc<AppState>,
        stop: Option<oneshot::Sender<()>>,
        done: tokio::task::JoinHandle<Drained>,
    }

    async fn start(grace: Duration) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let state = AppState::new(3, false);
        let served = Arc::clone(&state);
        let done = tokio::spawn(async move {
            let stopping = async move {
                let _ = stopped.await;
            };
            serve(listener, stopping, grace, served).await
        });
        Server {
            addr,
            state,
            stop: Some(stop),
            done,
        }
    }

    #[tokio::test]
    async fn keep_alive_serves_several_requests_on_one_connection() {
        let server = start(Duration::from_secs(5)).await;
        let mut conn = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        for _ in 0..3 {
            conn.get_mut()
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, body) = read_response(&mut conn).await;
            assert!(head.starts_with("http/1.1 200"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert_eq!(body, "hello world\n");
        }
    }

    #[tokio::test]
    async fn drain_finishes_in_flight_requests_with_connection_close() {
        let mut server = start(Duration::from_secs(10)).await;
        let mut busy = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        let mut idle = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        // The idle connection has been served once, so it is a live keep-alive connection.
        idle.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut idle).await;
        busy.get_mut()
            .write_all(b"GET /sleep?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Stop only once the sleeping request is in its handler.
        let mut in_flight = server.state.in_flight();
        in_flight.wait_for(|n| *n == 1).await.unwrap();

        server.stop.take().unwrap().send(()).unwrap();
        let (head, body) = read_response(&mut busy).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body, "slept 300 ms\n");
        // Both connections are then closed by the server.
        let mut rest = Vec::new();
        assert_eq!(busy.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(idle.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.done.await.unwrap(), Drained::Clean);
    }

    /// A keep-alive connection served once, and the server told to stop.
    /// Returns it and when its request was sent.
    async fn used_connection_then_stop(
        server: &mut Server,
    ) -> (BufReader<TcpStream>, tokio::time::Instant) {
        let mut conn = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        let sent = tokio::time::Instant::now();
        conn.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_response(&mut conn).await;
        let mut draining = server.state.draining();
        server.stop.take().unwrap().send(()).unwrap();
        draining.wait_for(|d| *d).await.unwrap();
        (conn, sent)
    }

    #[tokio::test]
    async fn drain_answers_the_next_request_of_a_keep_alive_connection() {
        let mut server = start(Duration::from_secs(10)).await;
        let (mut conn, _) = used_connection_then_stop(&mut server).await;
        // The client sends its next request after the drain began: it is answered, with
        // `Connection: close`, and only then is the connection closed.
        conn.get_mut()
            .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut conn).await;
        assert!(head.starts_with("http/1.1 503"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert!(body.contains("\"status\": \"draining\""), "{body}");
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).await.unwrap(), 0);
        assert_eq!(server.done.await.unwrap(), Drained::Clean);
    }

    #[tokio::test]
    async fn drain_closes_a_connection_once_it_has_been_idle_for_the_threshold() {
        let mut server = start(Duration::from_secs(10)).await;
        let (mut conn, sent) = used_connection_then_stop(&mut server).await;
        let answered = tokio::time::Instant::now();
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).await.unwrap(), 0);
        // Idle from between `sent` and `answered`: closed IDLE_CLOSE after that.
        assert!(sent.elapsed() >= IDLE_CLOSE, "closed too early");
        assert!(answered.elapsed() <= IDLE_CLOSE + Duration::from_millis(500));
        assert_eq!(server.done.await.unwrap(), Drained::Clean);
    }

    /// A connection that sent half a request line, then the server told to stop. Returns
    /// it and when its bytes were sent.
    async fn half_sent_head_then_stop(
        server: &mut Server,
    ) -> (BufReader<TcpStream>, tokio::time::Instant) {
        let mut conn = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        conn.get_mut().write_all(b"GET / HT").await.unwrap();
        let sent = tokio::time::Instant::now();
        let mut draining = server.state.draining();
        server.stop.take().unwrap().send(()).unwrap();
        draining.wait_for(|d| *d).await.unwrap();
        (conn, sent)
    }

    #[tokio::test]
    async fn drain_closes_a_half_sent_request_head_once_it_stalled_for_the_threshold() {
        let mut server = start(Duration::from_secs(10)).await;
        let (mut conn, sent) = half_sent_head_then_stop(&mut server).await;
        let stopped = tokio::time::Instant::now();
        let mut rest = Vec::new();
        assert_eq!(conn.read_to_end(&mut rest).await.unwrap(), 0, "no answer");
        // Stalled from just after `sent`: dropped IDLE_CLOSE after that, not at the grace.
        assert!(sent.elapsed() >= IDLE_CLOSE, "closed too early");
        assert!(stopped.elapsed() <= IDLE_CLOSE + Duration::from_millis(500));
        assert_eq!(server.done.await.unwrap(), Drained::Clean);
    }

    #[tokio::test]
    async fn drain_answers_a_request_head_that_is_still_arriving() {
        let mut server = start(Duration::from_secs(10)).await;
        let (mut conn, _) = half_sent_head_then_stop(&mut server).await;
        conn.get_mut()
            .write_all(b"TP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = read_response(&mut conn).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("connection: close"), "{head}");
        assert_eq!(body, "hello world\n");
        assert_eq!(server.done.await.unwrap(), Drained::Clean);
    }

    #[tokio::test]
    async fn drain_gives_up_after_the_grace_period() {
        let mut server = start(Duration::from_millis(100)).await;
        let mut slow = BufReader::new(TcpStream::connect(server.addr).await.unwrap());
        slow.get_mut()
            .write_all(b"GET /sleep?ms=60000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut in_flight = server.state.in_flight();
        in_flight.wait_for(|n| *n == 1).await.unwrap();
        server.stop.take().unwrap().send(()).unwrap();
        assert_eq!(server.done.await.unwrap(), Drained::TimedOut);
    }
}
