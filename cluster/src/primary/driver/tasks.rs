//! The driver's per-worker tasks: they only move bytes (frames in, control messages out,
//! the exit, silent output) and tell the driver what happened.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;

use super::Internal;
use crate::primary::{OutputStream, UserSender};
use crate::protocol::{ToWorker, WorkerId};

/// A control message for a worker, in the protocol it speaks.
#[derive(Debug)]
pub(super) enum Outgoing {
    /// This crate's protocol (postcard, control lane).
    Cluster(ToWorker),
    /// Node's `NODE_CLUSTER` message; with a descriptor it goes as a `net.Native`
    /// `NODE_HANDLE`.
    Node(ipc::InternalMessage),
}

/// The descriptors that go with a control message.
#[derive(Debug)]
pub(super) enum Fds {
    /// Copies of the driver's, closed once sent (a listening socket, a Node hand-off).
    Owned(Vec<OwnedFd>),
    /// A connection the driver keeps until the worker took it, sent without a copy (no
    /// `dup` and `close` per hand-off); it closes when the last holder lets go.
    Conn(Arc<OwnedFd>),
}

impl Fds {
    pub(super) fn none() -> Self {
        Self::Owned(Vec::new())
    }
}

/// The longest output line forwarded as one event; longer lines are split.
const MAX_OUTPUT_LINE: usize = 64 * 1024;

pub(super) async fn write_control(sender: UserSender, mut rx: mpsc::Receiver<(Outgoing, Fds)>) {
    while let Some((message, fds)) = rx.recv().await {
        let mut sender = sender.lock().await;
        let sent = match (message, fds) {
            (Outgoing::Cluster(message), Fds::Owned(fds)) => {
                sender.send_control(&message, fds).await
            }
            (Outgoing::Cluster(message), Fds::Conn(conn)) => {
                let fds = [conn.as_fd()];
                sender
                    .send_borrowed(ipc::Lane::Control, &message, &fds)
                    .await
            }
            (Outgoing::Node(message), Fds::Owned(fds)) => sender.send_internal(&message, fds).await,
            (Outgoing::Node(message), Fds::Conn(conn)) => {
                // A JSON channel keeps the handle until the ACK: it copies it anyway.
                let fds = [conn.as_fd()];
                sender
                    .send_borrowed(ipc::Lane::Control, &message, &fds)
                    .await
            }
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "channel to a worker closed");
            return;
        }
    }
}

pub(super) async fn read_worker(
    id: WorkerId,
    mut receiver: ipc::Receiver,
    internal: mpsc::Sender<Internal>,
) {
    let broken = loop {
        match receiver.recv().await {
            Ok(Some(message)) => {
                if internal.send(Internal::Message(id, message)).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(ipc::Error::Closed | ipc::Error::UnexpectedEof { .. }) => break None,
            Err(e) => break Some(format!("broken channel: {e}")),
        }
    };
    let _ = internal.send(Internal::ChannelClosed(id, broken)).await;
}

pub(super) async fn wait_worker(
    id: WorkerId,
    child: Arc<child::Child>,
    internal: mpsc::Sender<Internal>,
) {
    let status = match child.wait().await {
        Ok(status) => status,
        Err(e) => {
            tracing::error!(%id, error = %e, "waiting for a worker failed");
            child::ExitStatus::Exited(-1)
        }
    };
    let _ = internal.send(Internal::Exited(id, status)).await;
}

/// Forwards a silent worker's output, line by line (split past [`MAX_OUTPUT_LINE`]).
pub(super) async fn forward_output(
    id: WorkerId,
    stream: OutputStream,
    pipe: child::ChildStdout,
    internal: mpsc::Sender<Internal>,
) {
    let mut reader = tokio::io::BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = {
            let mut limited = (&mut reader).take(MAX_OUTPUT_LINE as u64);
            limited.read_until(b'\n', &mut line).await
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                let text = String::from_utf8_lossy(&line).into_owned();
                if internal
                    .send(Internal::Output(id, stream, text))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = internal.send(Internal::OutputEnd).await;
}
