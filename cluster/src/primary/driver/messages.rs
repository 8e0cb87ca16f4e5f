//! Between the workers' messages and the core: a worker's frame becomes an [`Input`]
//! (through Node's adapter for a Node worker), and a `Send` effect a queued control
//! message with its descriptor. A failure is reported to the core, which decides.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::Driver;
use super::processes::{Protocol, WorkerProcess};
use super::tasks::{Fds, Outgoing};
use crate::node_protocol::FromNode;
use crate::primary::Event;
use crate::primary::core::{FdRef, Input};
use crate::protocol::{ToPrimary, ToWorker, WorkerId};

impl Driver {
    pub(super) fn message(&mut self, id: WorkerId, mut message: ipc::Received) {
        if self.core.connected(id).is_none() {
            return;
        }
        if message.lane() == ipc::Lane::User {
            // Node's `process.send('ready')` is also the worker's word that it is ready.
            let ready = self
                .processes
                .get(id)
                .is_some_and(WorkerProcess::speaks_node)
                && crate::node_protocol::is_ready(&message);
            self.published.events.push(Event::Message { id, message });
            if ready {
                let message = ToPrimary::Ready;
                self.input(Input::Message { id, message });
            }
            return;
        }
        if self
            .processes
            .get(id)
            .is_some_and(WorkerProcess::speaks_node)
        {
            return self.node_message(id, message);
        }
        let input = match message.decode::<ToPrimary>() {
            Ok(_) if !message.fds().is_empty() => Input::Malformed {
                id,
                reason: "control message with descriptors".into(),
            },
            Ok(message) => Input::Message { id, message },
            Err(e) => Input::Malformed {
                id,
                reason: format!("undecodable control message: {e}"),
            },
        };
        drop(message.take_fds());
        self.input(input);
    }

    /// A Node worker's internal message, through its adapter.
    /// A Node worker could not take the descriptor sent with `message`: a hand-off is its
    /// refusal (the core gives the connection to another worker); anything else is logged.
    pub(super) fn handle_dropped(&mut self, id: WorkerId, message: &ipc::Received) {
        let Some(process) = self.processes.get_mut(id) else {
            return;
        };
        let Protocol::Node(node) = &mut process.protocol else {
            return;
        };
        let refusal = message.internal().ok().and_then(|m| node.dropped(&m));
        match refusal {
            Some(message) => {
                tracing::warn!(%id, "a worker could not take a connection (out of descriptors?); it goes to another");
                self.input(Input::Message { id, message });
            }
            None => tracing::warn!(%id, "a worker could not take a descriptor sent to it; dropped"),
        }
    }

    fn node_message(&mut self, id: WorkerId, mut message: ipc::Received) {
        let fds = message.take_fds();
        let Some(process) = self.processes.get_mut(id) else {
            return;
        };
        let Protocol::Node(node) = &mut process.protocol else {
            return;
        };
        let translated = match message.internal() {
            Ok(_) if !fds.is_empty() => {
                FromNode::Malformed("cluster message with a descriptor".into())
            }
            Ok(internal) => node.incoming(&internal),
            Err(e) => FromNode::Malformed(format!("undecodable internal message: {e}")),
        };
        drop(fds);
        let input = match translated {
            FromNode::Message(message) => Input::Message { id, message },
            FromNode::Malformed(reason) => Input::Malformed { id, reason },
            FromNode::Ignore => return,
            FromNode::Reply(reply) => {
                match process
                    .control
                    .try_send((Outgoing::Node(reply), Fds::none()))
                {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => Input::SendFailed { id },
                }
            }
        };
        self.input(input);
    }

    /// Queues a control message; a full queue is the worker's fault (see
    /// [`CONTROL_QUEUE`](crate::primary::core::CONTROL_QUEUE)).
    /// A descriptor that cannot be copied is reported to the core, which decides.
    pub(super) fn send(
        &mut self,
        id: WorkerId,
        message: ToWorker,
        fd: Option<FdRef>,
    ) -> Option<Input> {
        let node = self.processes.get(id)?.speaks_node();
        let fds = match fd {
            None => Ok(Fds::none()),
            Some(FdRef::Conn(conn)) => {
                let conn = self
                    .conns
                    .held
                    .get(&conn)
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF));
                if node {
                    // A Node channel keeps its own copy until the ACK; a failed copy
                    // (out of descriptors) is a failed hand-off, known now.
                    conn.and_then(|c| c.try_clone())
                        .map(|copy| Fds::Owned(vec![copy]))
                } else {
                    conn.map(|c| Fds::Conns(vec![Arc::clone(c)]))
                }
            }
            Some(FdRef::Listener { key, socket }) => match self.listeners.copy(&key, socket) {
                Ok(fd) => Ok(Fds::Owned(vec![fd])),
                Err(e) => {
                    let seq = match &message {
                        ToWorker::QueryReply { seq, .. } => *seq,
                        _ => return None, // only a grant carries a listening socket
                    };
                    tracing::warn!(%id, error = %e, "could not copy a listening socket");
                    let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                    return Some(Input::GrantFailed {
                        id,
                        key,
                        seq,
                        errno,
                    });
                }
            },
        };
        let fds = match (fds, &message) {
            (Ok(fds), _) => fds,
            (Err(e), ToWorker::NewConn { key, seq }) => {
                tracing::warn!(%id, error = %e, "could not copy a connection for a worker");
                let (key, seq) = (key.clone(), *seq);
                return Some(Input::HandoffFailed { id, key, seq });
            }
            (Err(_), _) => Fds::none(),
        };
        let process = self.processes.get_mut(id)?;
        match process.queue(&message, fds) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(Input::SendFailed { id }),
            // The writer is gone with the channel: the core hears of it from the reader.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }
}
