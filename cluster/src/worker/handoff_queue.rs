//! The bounded queue of round-robin hand-offs waiting for one listener's `accept`. A leaf:
//! the session fills it, the listener empties it.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

use crate::protocol::HandleKey;

/// How many hand-offs one listener holds before it refuses more. The primary has at
/// most its window ([`HANDOFF_WINDOW`](crate::protocol::HANDOFF_WINDOW)) in flight per
/// server, so a queue of the window always takes them; only a misbehaving primary
/// reaches the bound.
pub(crate) const HANDOFF_QUEUE: usize = 64;
const _: () = assert!(HANDOFF_QUEUE >= crate::protocol::HANDOFF_WINDOW);

/// The round-robin hand-offs waiting for one listener's `accept`.
#[derive(Debug)]
pub(crate) struct HandoffQueue {
    pub(crate) key: HandleKey,
    items: Mutex<VecDeque<(u64, OwnedFd)>>,
    pub(crate) notify: Notify,
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

    pub(crate) fn pop(&self) -> Option<(u64, OwnedFd)> {
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
