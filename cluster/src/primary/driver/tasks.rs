//! The driver's per-worker tasks: they only move bytes (frames in, control messages out,
//! the exit, silent output) and tell the driver what happened.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;

use super::Internal;
use crate::primary::OutputStream;
use crate::primary::command::UserSender;
use crate::protocol::{ToWorker, WorkerId};

/// A control message for a worker, in the protocol it speaks. It serializes as the
/// message it holds (the channel's format decides the encoding).
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
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
    /// Connections the driver keeps until the worker took them, sent without a copy
    /// (no `dup` and `close` per hand-off); each closes when its last holder lets go.
    Conns(Vec<Arc<OwnedFd>>),
}

impl Fds {
    pub(super) fn none() -> Self {
        Self::Owned(Vec::new())
    }
}

/// The longest output line forwarded as one event; longer lines are split.
const MAX_OUTPUT_LINE: usize = 64 * 1024;

/// How many control messages the writer takes from its queue for one write.
const WRITE_BATCH: usize = 64;

/// How many hand-offs one `NewConns` frame carries at most (well under ipc's 32
/// descriptors per message).
const CONNS_PER_FRAME: usize = 16;

/// Joins consecutive hand-offs of the same handle to a Rust worker into `NewConns`
/// frames, order kept; a run of one stays a `NewConn`, and everything else passes
/// through.
fn coalesce(batch: Vec<(Outgoing, Fds)>) -> Vec<(Outgoing, Fds)> {
    let mut out: Vec<(Outgoing, Fds)> = Vec::with_capacity(batch.len());
    for (message, fds) in batch {
        if let (Outgoing::Cluster(ToWorker::NewConn { key, seq }), Fds::Conns(conn)) =
            (&message, &fds)
            && let Some((Outgoing::Cluster(last), Fds::Conns(conns))) = out.last_mut()
            && conns.len() < CONNS_PER_FRAME
        {
            match last {
                ToWorker::NewConn {
                    key: last_key,
                    seq: first,
                } if last_key == key => {
                    *last = ToWorker::NewConns {
                        key: key.clone(),
                        seqs: vec![*first, *seq],
                    };
                    conns.extend(conn.iter().cloned());
                    continue;
                }
                ToWorker::NewConns {
                    key: last_key,
                    seqs,
                } if last_key == key => {
                    seqs.push(*seq);
                    conns.extend(conn.iter().cloned());
                    continue;
                }
                _ => {}
            }
        }
        out.push((message, fds));
    }
    out
}

/// Writes a worker's control messages in order. What is queued together goes out
/// together: messages without descriptors are buffered into one write, and consecutive
/// hand-offs of one handle to a Rust worker travel as one frame with all their
/// descriptors (one `sendmsg` instead of one each).
pub(super) async fn write_control(sender: UserSender, mut rx: mpsc::Receiver<(Outgoing, Fds)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < WRITE_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let mut sender = sender.lock().await;
        let mut sent = Ok(());
        for (message, fds) in coalesce(batch) {
            sent = match fds {
                Fds::Owned(fds) => sender.feed(ipc::Lane::Control, &message, fds).await,
                Fds::Conns(conns) => {
                    let fds: Vec<_> = conns.iter().map(|c| c.as_fd()).collect();
                    (sender.send_borrowed(ipc::Lane::Control, &message, &fds)).await
                }
            };
            if sent.is_err() {
                break;
            }
        }
        if sent.is_ok() {
            sent = sender.flush().await;
        }
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
            // A descriptor the worker could not take: which message it was goes to the
            // driver; the channel goes on.
            Err(ipc::Error::HandleDropped { message, .. }) => {
                if internal
                    .send(Internal::HandleDropped(id, message))
                    .await
                    .is_err()
                {
                    return;
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HandleKey;

    fn conn(key: &HandleKey, seq: u64) -> (Outgoing, Fds) {
        let fd: OwnedFd = std::io::pipe().expect("pipe").0.into();
        let message = ToWorker::NewConn {
            key: key.clone(),
            seq,
        };
        (Outgoing::Cluster(message), Fds::Conns(vec![Arc::new(fd)]))
    }

    /// The batch as `(seqs, descriptors)` per write, with `None` for a write that is
    /// not a hand-off.
    fn shape(writes: &[(Outgoing, Fds)]) -> Vec<Option<(Vec<u64>, usize)>> {
        writes
            .iter()
            .map(|w| match w {
                (Outgoing::Cluster(ToWorker::NewConns { seqs, .. }), Fds::Conns(conns)) => {
                    Some((seqs.clone(), conns.len()))
                }
                (Outgoing::Cluster(ToWorker::NewConn { seq, .. }), Fds::Conns(conns)) => {
                    Some((vec![*seq], conns.len()))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn consecutive_hand_offs_of_one_handle_share_a_frame_in_order() {
        let (a, b) = (HandleKey::loopback(0), HandleKey::loopback(1));
        let disconnect = (Outgoing::Cluster(ToWorker::Disconnect), Fds::none());
        let batch = vec![
            conn(&a, 1),
            conn(&a, 2),
            conn(&a, 3),
            conn(&b, 4),
            disconnect,
            conn(&a, 5),
        ];
        let writes = coalesce(batch);
        assert_eq!(
            shape(&writes),
            [
                Some((vec![1, 2, 3], 3)),
                Some((vec![4], 1)),
                None,
                Some((vec![5], 1)),
            ]
        );
        assert!(
            matches!(&writes[1].0, Outgoing::Cluster(ToWorker::NewConn { .. })),
            "a run of one stays a NewConn"
        );
    }

    #[test]
    fn a_frame_carries_at_most_its_bound() {
        let a = HandleKey::loopback(0);
        let batch = (0..CONNS_PER_FRAME as u64 + 2)
            .map(|seq| conn(&a, seq))
            .collect();
        let counts: Vec<usize> = shape(&coalesce(batch))
            .into_iter()
            .map(|w| w.expect("hand-offs").1)
            .collect();
        assert_eq!(counts, [CONNS_PER_FRAME, 2]);
    }

    #[test]
    fn node_hand_offs_are_never_joined() {
        let fd: OwnedFd = std::io::pipe().expect("pipe").0.into();
        let fd = Arc::new(fd);
        let line = || {
            ipc::InternalMessage::new(crate::node_protocol::CLUSTER_CMD)
                .expect("internal")
                .with("act", "newconn")
        };
        let batch = vec![
            (Outgoing::Node(line()), Fds::Conns(vec![Arc::clone(&fd)])),
            (Outgoing::Node(line()), Fds::Conns(vec![fd])),
        ];
        let writes = coalesce(batch);
        assert_eq!(writes.len(), 2);
        assert!(writes.iter().all(|w| matches!(w, (Outgoing::Node(_), _))));
    }
}
