//! The bounded queue of round-robin hand-offs waiting for one listener's `accept`. A leaf
//! with no lock of its own: the server table (`server_table.rs`) owns every queue, so a
//! hand-off's arrival, an accept and a refusal each take the session's one lock.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::Notify;

/// How many hand-offs one listener holds before it refuses more. The primary has at
/// most its window ([`HANDOFF_WINDOW`](crate::protocol::HANDOFF_WINDOW)) in flight per
/// server, so a queue of the window always takes them; only a misbehaving primary
/// reaches the bound.
pub(crate) const HANDOFF_QUEUE: usize = 64;
const _: () = assert!(HANDOFF_QUEUE >= crate::protocol::HANDOFF_WINDOW);

/// The round-robin hand-offs waiting for one listener's `accept`, oldest first, and the
/// [`Notify`] its listener waits on (woken by whoever queued, after the lock is released).
#[derive(Debug, Default)]
pub(crate) struct HandoffQueue {
    items: VecDeque<(u64, OwnedFd)>,
    refusing: bool,
    arrived: Arc<Notify>,
}

impl HandoffQueue {
    /// What the listener waits on for the next hand-off.
    pub(crate) fn arrived(&self) -> &Arc<Notify> {
        &self.arrived
    }

    /// Queues a hand-off unless the listener refuses or the queue is full; a refused
    /// hand-off's descriptor is closed, and `false` says to refuse it to the primary.
    pub(crate) fn offer(&mut self, seq: u64, fd: OwnedFd) -> bool {
        if self.refusing || self.items.len() >= HANDOFF_QUEUE {
            return false;
        }
        self.items.push_back((seq, fd));
        true
    }

    /// The oldest hand-off.
    pub(crate) fn pop(&mut self) -> Option<(u64, OwnedFd)> {
        self.items.pop_front()
    }

    /// Empties the queue (closing the descriptors); returns the hand-offs' sequence
    /// numbers, to refuse them.
    pub(crate) fn take_all(&mut self) -> Vec<u64> {
        self.items.drain(..).map(|(seq, _fd)| seq).collect()
    }

    pub(crate) fn set_refusing(&mut self, refusing: bool) {
        self.refusing = refusing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").expect("/dev/null").into()
    }

    #[test]
    fn a_full_queue_refuses_and_pops_in_order() {
        let mut queue = HandoffQueue::default();
        for seq in 0..HANDOFF_QUEUE as u64 {
            assert!(queue.offer(seq, fd()));
        }
        assert!(!queue.offer(HANDOFF_QUEUE as u64, fd()), "full");
        assert_eq!(queue.pop().map(|(seq, _)| seq), Some(0));
        assert!(queue.offer(99, fd()), "room again");
        let rest = queue.take_all();
        assert_eq!(rest.len(), HANDOFF_QUEUE);
        assert_eq!((rest[0], rest[HANDOFF_QUEUE - 1]), (1, 99));
        assert!(queue.pop().is_none());
    }

    #[test]
    fn a_refusing_queue_takes_nothing_until_it_takes_again() {
        let mut queue = HandoffQueue::default();
        queue.set_refusing(true);
        assert!(!queue.offer(0, fd()));
        queue.set_refusing(false);
        assert!(queue.offer(1, fd()));
        assert_eq!(queue.take_all(), [1]);
    }
}
