//! The bounded queue of events from the driver to the application: bounded by count
//! ([`EVENT_CAPACITY`]) and by the bytes of the messages and output lines it holds
//! ([`EVENT_BYTES`]). When either is full, a new event is dropped and logged by its kind
//! and size (never its payload); the driver never waits for the application.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use super::Event;

/// How many events wait for a reader before later ones are dropped (and logged).
pub const EVENT_CAPACITY: usize = 4096;

/// How many bytes of worker messages and output lines wait for a reader before later
/// ones are dropped (and logged): 64 MiB.
pub const EVENT_BYTES: usize = 64 << 20;

/// The bytes an event holds on to while queued.
fn weight(event: &Event) -> usize {
    match event {
        Event::Message { message, .. } => message.payload().len(),
        Event::Output { line, .. } => line.len(),
        _ => 0,
    }
}

/// Whether an event of `size` bytes fits when `queued` bytes wait already. An event that
/// holds nothing always fits (the count bound still applies).
fn admits(queued: usize, size: usize) -> bool {
    size == 0 || queued.saturating_add(size) <= EVENT_BYTES
}

/// The driver's end.
#[derive(Debug)]
pub(crate) struct EventQueue {
    tx: mpsc::Sender<Event>,
    bytes: Arc<AtomicUsize>,
    dropped: u64,
}

/// The primary's event stream, taken with [`Primary::take_events`](crate::Primary::take_events)
/// to read it from another task.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
    bytes: Arc<AtomicUsize>,
}

/// A new queue: the driver's end and the application's.
pub(crate) fn queue() -> (EventQueue, Events) {
    let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
    let bytes = Arc::new(AtomicUsize::new(0));
    let events = Events {
        rx,
        bytes: Arc::clone(&bytes),
    };
    let queue = EventQueue {
        tx,
        bytes,
        dropped: 0,
    };
    (queue, events)
}

impl EventQueue {
    /// Queues `event`, or drops it (with a log line) when the queue is full.
    pub(crate) fn push(&mut self, event: Event) {
        let size = weight(&event);
        // One producer: what is checked here only shrinks until the add below.
        let full = !admits(self.bytes.load(Ordering::Acquire), size);
        let refused = if full {
            Some(event)
        } else {
            self.bytes.fetch_add(size, Ordering::AcqRel);
            match self.tx.try_send(event) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.bytes.fetch_sub(size, Ordering::AcqRel);
                    Some(event)
                }
                // Nobody reads any more (the application dropped its end): nothing to tell.
                Err(mpsc::error::TrySendError::Closed(event)) => {
                    self.bytes.fetch_sub(size, Ordering::AcqRel);
                    drop(event);
                    None
                }
            }
        };
        if let Some(event) = refused {
            self.dropped += 1;
            tracing::warn!(
                dropped = self.dropped,
                kind = event.kind(),
                bytes = size,
                "event queue full, event dropped"
            );
        }
    }
}

impl Events {
    /// The next event, or `None` once the primary has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        self.bytes.fetch_sub(weight(&event), Ordering::AcqRel);
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_bound_what_waits_but_never_an_event_that_holds_nothing() {
        assert!(admits(0, EVENT_BYTES));
        assert!(!admits(1, EVENT_BYTES));
        assert!(admits(EVENT_BYTES - 10, 10));
        assert!(!admits(EVENT_BYTES - 10, 11));
        assert!(
            admits(usize::MAX, 0),
            "exits and the like always fit the byte bound"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn unread_messages_are_dropped_past_the_byte_bound_and_reading_frees_room() {
        let (mut queue, mut events) = queue();
        let (mut a, mut b) = ipc::Channel::pair().expect("pair");
        // 8 MiB in all with postcard's length prefix: 8 fit in 64 MiB.
        let big = vec![7u8; (8 << 20) - 16];
        let message = |b: ipc::Received| Event::Message {
            id: crate::WorkerId(1),
            message: b,
        };
        for _ in 0..12 {
            // Sent and received together: one message is larger than the socket's buffer.
            let (sent, received) = tokio::join!(a.send(&big), b.recv());
            sent.expect("send");
            queue.push(message(received.expect("recv").expect("message")));
        }
        // 8 of 8 MiB fit in 64 MiB; the other 4 were dropped; an exit still fits.
        queue.push(Event::Disconnect {
            id: crate::WorkerId(1),
        });
        assert_eq!(queue.dropped, 4);
        let mut kept = 0;
        for _ in 0..8 {
            assert!(matches!(events.recv().await, Some(Event::Message { .. })));
            kept += 1;
        }
        assert!(matches!(
            events.recv().await,
            Some(Event::Disconnect { .. })
        ));
        assert_eq!((kept, events.bytes.load(Ordering::Acquire)), (8, 0));
    }
}
