//! The worker's session with the primary: a pure core ([`ServerTable`]: which listen
//! waits for which reply, which hand-off goes to which listener, when to refuse), what the
//! worker's handles share ([`Session`]), and the read loop that feeds the table frames and
//! performs what it decides.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::StopReason;
use super::handoff_queue::HandoffQueue;
use super::messages::UserQueue;
use crate::Endpoint;
use crate::protocol::{AddressFamily, Granted, HandleKey, ToPrimary, ToWorker};

/// How many control messages wait for the writer. By the protocol a worker has at most
/// a query and a window of `Accepted` replies per server in flight plus a few one-offs,
/// so a full queue means the primary stopped reading: the session counts as broken.
pub(crate) const CONTROL_QUEUE: usize =
    (1 + crate::protocol::HANDOFF_WINDOW) * crate::protocol::MAX_SERVERS_PER_WORKER + 8;

/// What a `listen` waiting for the primary gets back.
#[derive(Debug)]
pub(crate) struct QueryAnswer {
    pub(crate) result: Result<(Granted, Endpoint), i32>,
    pub(crate) fd: Option<OwnedFd>,
    pub(crate) queue: Option<Arc<HandoffQueue>>,
}

/// What the table decides about a hand-off.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandoffDecision {
    /// Queue it for the listener of this key.
    Deliver,
    /// Refuse it: the primary gives it to another worker.
    Refuse,
}

/// The indexes of one `address:port:family`, as Node keeps them: each listen takes the
/// next; a close frees its own, and once none is live the count starts again at 0.
#[derive(Debug, Default)]
struct Indexes {
    next: u32,
    live: std::collections::BTreeSet<u32>,
}

/// The worker's servers as the protocol sees them: sequence numbers, Node's handle
/// indexes, and which keys have a listener. No I/O, no locks; [`Session`] keeps it behind a mutex.
#[derive(Debug, Default)]
pub(crate) struct ServerTable {
    next_seq: u64,
    /// Node's handle indexes per `address:port:family`: the next index and the live ones.
    indexes: HashMap<(String, u16, AddressFamily), Indexes>,
    /// Queries waiting for their reply: seq -> key.
    queries: HashMap<u64, HandleKey>,
    /// Round-robin listeners, by key.
    listeners: HashMap<HandleKey, Arc<HandoffQueue>>,
}

impl ServerTable {
    /// The key and sequence number of a new listen on `address` (Node's index: how many
    /// earlier listens of this worker share address, port and family).
    pub(crate) fn new_listen(&mut self, address: SocketAddr) -> (HandleKey, u64) {
        let family = AddressFamily::of(&address);
        let ip = address.ip().to_string();
        let indexes = self
            .indexes
            .entry((ip.clone(), address.port(), family))
            .or_default();
        let index = indexes.next;
        indexes.next += 1;
        indexes.live.insert(index);
        let key = HandleKey {
            address: ip,
            port: address.port(),
            family,
            fd: None,
            index,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        (key, seq)
    }

    /// Records that the listen `seq` on `key` waits for the primary.
    pub(crate) fn await_reply(&mut self, seq: u64, key: HandleKey) {
        self.queries.insert(seq, key);
    }

    /// A reply arrived: the key it answers, if a listen waits for it. A round-robin grant
    /// registers the listener's queue before any hand-off for it is read.
    pub(crate) fn on_reply(
        &mut self,
        seq: u64,
        result: &Result<(Granted, Endpoint), i32>,
    ) -> Option<(HandleKey, Option<Arc<HandoffQueue>>)> {
        let key = self.queries.remove(&seq)?;
        let queue = matches!(result, Ok((Granted::RoundRobin, _))).then(|| {
            let queue = Arc::new(HandoffQueue::new(key.clone()));
            self.listeners.insert(key.clone(), Arc::clone(&queue));
            queue
        });
        Some((key, queue))
    }

    /// Whether a hand-off for `key` is taken: only by an open listener that is not
    /// refusing and has room, while the worker is not stopping, with its descriptor.
    pub(crate) fn on_handoff(
        &self,
        key: &HandleKey,
        has_fd: bool,
        stopping: bool,
    ) -> HandoffDecision {
        match self.listeners.get(key) {
            Some(queue) if has_fd && !stopping && queue.takes() => HandoffDecision::Deliver,
            _ => HandoffDecision::Refuse,
        }
    }

    pub(crate) fn listener(&self, key: &HandleKey) -> Option<Arc<HandoffQueue>> {
        self.listeners.get(key).cloned()
    }

    /// The server of `key` closed (or its listen failed): its hand-offs stop and its index
    /// is free again (Node's `removeIndexesKey`).
    pub(crate) fn close(&mut self, key: &HandleKey) {
        self.listeners.remove(key);
        let family_key = (key.address.clone(), key.port, key.family);
        if let Some(indexes) = self.indexes.get_mut(&family_key) {
            indexes.live.remove(&key.index);
            if indexes.live.is_empty() {
                self.indexes.remove(&family_key);
            }
        }
    }

    /// Every listener, to refuse what they hold when the worker stops.
    pub(crate) fn listeners(&self) -> Vec<Arc<HandoffQueue>> {
        self.listeners.values().cloned().collect()
    }
}

/// What the worker's handles share: the way to the primary and the stop state.
#[derive(Debug)]
pub(crate) struct Session {
    control: mpsc::Sender<ToPrimary>,
    pub(crate) sender: Arc<tokio::sync::Mutex<ipc::Sender>>,
    stop: CancellationToken,
    reason: OnceLock<StopReason>,
    pub(crate) panicked: AtomicBool,
    table: Mutex<ServerTable>,
    /// Answers for listens waiting on the primary.
    answers: Mutex<HashMap<u64, oneshot::Sender<QueryAnswer>>>,
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
            answers: Mutex::default(),
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

    pub(crate) fn table(&self) -> std::sync::MutexGuard<'_, ServerTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn answers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<QueryAnswer>>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops the worker for `reason` (the first reason stands) and refuses every
    /// hand-off not yet accepted.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.stop.cancel();
        let listeners = self.table().listeners();
        for queue in listeners {
            queue.close();
            self.refuse_queue(&queue);
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

    /// Refuses the hand-offs a listener holds.
    pub(crate) fn refuse_queue(&self, queue: &HandoffQueue) {
        for seq in queue.take_all() {
            self.send_control(ToPrimary::Accepted {
                key: queue.key.clone(),
                seq,
                accepted: false,
            });
        }
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

/// One connection handed over on `key`: into its listener's queue, or refused (no
/// listener, stopping, full, or its descriptor lost on the way).
fn hand_off(session: &Session, key: HandleKey, seq: u64, fd: Option<OwnedFd>, fds_lost: bool) {
    if fds_lost && fd.is_none() {
        tracing::warn!(%key, "out of descriptors: refusing a hand-off");
    }
    let stopping = session.stop_token().is_cancelled();
    let (decision, queue) = {
        let table = session.table();
        (
            table.on_handoff(&key, fd.is_some(), stopping),
            table.listener(&key),
        )
    };
    match (decision, fd, queue) {
        (HandoffDecision::Deliver, Some(fd), Some(queue)) => queue.push(seq, fd),
        _ => session.send_control(ToPrimary::Accepted {
            key,
            seq,
            accepted: false,
        }),
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
                let Some((key, queue)) = session.table().on_reply(seq, &result) else {
                    continue;
                };
                let granted = result.is_ok();
                let abandoned = match session.answers().remove(&seq) {
                    Some(answer) => answer.send(QueryAnswer { result, fd, queue }).is_err(),
                    None => true,
                };
                if abandoned {
                    // The listen was dropped before its reply: give the server back.
                    session.table().close(&key);
                    if granted {
                        session.send_control(ToPrimary::Close { key });
                    }
                }
            }
            Ok(ToWorker::NewConn { key, seq }) => {
                let fd = message.take_fds().pop();
                hand_off(&session, key, seq, fd, message.fds_lost());
            }
            Ok(ToWorker::NewConns { key, seqs }) => {
                let mut fds = message.take_fds().into_iter();
                for seq in seqs {
                    hand_off(&session, key.clone(), seq, fds.next(), message.fds_lost());
                }
            }
            Ok(ToWorker::Disconnect) => session.stop(StopReason::Disconnected),
            Err(e) => tracing::warn!(error = %e, "ignoring an undecodable control message"),
        }
    }
    user.close();
    session.stop(StopReason::PrimaryGone);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    #[test]
    fn listens_count_their_index_per_address() {
        let mut table = ServerTable::default();
        let (a, s0) = table.new_listen(addr("127.0.0.1:0"));
        let (b, s1) = table.new_listen(addr("127.0.0.1:0"));
        let (c, _) = table.new_listen(addr("127.0.0.1:80"));
        assert_eq!((a.index, b.index, c.index), (0, 1, 0));
        assert_ne!(s0, s1);
        assert_eq!(b.to_string(), "127.0.0.1:0:4:undefined:1");
    }

    #[test]
    fn a_closed_index_is_freed_and_the_count_restarts_once_none_is_live() {
        let mut table = ServerTable::default();
        let (a, _) = table.new_listen(addr("127.0.0.1:8080"));
        let (b, _) = table.new_listen(addr("127.0.0.1:8080"));
        table.close(&a);
        let (c, _) = table.new_listen(addr("127.0.0.1:8080"));
        assert_eq!((a.index, b.index, c.index), (0, 1, 2), "b is still live");
        table.close(&b);
        table.close(&c);
        let (d, _) = table.new_listen(addr("127.0.0.1:8080"));
        assert_eq!(d, a, "listen, close, listen: the same key again");
    }

    #[test]
    fn a_reply_nobody_waits_for_is_ignored_and_a_grant_registers_the_listener() {
        let mut table = ServerTable::default();
        let (key, seq) = table.new_listen(addr("127.0.0.1:0"));
        let granted = Ok((Granted::RoundRobin, addr("127.0.0.1:5000").into()));
        assert!(table.on_reply(seq, &granted).is_none(), "not awaited");
        table.await_reply(seq, key.clone());
        let (answered, queue) = table.on_reply(seq, &granted).expect("awaited");
        assert_eq!(answered, key);
        assert!(queue.is_some());
        assert_eq!(
            table.on_handoff(&key, true, false),
            HandoffDecision::Deliver
        );
        assert!(table.on_reply(seq, &granted).is_none(), "answered once");
    }

    #[test]
    fn a_whole_window_of_hand_offs_is_delivered_before_any_accept() {
        let mut table = ServerTable::default();
        let (key, seq) = table.new_listen(addr("127.0.0.1:0"));
        table.await_reply(seq, key.clone());
        table.on_reply(seq, &Ok((Granted::RoundRobin, addr("127.0.0.1:1").into())));
        let queue = table.listener(&key).expect("listener");
        for seq in 0..crate::protocol::HANDOFF_WINDOW as u64 {
            assert_eq!(
                table.on_handoff(&key, true, false),
                HandoffDecision::Deliver
            );
            let fd = std::fs::File::open("/dev/null").expect("/dev/null");
            queue.push(seq, fd.into());
        }
        let seqs: Vec<u64> = std::iter::from_fn(|| queue.pop().map(|(seq, _)| seq)).collect();
        assert_eq!(
            seqs,
            (0..crate::protocol::HANDOFF_WINDOW as u64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn hand_offs_are_refused_unless_a_listener_can_take_them() {
        let mut table = ServerTable::default();
        let (key, seq) = table.new_listen(addr("127.0.0.1:0"));
        let other = HandleKey {
            index: 9,
            ..key.clone()
        };
        table.await_reply(seq, key.clone());
        table.on_reply(seq, &Ok((Granted::RoundRobin, addr("127.0.0.1:1").into())));
        assert_eq!(
            table.on_handoff(&other, true, false),
            HandoffDecision::Refuse
        );
        assert_eq!(
            table.on_handoff(&key, false, false),
            HandoffDecision::Refuse
        );
        assert_eq!(table.on_handoff(&key, true, true), HandoffDecision::Refuse);
        table.listener(&key).expect("listener").set_refusing(true);
        assert_eq!(table.on_handoff(&key, true, false), HandoffDecision::Refuse);
        table.close(&key);
        assert_eq!(table.on_handoff(&key, true, false), HandoffDecision::Refuse);
    }
}
