//! One accepted connection: hyper's HTTP/1.1 state machine over the stream, the routes
//! as its service, and the socket adapter between them, which tells the connection's
//! [`ActivityCell`] when bytes arrive and when a response has been written.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::activity::{ActivityCell, Step};
use super::{OpenGuard, Phase, watch_connection};
use crate::app::{self, AppState};

/// How every connection of a worker is served: HTTP/1.1 with keep-alive. hyper's own
/// header read timeout is off: it boxes and arms a timer for every request head; the
/// connection's watcher applies the same 30 s bound ([`super::HEAD_TIMEOUT`]) with one
/// timer per connection.
pub(super) fn builder() -> http1::Builder {
    let mut http = http1::Builder::new();
    http.keep_alive(true).header_read_timeout(None);
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
    // No `set_nodelay` here: the cluster sets `TCP_NODELAY` on its listening sockets and
    // Linux copies it to every accepted one, which saves a system call per connection.
    let activity = ActivityCell::new();
    let service = service_fn({
        let activity = activity.clone();
        move |req| {
            activity.record(Step::Request);
            let (state, activity) = (Arc::clone(&state), activity.clone());
            async move {
                let response = app::handle(req, state).await;
                activity.record(Step::Response);
                Ok::<_, Infallible>(response)
            }
        }
    });
    let stream = Stream(TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    }));
    // Boxed, so that the task's future is a few words rather than hyper's whole state,
    // which spawning would otherwise copy several times over.
    let connection = Box::pin(http.serve_connection(stream, service));
    watch_connection(connection, activity, phases, guard)
}

/// The accepted socket, reporting to the connection's [`ActivityCell`]: bytes read (part
/// of a request, complete or not: hyper does not say which until the head is parsed) and
/// flushes. hyper flushes the socket only once its own write buffer is empty, so a flush
/// after the response is ready means the response was written (whole, for the small
/// bodies this server sends; a body larger than hyper's buffer would count as written
/// once its first part is).
struct Watched {
    stream: TcpStream,
    activity: ActivityCell,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.record(Step::Read);
        }
        read
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = Pin::new(&mut self.stream).poll_flush(cx);
        if matches!(flushed, Poll::Ready(Ok(()))) {
            self.activity.record(Step::Flushed);
        }
        flushed
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The accepted socket as hyper reads and writes it.
///
/// Like [`TokioIo`], except that closing the write side is left to the `close` when the
/// stream is dropped, which the connection's end does at once: hyper's `shutdown(SHUT_WR)`
/// before it would be one more system call per connection for the same FIN.
struct Stream(TokioIo<Watched>);

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
