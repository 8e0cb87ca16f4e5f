//! The worker's session with the primary ([`Session`]: the control queue, the user-lane
//! sender, the stop state and the server table behind one mutex), the writer of control
//! messages, and the read loop that feeds the primary's frames to the table and performs
//! what it decides.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::StopReason;
use super::messages::UserQueue;
use super::server_table::ServerTable;
use crate::protocol::{HandleKey, ToPrimary, ToWorker};

/// How many control messages wait for the writer. By the protocol a worker has at most
/// a query and a window of `Accepted` replies per server in flight plus a few one-offs,
/// so a full queue means the primary stopped reading: the session counts as broken.
pub(crate) const CONTROL_QUEUE: usize =
    (1 + crate::protocol::HANDOFF_WINDOW) * crate::protocol::MAX_SERVERS_PER_WORKER + 8;

/// What the worker's handles (the `Worker`, its listeners, the panic hook) share: the way
/// to the primary, the stop state, and the [`ServerTable`]. Every operation takes the
/// table's lock once, and sends and wakes only after releasing it.
#[derive(Debug)]
pub(crate) struct Session {
    control: mpsc::Sender<ToPrimary>,
    pub(crate) sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    stop: CancellationToken,
    reason: OnceLock<StopReason>,
    pub(crate) panicked: AtomicBool,
    table: Mutex<ServerTable>,
    dropped_control: AtomicU64,
}

impl Session {
    pub(crate) fn new(
        control: mpsc::Sender<ToPrimary>,
        sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    ) -> Self {
        Self {
            control,
            sender,
            stop: CancellationToken::new(),
            reason: OnceLock::new(),
            panicked: AtomicBool::new(false),
            table: Mutex::default(),
            dropped_control: AtomicU64::new(0),
        }
    }

    /// Queues a control message for the primary, from any context (a `Drop`, the panic
    /// hook). A full queue means the primary no longer reads: the worker stops.
    pub(crate) fn send_control(&self, message: ToPrimary) {
        match self.control.try_send(message) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                let dropped = self.dropped_control.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::error!(?message, dropped, "the primary does not read its channel");
                self.stop(StopReason::PrimaryGone);
            }
        }
    }

    /// The table, locked. Hold the guard for one statement: never across an await, a
    /// send or a wake.
    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, ServerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the worker for `reason` (the first reason stands): no new hand-off is taken;
    /// those held already are still accepted, or refused if their listener is dropped.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        let stopped = self.table().stop();
        self.stop.cancel();
        for arrived in stopped.woken {
            arrived.notify_waiters();
        }
    }

    pub(crate) fn stop_token(&self) -> &CancellationToken {
        &self.stop
    }

    /// Why the worker stops, once it does.
    pub(crate) fn stop_reason(&self) -> Option<StopReason> {
        self.stop
            .is_cancelled()
            .then(|| self.reason.get().copied())
            .flatten()
    }

    /// The server of `key` closed (or its listen failed): frees its index and refuses the
    /// hand-offs it held. Returns whether the worker is stopping.
    pub(crate) fn close(&self, key: &HandleKey) -> bool {
        let (held, stopping) = {
            let mut table = self.table();
            (table.close(key), table.is_stopping())
        };
        self.refuse(key, held);
        stopping
    }

    /// Tells the primary these hand-offs on `key` were not taken.
    pub(crate) fn refuse(&self, key: &HandleKey, seqs: impl IntoIterator<Item = u64>) {
        for seq in seqs {
            self.send_control(ToPrimary::Accepted {
                key: key.clone(),
                seq,
                accepted: false,
            });
        }
    }

    /// One frame of hand-offs on `key`: into its listener's queue, or refused (no
    /// listener, stopping, full, or a descriptor lost on the way).
    fn hand_off(
        &self,
        key: &HandleKey,
        handoffs: impl IntoIterator<Item = (u64, Option<OwnedFd>)>,
    ) {
        let taken = self.table().take_handoffs(key, handoffs);
        if let Some(arrived) = taken.arrived {
            arrived.notify_one();
        }
        self.refuse(key, taken.refused);
    }
}

/// Writes control messages to the primary in order; those queued together (the
/// `Accepted`s of hand-offs that came in one frame, say) go in one write.
pub(crate) async fn write_control(
    sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    mut rx: mpsc::Receiver<ToPrimary>,
) {
    while let Some(mut message) = rx.recv().await {
        let mut sender = sender.lock().await;
        let written = loop {
            if let Err(e) = sender.feed(ipc::Lane::Control, &message, Vec::new()).await {
                break Err(e);
            }
            match rx.try_recv() {
                Ok(next) => message = next,
                Err(_) => break sender.flush().await,
            }
        };
        if let Err(e) = written {
            tracing::debug!(error = %e, "channel to the primary closed");
            return;
        }
    }
}

/// Reads the primary's frames until the channel ends, then stops the worker with
/// [`StopReason::PrimaryGone`] (a library never exits the process).
pub(crate) async fn read_loop(
    mut receiver: ipc::Receiver,
    session: Arc<Session>,
    user: Arc<UserQueue>,
) {
    loop {
        let mut message = match receiver.recv().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "channel to the primary failed");
                break;
            }
        };
        if message.lane() == ipc::Lane::User {
            user.push(message);
            continue;
        }
        match message.decode::<ToWorker>() {
            Ok(ToWorker::QueryReply { seq, result }) => {
                let fd = message.take_fds().pop();
                let given_back = session.table().on_reply(seq, result, fd);
                if let Some(key) = given_back {
                    // The listen was dropped before its reply: give the server back.
                    session.send_control(ToPrimary::Close { key });
                }
            }
            Ok(ToWorker::NewConn { key, seq }) => {
                let fd = message.take_fds().pop();
                warn_if_lost(&key, usize::from(fd.is_none()), message.fds_lost());
                session.hand_off(&key, [(seq, fd)]);
            }
            Ok(ToWorker::NewConns { key, seqs }) => {
                let fds = message.take_fds();
                let missing = seqs.len().saturating_sub(fds.len());
                warn_if_lost(&key, missing, message.fds_lost());
                let fds = fds
                    .into_iter()
                    .map(Some)
                    .chain(std::iter::repeat_with(|| None));
                session.hand_off(&key, seqs.into_iter().zip(fds));
            }
            Ok(ToWorker::Disconnect) => session.stop(StopReason::Disconnected),
            Err(e) => tracing::warn!(error = %e, "ignoring an undecodable control message"),
        }
    }
    user.close();
    session.stop(StopReason::PrimaryGone);
}

/// Descriptors of a frame were lost on the way (this process is out of them): its
/// hand-offs without one are refused.
fn warn_if_lost(key: &HandleKey, missing: usize, fds_lost: bool) {
    if fds_lost && missing > 0 {
        tracing::warn!(%key, missing, "out of descriptors: refusing hand-offs");
    }
}
