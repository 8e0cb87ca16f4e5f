//! The user messages from the primary that wait for [`crate::Worker::recv`]: a bounded
//! queue that drops the oldest when full, so a worker that never reads them keeps at most
//! [`USER_QUEUE_CAPACITY`] messages and [`USER_QUEUE_BYTES`] bytes (and always the newest
//! one), and its control lane (hand-offs, disconnect) never waits behind them.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// How many unread user messages a worker keeps; past it the oldest is dropped (and
/// counted, see [`crate::Worker::dropped_messages`]).
pub const USER_QUEUE_CAPACITY: usize = 1024;

/// How many bytes of unread user messages a worker keeps (16 MiB, one message of the
/// largest frame); past it the oldest are dropped, never the newest.
pub const USER_QUEUE_BYTES: usize = 16 << 20;

#[derive(Debug, Default)]
struct State {
    items: VecDeque<ipc::Received>,
    bytes: usize,
    dropped: u64,
    closed: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct UserQueue {
    state: Mutex<State>,
    notify: Notify,
}

impl UserQueue {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a message, dropping the oldest while the queue is over either bound (never
    /// the message just queued).
    pub(crate) fn push(&self, message: ipc::Received) {
        let mut state = self.state();
        state.bytes += message.payload().len();
        state.items.push_back(message);
        while state.items.len() > 1
            && (state.items.len() > USER_QUEUE_CAPACITY || state.bytes > USER_QUEUE_BYTES)
        {
            if let Some(oldest) = state.items.pop_front() {
                state.bytes -= oldest.payload().len();
            }
            state.dropped += 1;
            if state.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = state.dropped,
                    "user messages not read, dropping the oldest"
                );
            }
        }
        drop(state);
        self.notify.notify_one();
    }

    /// No message will come any more (the channel ended).
    pub(crate) fn close(&self) {
        self.state().closed = true;
        self.notify.notify_waiters();
    }

    /// The oldest message, waiting for one; `None` once closed and empty.
    pub(crate) async fn pop(&self) -> Option<ipc::Received> {
        loop {
            let notified = self.notify.notified();
            {
                let mut state = self.state();
                if let Some(message) = state.items.pop_front() {
                    state.bytes -= message.payload().len();
                    return Some(message);
                }
                if state.closed {
                    return None;
                }
            }
            notified.await;
        }
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.state().dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn large_unread_messages_are_bounded_by_bytes_and_the_newest_is_kept() {
        let (mut a, mut b) = ipc::Channel::pair().expect("pair");
        let queue = UserQueue::default();
        // 5 MiB each (with postcard's prefix): 3 fit in 16 MiB.
        for n in 0..10u8 {
            // Sent and received together: one message is larger than the socket's buffer.
            let big = vec![n; (5 << 20) - 16];
            let (sent, received) = tokio::join!(a.send(&big), b.recv());
            sent.expect("send");
            queue.push(received.expect("recv").expect("message"));
        }
        queue.close();
        assert_eq!(queue.dropped(), 7);
        let mut kept = Vec::new();
        while let Some(message) = queue.pop().await {
            kept.push(message.decode::<Vec<u8>>().expect("decode")[0]);
        }
        assert_eq!(kept, [7, 8, 9]);
        assert_eq!(queue.state().bytes, 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_drops_the_oldest_and_counts_it() {
        let (mut a, mut b) = ipc::Channel::pair().expect("pair");
        let queue = UserQueue::default();
        let total = USER_QUEUE_CAPACITY + 10;
        for n in 0..total {
            a.send(&n).await.expect("send");
            queue.push(b.recv().await.expect("recv").expect("message"));
        }
        queue.close();
        assert_eq!(queue.dropped(), 10);
        let mut kept = Vec::new();
        while let Some(message) = queue.pop().await {
            kept.push(message.decode::<usize>().expect("decode"));
        }
        assert_eq!(
            kept,
            (10..total).collect::<Vec<_>>(),
            "the newest are kept in order"
        );
    }
}
