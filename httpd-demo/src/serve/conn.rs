//! One accepted connection: hyper's HTTP/1.1 state machine over the stream, the routes
//! as its service, and the socket adapter between them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::activity::ActivityCell;
use super::{OpenGuard, Phase, watch_connection};
use crate::app::{self, AppState};

/// How every connection of a worker is served: HTTP/1.1 with keep-alive.
pub(super) fn builder() -> http1::Builder {
    let mut http = http1::Builder::new();
    http.keep_alive(true).timer(TokioTimer::new());
    http
}

/// The task that serves `stream` until it closes (or the drain or the grace period ends
/// it); `guard` counts it as open meanwhile.
pub(super) fn serve_one(
    http: &http1::Builder,
    stream: TcpStream,
    state: Arc<AppState>,
    phases: watch::Receiver<Phase>,
    guard: OpenGuard,
) -> impl Future<Output = ()> + Send + 'static {
    let _ = stream.set_nodelay(true);
    let activity = ActivityCell::new();
    let service = service_fn({
        let activity = activity.clone();
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
    // Boxed, so that the task's future is a few words rather than hyper's whole state,
    // which spawning would otherwise copy several times over.
    let connection = Box::pin(http.serve_connection(Stream(TokioIo::new(stream)), service));
    watch_connection(connection, activity, phases, guard)
}

/// The accepted socket as hyper reads and writes it.
///
/// Like [`TokioIo`], except that closing the write side is left to the `close` when the
/// stream is dropped, which the connection's end does at once: hyper's `shutdown(SHUT_WR)`
/// before it would be one more system call per connection for the same FIN.
struct Stream(TokioIo<TcpStream>);

impl Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
