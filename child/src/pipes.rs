//! The parent's ends of a child's stdio pipes: [`ChildStdin`] and [`ChildStdout`] (also
//! [`ChildStderr`]), this crate's own types over tokio's pipes, so that tokio's pipe types
//! are not part of `child`'s API. They implement tokio's `AsyncWrite` and `AsyncRead`
//! (tokio 1 is the runtime this crate runs on) by delegation.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// The parent's end of a child's stdin pipe: write to it with `tokio::io::AsyncWriteExt`;
/// dropping it closes the pipe (the child reads end-of-file).
#[derive(Debug)]
pub struct ChildStdin(pub(crate) pipe::Sender);

/// The parent's end of a child's stdout (or stderr) pipe: read it with
/// `tokio::io::AsyncReadExt`.
#[derive(Debug)]
pub struct ChildStdout(pub(crate) pipe::Receiver);

/// The parent's end of a child's stderr pipe: the same type as [`ChildStdout`], so one
/// function can read either.
pub type ChildStderr = ChildStdout;

impl ChildStdin {
    pub(crate) fn from_owned_fd(fd: OwnedFd) -> io::Result<Self> {
        pipe::Sender::from_owned_fd_unchecked(fd).map(Self)
    }

    /// The descriptor, deregistered from the runtime and in blocking mode, for handing to
    /// another process or a blocking writer.
    pub fn into_owned_fd(self) -> io::Result<OwnedFd> {
        self.0.into_blocking_fd()
    }
}

impl ChildStdout {
    pub(crate) fn from_owned_fd(fd: OwnedFd) -> io::Result<Self> {
        pipe::Receiver::from_owned_fd_unchecked(fd).map(Self)
    }

    /// The descriptor, deregistered from the runtime and in blocking mode, for handing to
    /// another process or a blocking reader.
    pub fn into_owned_fd(self) -> io::Result<OwnedFd> {
        self.0.into_blocking_fd()
    }
}

impl AsyncWrite for ChildStdin {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncRead for ChildStdout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsFd for ChildStdin {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsFd for ChildStdout {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
