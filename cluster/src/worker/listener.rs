//! A worker's [`Listener`] and, under round-robin, the bounded queue of hand-offs that
//! wait for its `accept`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::link::Inner;
use crate::protocol::{HandleKey, ToPrimary};

/// How many hand-offs one listener holds before it refuses more (the primary sends one
/// at a time, so only a misbehaving primary reaches it).
pub(crate) const HANDOFF_QUEUE: usize = 64;

/// The round-robin hand-offs waiting for one listener's `accept`.
#[derive(Debug)]
pub(crate) struct HandoffQueue {
    pub(crate) key: HandleKey,
    items: Mutex<VecDeque<(u64, OwnedFd)>>,
    notify: Notify,
    refusing: AtomicBool,
    closed: AtomicBool,
}

impl HandoffQueue {
    pub(crate) fn new(key: HandleKey) -> Self {
        Self {
            key,
            items: Mutex::default(),
            notify: Notify::new(),
            refusing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, OwnedFd)>> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a new hand-off is taken: open, not refusing, with room.
    pub(crate) fn takes(&self) -> bool {
        !self.closed.load(Ordering::SeqCst)
            && !self.refusing.load(Ordering::SeqCst)
            && self.items().len() < HANDOFF_QUEUE
    }

    pub(crate) fn push(&self, seq: u64, fd: OwnedFd) {
        self.items().push_back((seq, fd));
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<(u64, OwnedFd)> {
        self.items().pop_front()
    }

    /// Empties the queue (closing the descriptors); returns the hand-offs' sequence
    /// numbers, to refuse them.
    pub(crate) fn take_all(&self) -> Vec<u64> {
        self.items().drain(..).map(|(seq, _fd)| seq).collect()
    }

    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }
}

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

    /// Stops listening: hand-offs not yet accepted go to other workers.
    fn close(&mut self) {
        if let Some(Kind::RoundRobin(queue)) = self.kind.take() {
            queue.close();
            self.inner.core().close(&self.key);
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
