//! What the primary tells the application: [`Event`]s, and the queue the
//! events wait in, bounded by count
//! ([`EVENT_CAPACITY`]) and by the bytes of the messages and output lines it holds
//! ([`EVENT_BYTES`]). When either is full, a new event is dropped and logged by its kind
//! and size (never its payload); the driver never waits for the application.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::Endpoint;
use std::time::Duration;

use super::stats::{ExitCause, ReloadFailure, ReloadReport};
use crate::protocol::{HandleKey, WorkerId};

/// Why a slot was given up.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlotFailure {
    /// Its workers crashed past the crash-loop limit.
    CrashLoop,
    /// Its worker could not listen for a reason that retrying will not change (the
    /// address is in use by another program, not local, or needs privileges), and then
    /// exited: restarting would only fail again.
    Listen {
        /// The primary's key of the server it asked for (`127.0.0.1:80:4:undefined:0`).
        key: HandleKey,
        /// The `bind`/`listen` errno (`EADDRINUSE`, `EADDRNOTAVAIL`, `EACCES`).
        errno: i32,
    },
}

impl std::fmt::Display for SlotFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CrashLoop => f.write_str("its workers keep crashing"),
            Self::Listen { key, errno } => {
                let error = std::io::Error::from_raw_os_error(*errno);
                write!(f, "listen on {}:{}: {error}", key.address, key.port)
            }
        }
    }
}

/// Which output stream of a worker a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// The worker's stdout.
    Stdout,
    /// The worker's stderr.
    Stderr,
}

/// Something that happened to a worker (Node's cluster events).
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
    /// A worker process was started.
    Fork {
        /// The new worker.
        id: WorkerId,
        /// Its process id.
        pid: u32,
    },
    /// The worker connected its channel and reported in.
    Online {
        /// The worker.
        id: WorkerId,
    },
    /// One of the worker's servers is listening.
    Listening {
        /// The worker.
        id: WorkerId,
        /// The bound address.
        address: Endpoint,
        /// The primary's key for the handle.
        key: HandleKey,
    },
    /// The worker said it is ready ([`Settings::wait_ready`](crate::Settings::wait_ready):
    /// Node's `process.send('ready')`, [`Worker::ready`](crate::Worker::ready)).
    Ready {
        /// The worker.
        id: WorkerId,
    },
    /// The primary refused a worker's listen (the worker was told, with the errno; a Node
    /// app may ignore it). `lasting` when retrying will not change it (the address is in
    /// use by another program, not local, or needs privileges): no worker can listen there
    /// until that changes.
    ListenFailed {
        /// The worker.
        id: WorkerId,
        /// The primary's key of the server it asked for.
        key: HandleKey,
        /// The `bind`/`listen` errno.
        errno: i32,
        /// Whether retrying will not help.
        lasting: bool,
    },
    /// A worker has not connected to its channel and reported online within
    /// [`Settings::connect_timeout`](crate::Settings::connect_timeout): its program may
    /// not speak the cluster protocol at all. It is left running.
    NotConnected {
        /// The worker.
        id: WorkerId,
        /// How long it was given.
        waited: Duration,
    },
    /// The worker's channel closed.
    Disconnect {
        /// The worker.
        id: WorkerId,
    },
    /// The worker process ended.
    Exit {
        /// The worker.
        id: WorkerId,
        /// Its exit code or signal.
        status: child::ExitStatus,
        /// Whether it ended after being asked to stop (disconnect, stop, reload, removal),
        /// Node's `worker.exitedAfterDisconnect`.
        exited_after_disconnect: bool,
        /// Why it ended.
        cause: ExitCause,
    },
    /// A user-lane message from the worker.
    Message {
        /// The worker.
        id: WorkerId,
        /// The message, still encoded.
        message: ipc::Received,
    },
    /// The worker panicked and is draining; a replacement is being started.
    GoingDown {
        /// The worker.
        id: WorkerId,
        /// The panic message.
        reason: String,
    },
    /// The worker broke the protocol (malformed or hostile frames) and was killed.
    Misbehaved {
        /// The worker.
        id: WorkerId,
        /// What it did.
        reason: String,
    },
    /// A slot is given up: it is no longer restarted.
    SlotFailed {
        /// The slot.
        slot: usize,
        /// The last worker of the slot.
        id: WorkerId,
        /// Why.
        cause: SlotFailure,
    },
    /// A rolling reload could not replace this slot's worker. The old worker keeps
    /// serving the slot (it is not given up); the reload goes on with the next slot.
    ReloadFailed {
        /// The slot.
        slot: usize,
        /// The last new worker (crashed, or stopped for not listening in time); `None`
        /// when none could even start (every fork failed).
        id: Option<WorkerId>,
        /// The old worker, still serving.
        kept: WorkerId,
        /// Why.
        reason: ReloadFailure,
    },
    /// A worker stayed above [`Settings::max_worker_rss`](crate::Settings::max_worker_rss):
    /// it is replaced like a reload replaces it (a new worker listening first), and its
    /// exit has the cause [`ExitCause::MemoryLimit`].
    MemoryLimit {
        /// The worker.
        id: WorkerId,
        /// Its slot.
        slot: usize,
        /// Its resident set size at the last sample, in bytes.
        rss_bytes: u64,
        /// The limit, in bytes.
        limit: u64,
    },
    /// A warm spare ([`Settings::warm_spares`](crate::Settings::warm_spares)) took a slot
    /// instead of a new worker: it already runs, and its servers are granted now. A new
    /// spare is started in its place.
    SparePromoted {
        /// The spare, now the slot's worker.
        id: WorkerId,
        /// The slot.
        slot: usize,
    },
    /// A rolling reload asked for ([`Primary::reload`](crate::Primary::reload), `SIGHUP`,
    /// the control socket) has ended.
    ReloadEnded {
        /// What it replaced and what it could not.
        report: ReloadReport,
    },
    /// A line a [`silent`](crate::Settings::silent) worker wrote, without its newline
    /// (lines over 64 KiB arrive in pieces). Output may still arrive after the worker's
    /// `Exit`, and like every event it is dropped when nobody reads the event queue.
    Output {
        /// The worker.
        id: WorkerId,
        /// Which stream.
        stream: OutputStream,
        /// The line, decoded as UTF-8 (invalid bytes replaced).
        line: String,
    },
}

impl Event {
    /// The event as one JSON object on one line (no newline), for programs that check
    /// what a primary did (`--log-format json` of the `cluster` command and httpd-demo):
    /// `{"ts_ms":…,"primary":PID,"event":KIND,"id":N,…}` with the event's own fields
    /// (`pid`, `address`, `status` and `asked`, `reason`, `slot`, `kept`, `errno`);
    /// `ts_ms` is the wall clock in milliseconds since the Unix epoch and `primary` this
    /// process. Events with nothing more to check are `other` with their `detail`.
    /// `None` for a worker's output line, which stays text.
    pub fn json_line(&self) -> Option<String> {
        use serde_json::{Value, json};
        let ts_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let (kind, id) = match self {
            Self::Output { .. } => return None,
            Self::Fork { id, .. }
            | Self::Online { id }
            | Self::Listening { id, .. }
            | Self::Ready { id }
            | Self::Disconnect { id }
            | Self::Exit { id, .. }
            | Self::GoingDown { id, .. }
            | Self::Misbehaved { id, .. }
            | Self::SlotFailed { id, .. }
            | Self::NotConnected { id, .. }
            | Self::ListenFailed { id, .. }
            | Self::Message { id, .. } => (self.kind(), Some(*id)),
            Self::ReloadFailed { id, .. } => (self.kind(), *id),
            _ => ("other", None),
        };
        let mut line = json!({"ts_ms": ts_ms, "primary": std::process::id(), "event": kind});
        let fields = line.as_object_mut()?;
        if let Some(id) = id {
            fields.insert("id".into(), id.get().into());
        }
        let mut put = |key: &str, value: Value| drop(fields.insert(key.into(), value));
        match self {
            Self::Fork { pid, .. } => put("pid", (*pid).into()),
            Self::Listening { address, .. } => put("address", address.to_string().into()),
            Self::Exit {
                status,
                exited_after_disconnect,
                ..
            } => {
                put("status", status.to_string().into());
                put("asked", (*exited_after_disconnect).into());
            }
            Self::GoingDown { reason, .. } | Self::Misbehaved { reason, .. } => {
                put("reason", reason.clone().into());
            }
            Self::SlotFailed { slot, cause, .. } => {
                put("slot", (*slot).into());
                put("reason", cause.to_string().into());
            }
            Self::ReloadFailed {
                slot, kept, reason, ..
            } => {
                put("slot", (*slot).into());
                put("kept", kept.get().into());
                put("reason", format!("{reason:?}").into());
            }
            Self::ListenFailed { errno, .. } => put("errno", (*errno).into()),
            _ if kind == "other" => put("detail", format!("{self:?}").into()),
            _ => {}
        }
        Some(line.to_string())
    }

    /// The event's name, for logs (`"exit"`, `"message"`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fork { .. } => "fork",
            Self::Online { .. } => "online",
            Self::Ready { .. } => "ready",
            Self::ListenFailed { .. } => "listen-failed",
            Self::NotConnected { .. } => "not-connected",
            Self::Listening { .. } => "listening",
            Self::Disconnect { .. } => "disconnect",
            Self::Exit { .. } => "exit",
            Self::Message { .. } => "message",
            Self::GoingDown { .. } => "going-down",
            Self::Misbehaved { .. } => "misbehaved",
            Self::SlotFailed { .. } => "slot-failed",
            Self::ReloadFailed { .. } => "reload-failed",
            Self::MemoryLimit { .. } => "memory-limit",
            Self::SparePromoted { .. } => "spare-promoted",
            Self::ReloadEnded { .. } => "reload-ended",
            Self::Output { .. } => "output",
        }
    }
}

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
    /// How many events were dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped
    }

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

    #[test]
    fn an_event_is_one_line_of_json_with_its_fields_escaped() {
        let reason = "a \"quoted\" \\ reason\nover two lines\u{1}".to_owned();
        let line = Event::GoingDown {
            id: crate::WorkerId(3),
            reason: reason.clone(),
        }
        .json_line()
        .expect("a line");
        assert!(!line.contains('\n'), "{line}");
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["event"], "going-down");
        assert_eq!(value["id"], 3);
        assert_eq!(value["reason"], reason.as_str());
        assert_eq!(value["primary"], std::process::id());
        assert!(value["ts_ms"].as_u64().is_some_and(|ts| ts > 0));
        let exit = Event::Exit {
            id: crate::WorkerId(4),
            status: child::ExitStatus::Exited(0),
            exited_after_disconnect: true,
            cause: ExitCause::Asked,
        }
        .json_line()
        .expect("a line");
        let exit: serde_json::Value = serde_json::from_str(&exit).expect("JSON");
        assert_eq!(
            (&exit["status"], &exit["asked"]),
            (&"exit code 0".into(), &true.into())
        );
        let output = Event::Output {
            id: crate::WorkerId(4),
            stream: OutputStream::Stdout,
            line: "text".into(),
        };
        assert_eq!(output.json_line(), None, "worker output stays text");
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
