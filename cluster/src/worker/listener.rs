//! A worker's [`Listener`]: accepting on a socket, or under round-robin taking hand-offs
//! from its queue (`handoff.rs`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::handoff::HandoffQueue;
use super::link::Inner;
use crate::protocol::{HandleKey, ToPrimary};

#[derive(Debug)]
pub(crate) enum Kind {
    RoundRobin(Arc<HandoffQueue>),
    Socket(TcpListener),
}

/// A listening server in a worker: yields accepted connections whatever the policy.
#[derive(Debug)]
pub struct Listener {
    key: HandleKey,
    address: SocketAddr,
    kind: Option<Kind>,
    inner: Arc<Inner>,
}

impl Listener {
    pub(crate) fn new(key: HandleKey, address: SocketAddr, kind: Kind, inner: Arc<Inner>) -> Self {
        Self {
            key,
            address,
            kind: Some(kind),
            inner,
        }
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The primary's key for this listener's handle.
    pub fn key(&self) -> &HandleKey {
        &self.key
    }

    /// The next connection, or `Ok(None)` once the worker is stopping (and forever after).
    /// Under round-robin, taking a connection is what tells the primary it was accepted;
    /// connections not taken before the worker stops are handed to another worker.
    pub async fn accept(&mut self) -> io::Result<Option<TcpStream>> {
        loop {
            let stop = self.inner.stop_token().clone();
            if stop.is_cancelled() {
                self.close();
                return Ok(None);
            }
            match &self.kind {
                None => return Ok(None),
                Some(Kind::Socket(listener)) => {
                    tokio::select! {
                        accepted = listener.accept() => return accepted.map(|(s, _)| Some(s)),
                        () = stop.cancelled() => {}
                    }
                }
                Some(Kind::RoundRobin(queue)) => {
                    let notified = queue.notify.notified();
                    if let Some((seq, fd)) = queue.pop() {
                        let stream = std::net::TcpStream::from(fd);
                        let accepted = stream
                            .set_nonblocking(true)
                            .and_then(|()| TcpStream::from_std(stream));
                        self.inner.send_control(ToPrimary::Accepted {
                            key: self.key.clone(),
                            seq,
                            accepted: accepted.is_ok(),
                        });
                        return accepted.map(Some);
                    }
                    tokio::select! {
                        () = notified => {}
                        () = stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// While `refusing`, connections the primary hands to this listener are refused and
    /// go to another worker (Node refuses when `maxConnections` is reached). No effect on
    /// the shared and reuseport policies, where the kernel picks the acceptor.
    pub fn set_refusing(&self, refusing: bool) {
        if let Some(Kind::RoundRobin(queue)) = &self.kind {
            queue.set_refusing(refusing);
            if refusing {
                self.inner.refuse_queue(queue);
            }
        }
    }

    /// Stops listening: its index is free again, hand-offs not yet accepted go to other
    /// workers.
    fn close(&mut self) {
        let Some(kind) = self.kind.take() else {
            return;
        };
        self.inner.core().close(&self.key);
        if let Kind::RoundRobin(queue) = kind {
            queue.close();
            self.inner.refuse_queue(&queue);
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let open = self.kind.is_some();
        self.close();
        if open && !self.inner.stop_token().is_cancelled() {
            self.inner.send_control(ToPrimary::Close {
                key: self.key.clone(),
            });
        }
    }
}
