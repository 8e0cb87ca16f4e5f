//! Serving HTTP/1.1 with keep-alive on accepted connections, and draining them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::{self, AppState};

mod activity;

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
}

impl Accept for tokio::net::TcpListener {
    async fn accept(&mut self) -> Option<io::Result<TcpStream>> {
        Some(tokio::net::TcpListener::accept(self).await.map(|(s, _)| s))
    }
}

/// Serves every connection that `listener` yields until `stopping` resolves or the
/// listener closes, then drains: no new connections, `/readyz` answers 503, every
/// response says `Connection: close` (a keep-alive connection's next request is still
/// answered), connections idle for [`IDLE_CLOSE`] are closed, and whatever is still open
/// after `grace` is dropped.
pub(crate) async fn serve(
    mut listener: impl Accept,
    stopping: impl Future<Output = ()>,
    grace: Duration,
    state: Arc<AppState>,
) -> Drained {
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.keep_alive(true).timer(TokioTimer::new());
    tokio::pin!(stopping);
    loop {
        let stream = tokio::select! {
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
            // Reap finished connection tasks as we go.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let activity = ActivityCell::new();
        let service = service_fn({
            let (state, activity) = (Arc::clone(&state), activity.clone());
            move |req| {
                activity.busy();
                let (state, activity) = (Arc::clone(&state), activity.clone());
                async move {
                    let response = app::handle(req, state).await;
                    activity.idle();
                    Ok::<_, Infallible>(response)
                }
            }
        });
        let connection = http.serve_connection(TokioIo::new(stream), service);
        connections.spawn(watch_connection(connection, activity, draining.clone()));
    }
    state.start_draining();
    drop(listener);
    let in_flight = *state.in_flight().borrow();
    tracing::info!(
        id = state.worker_id(),
        in_flight,
        open = connections.len(),
        "draining: no new connections"
    );
    let _ = drain.send(true);
    let all_closed = async { while connections.join_next().await.is_some() {} };
    tokio::select! {
        () = all_closed => Drained::Clean,
        () = tokio::time::sleep(grace) => Drained::TimedOut,
    }
}

/// Drives one connection; once draining starts, ends it without losing a request.
///
/// The rule is [`activity::drain_step`]: a connection in use is left open, so that its
/// next request is answered with `Connection: close` (after which hyper stops reading and
/// closes); one idle for [`IDLE_CLOSE`] is shut down (hyper closes an idle connection at
/// once). `serve` drops whatever is left at the grace deadline.
async fn watch_connection<C>(
    connection: C,
    activity: ActivityCell,
    mut draining: watch::Receiver<bool>,
) where
    C: GracefulConnection,
    C::Error: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut drain_seen = false;
    let mut shut_down = false;
    let recheck = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(recheck);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            _ = draining.wait_for(|d| *d), if !drain_seen => {
                drain_seen = true;
                recheck.as_mut().reset(tokio::time::Instant::now());
            }
            () = recheck.as_mut(), if drain_seen && !shut_down => {
                let now = tokio::time::Instant::now();
                match activity::drain_step(activity.get(), now, IDLE_CLOSE) {
                    DrainStep::Close => {
                        connection.as_mut().graceful_shutdown();
                        shut_down = true;
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
