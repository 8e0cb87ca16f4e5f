//! The user messages from the primary that wait for [`crate::Worker::recv`]: a bounded
//! queue that drops the oldest when full, so a worker that never reads them keeps at most
//! [`USER_QUEUE_CAPACITY`] and its control lane (hand-offs, disconnect) never waits
//! behind them.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::Notify;

/// How many unread user messages a worker keeps; past it the oldest is dropped (and
/// counted, see [`crate::Worker::dropped_messages`]).
pub const USER_QUEUE_CAPACITY: usize = 1024;

#[derive(Debug, Default)]
struct State {
    items: VecDeque<ipc::Received>,
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

    /// Queues a message, dropping the oldest if the queue is full.
    pub(crate) fn push(&self, message: ipc::Received) {
        let mut state = self.state();
        if state.items.len() == USER_QUEUE_CAPACITY {
            state.items.pop_front();
            state.dropped += 1;
            if state.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = state.dropped,
                    "user messages not read, dropping the oldest"
                );
            }
        }
        state.items.push_back(message);
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
