//! The worker's servers as its protocol with the primary sees them, a pure core
//! ([`ServerTable`]): Node's handle indexes, the listens waiting for their reply (with the
//! way to answer them), the round-robin listeners and their hand-off queues, and whether
//! the worker stops. No I/O and no clock; the session (`session.rs`) keeps it behind its
//! one mutex, so every worker operation (a listen, a reply, a frame of hand-offs, an
//! accept, a refusal, a close, a stop) takes that lock once and decides everything under it.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::sync::{Notify, oneshot};

use super::handoff_queue::HandoffQueue;
use crate::Endpoint;
use crate::protocol::{AddressFamily, Granted, HandleKey};

/// What a `listen` waiting for the primary gets back.
#[derive(Debug)]
pub(crate) struct QueryAnswer {
    pub(crate) result: Result<(Granted, Endpoint), i32>,
    pub(crate) fd: Option<OwnedFd>,
    /// Under round-robin, what its listener waits on: the table holds its queue.
    pub(crate) arrived: Option<Arc<Notify>>,
}

/// A listen waiting for the primary's reply: its key, and where its answer goes.
#[derive(Debug)]
struct PendingQuery {
    key: HandleKey,
    answer: oneshot::Sender<QueryAnswer>,
}

/// The indexes of one `address:port:family`, as Node keeps them: each listen takes the
/// next; a close frees its own, and once none is live the count starts again at 0.
#[derive(Debug, Default)]
struct Indexes {
    next: u32,
    live: BTreeSet<u32>,
}

/// What became of a frame of hand-offs: the listener to wake if any was queued, and
/// the sequence numbers to refuse (the primary gives them to another worker).
#[derive(Debug, Default)]
pub(crate) struct TakenHandoffs {
    pub(crate) arrived: Option<Arc<Notify>>,
    pub(crate) refused: Vec<u64>,
}

/// What a round-robin listener's `accept` finds.
#[derive(Debug)]
pub(crate) enum Popped {
    /// A connection handed over, with its sequence number.
    Connection(u64, OwnedFd),
    /// Nothing yet: wait for the listener's [`Notify`].
    Empty,
    /// The worker stops (or the listener is gone): no more connections.
    Closed,
}

/// What stopping leaves to do: listeners to wake.
#[derive(Debug, Default)]
pub(crate) struct Stopped {
    pub(crate) woken: Vec<Arc<Notify>>,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct ServerTable {
    next_seq: u64,
    /// Node's handle indexes per `address:port:family`: the next index and the live ones.
    indexes: HashMap<(String, u16, AddressFamily), Indexes>,
    /// Listens waiting for their reply, by sequence number.
    queries: HashMap<u64, PendingQuery>,
    /// Round-robin listeners' hand-off queues, by key.
    listeners: HashMap<HandleKey, HandoffQueue>,
    /// Set once the worker stops: no new listen, no new hand-off (those held are served).
    stopping: bool,
}

impl ServerTable {
    /// The key of a new listen on `address` (Node's index: how many earlier listens of
    /// this worker share address, port and family), bound in this worker; `None` once the
    /// worker stops.
    pub(crate) fn listen_exclusive(&mut self, address: SocketAddr) -> Option<HandleKey> {
        (!self.stopping).then(|| self.new_key(address))
    }

    /// The key and sequence number of a new listen on `address` that asks the primary;
    /// its reply goes to `answer`. `None` once the worker stops.
    pub(crate) fn query(
        &mut self,
        address: SocketAddr,
        answer: oneshot::Sender<QueryAnswer>,
    ) -> Option<(HandleKey, u64)> {
        if self.stopping {
            return None;
        }
        let key = self.new_key(address);
        let seq = self.next_seq;
        self.next_seq += 1;
        let pending = PendingQuery {
            key: key.clone(),
            answer,
        };
        self.queries.insert(seq, pending);
        Some((key, seq))
    }

    fn new_key(&mut self, address: SocketAddr) -> HandleKey {
        let family = AddressFamily::of(&address);
        let ip = address.ip().to_string();
        let indexes = self
            .indexes
            .entry((ip.clone(), address.port(), family))
            .or_default();
        let index = indexes.next;
        indexes.next += 1;
        indexes.live.insert(index);
        HandleKey {
            address: ip,
            port: address.port(),
            family,
            fd: None,
            index,
        }
    }

    /// A reply arrived: answers the listen waiting for it (a reply nobody waits for is
    /// ignored). A round-robin grant registers the listener's queue before any hand-off
    /// for it is read. If the listen was dropped before its reply, its index is freed at
    /// once; the key returned is a server the primary granted, to give back.
    pub(crate) fn on_reply(
        &mut self,
        seq: u64,
        result: Result<(Granted, Endpoint), i32>,
        fd: Option<OwnedFd>,
    ) -> Option<HandleKey> {
        let PendingQuery { key, answer } = self.queries.remove(&seq)?;
        let granted = result.is_ok();
        let arrived = matches!(result, Ok((Granted::RoundRobin, _))).then(|| {
            let queue = HandoffQueue::default();
            let arrived = Arc::clone(queue.arrived());
            self.listeners.insert(key.clone(), queue);
            arrived
        });
        match answer.send(QueryAnswer {
            result,
            fd,
            arrived,
        }) {
            Ok(()) => None,
            Err(_unread) => {
                self.close(&key);
                granted.then_some(key)
            }
        }
    }

    /// One frame of hand-offs for `key`: each is queued if an open listener that is not
    /// refusing has room, while the worker is not stopping, with its descriptor; the others
    /// are refused.
    pub(crate) fn take_handoffs(
        &mut self,
        key: &HandleKey,
        handoffs: impl IntoIterator<Item = (u64, Option<OwnedFd>)>,
    ) -> TakenHandoffs {
        let mut taken = TakenHandoffs::default();
        let mut queue = self.listeners.get_mut(key).filter(|_| !self.stopping);
        let mut queued = false;
        for (seq, fd) in handoffs {
            let offered = match (queue.as_deref_mut(), fd) {
                (Some(queue), Some(fd)) => queue.offer(seq, fd),
                _ => false,
            };
            if offered {
                queued = true;
            } else {
                taken.refused.push(seq);
            }
        }
        if queued {
            taken.arrived = queue.map(|queue| Arc::clone(queue.arrived()));
        }
        taken
    }

    /// The oldest hand-off for the listener of `key`.
    pub(crate) fn pop_handoff(&mut self, key: &HandleKey) -> Popped {
        let stopping = self.stopping;
        match self.listeners.get_mut(key).map(|queue| queue.pop()) {
            Some(Some((seq, fd))) => Popped::Connection(seq, fd),
            // Once stopping, the hand-offs received before the stop are still taken; then
            // the listener is done.
            Some(None) if !stopping => Popped::Empty,
            _ => Popped::Closed,
        }
    }

    /// While `refusing`, the listener of `key` takes no hand-off; returns those it held,
    /// to refuse.
    pub(crate) fn set_refusing(&mut self, key: &HandleKey, refusing: bool) -> Vec<u64> {
        let Some(queue) = self.listeners.get_mut(key) else {
            return Vec::new();
        };
        queue.set_refusing(refusing);
        if refusing {
            queue.take_all()
        } else {
            Vec::new()
        }
    }

    /// The server of `key` closed (or its listen failed): its hand-offs stop and its index
    /// is free again (Node's `removeIndexesKey`). Returns the hand-offs it held, to refuse.
    pub(crate) fn close(&mut self, key: &HandleKey) -> Vec<u64> {
        let held = self
            .listeners
            .remove(key)
            .map_or_else(Vec::new, |mut queue| queue.take_all());
        let family_key = (key.address.clone(), key.port, key.family);
        if let Some(indexes) = self.indexes.get_mut(&family_key) {
            indexes.live.remove(&key.index);
            if indexes.live.is_empty() {
                self.indexes.remove(&family_key);
            }
        }
        held
    }

    /// The worker stops: no new listen, no new hand-off, and every round-robin listener
    /// woken to see it. The hand-offs it holds already are still its to serve (its primary
    /// may have no other worker to give them to: a stop, an upgrade's hand-over); a
    /// listener dropped with some refuses them then.
    pub(crate) fn stop(&mut self) -> Stopped {
        self.stopping = true;
        // The primary answers no listen of a stopping worker: the listens waiting end
        // now (their answers dropped: `Worker::listen` says `Stopping`).
        self.queries.clear();
        let mut stopped = Stopped::default();
        for queue in self.listeners.values() {
            stopped.woken.push(Arc::clone(queue.arrived()));
        }
        stopped
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HANDOFF_WINDOW;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn fd() -> Option<OwnedFd> {
        Some(std::fs::File::open("/dev/null").expect("/dev/null").into())
    }

    fn round_robin() -> Result<(Granted, Endpoint), i32> {
        Ok((Granted::RoundRobin, addr("127.0.0.1:5000").into()))
    }

    /// A round-robin listener on `127.0.0.1:0`, answered.
    fn listening(table: &mut ServerTable) -> HandleKey {
        let (tx, mut rx) = oneshot::channel();
        let (key, seq) = table.query(addr("127.0.0.1:0"), tx).expect("not stopping");
        assert_eq!(table.on_reply(seq, round_robin(), None), None);
        assert!(rx.try_recv().expect("answered").arrived.is_some());
        key
    }

    #[track_caller]
    fn check_handoffs(table: &mut ServerTable, key: &HandleKey, seqs: &[u64], refused: &[u64]) {
        let taken = table.take_handoffs(key, seqs.iter().map(|&seq| (seq, fd())));
        assert_eq!(taken.refused, refused);
        assert_eq!(taken.arrived.is_some(), seqs.len() > refused.len(), "woken");
    }

    #[test]
    fn listens_count_their_index_per_address() {
        let mut table = ServerTable::default();
        let (a, s0) = table
            .query(addr("127.0.0.1:0"), oneshot::channel().0)
            .unwrap();
        let (b, s1) = table
            .query(addr("127.0.0.1:0"), oneshot::channel().0)
            .unwrap();
        let c = table.listen_exclusive(addr("127.0.0.1:80")).unwrap();
        assert_eq!((a.index, b.index, c.index), (0, 1, 0));
        assert_ne!(s0, s1);
        assert_eq!(b.to_string(), "127.0.0.1:0:4:undefined:1");
    }

    #[test]
    fn a_closed_index_is_freed_and_the_count_restarts_once_none_is_live() {
        let mut table = ServerTable::default();
        let a = table.listen_exclusive(addr("127.0.0.1:8080")).unwrap();
        let b = table.listen_exclusive(addr("127.0.0.1:8080")).unwrap();
        table.close(&a);
        let c = table.listen_exclusive(addr("127.0.0.1:8080")).unwrap();
        assert_eq!((a.index, b.index, c.index), (0, 1, 2), "b is still live");
        table.close(&b);
        table.close(&c);
        let d = table.listen_exclusive(addr("127.0.0.1:8080")).unwrap();
        assert_eq!(d, a, "listen, close, listen: the same key again");
    }

    #[test]
    fn a_query_is_answered_once_and_a_grant_registers_the_listener() {
        let mut table = ServerTable::default();
        let (tx, mut rx) = oneshot::channel();
        let (key, seq) = table.query(addr("127.0.0.1:0"), tx).unwrap();
        assert_eq!(
            table.on_reply(seq + 1, round_robin(), None),
            None,
            "not awaited"
        );
        assert!(rx.try_recv().is_err(), "not answered yet");
        assert_eq!(table.on_reply(seq, round_robin(), fd()), None);
        let answer = rx.try_recv().expect("answered");
        assert!(matches!(answer.result, Ok((Granted::RoundRobin, _))));
        assert!(answer.fd.is_some() && answer.arrived.is_some());
        check_handoffs(&mut table, &key, &[7], &[]);
        assert_eq!(
            table.on_reply(seq, round_robin(), None),
            None,
            "answered once"
        );
    }

    #[test]
    fn a_query_whose_listen_was_dropped_gives_its_server_back() {
        let mut table = ServerTable::default();
        let (tx, rx) = oneshot::channel();
        let (key, seq) = table.query(addr("127.0.0.1:0"), tx).unwrap();
        drop(rx);
        assert_eq!(table.on_reply(seq, round_robin(), None), Some(key.clone()));
        check_handoffs(&mut table, &key, &[1], &[1]);
        let (again, _) = table
            .query(addr("127.0.0.1:0"), oneshot::channel().0)
            .unwrap();
        assert_eq!(again, key, "its index is free again");

        // Refused: nothing to give back, the index is free all the same.
        let (tx, rx) = oneshot::channel();
        let (refused, seq) = table.query(addr("127.0.0.1:80"), tx).unwrap();
        drop(rx);
        assert_eq!(table.on_reply(seq, Err(libc::EADDRINUSE), None), None);
        assert_eq!(table.listen_exclusive(addr("127.0.0.1:80")), Some(refused));
    }

    #[test]
    fn a_whole_window_of_hand_offs_is_queued_before_any_accept() {
        let mut table = ServerTable::default();
        let key = listening(&mut table);
        let window: Vec<u64> = (0..HANDOFF_WINDOW as u64).collect();
        check_handoffs(&mut table, &key, &window, &[]);
        let popped: Vec<u64> = std::iter::from_fn(|| match table.pop_handoff(&key) {
            Popped::Connection(seq, _) => Some(seq),
            _ => None,
        })
        .collect();
        assert_eq!(popped, window);
        assert!(matches!(table.pop_handoff(&key), Popped::Empty));
    }

    #[test]
    fn hand_offs_are_refused_unless_a_listener_can_take_them() {
        let mut table = ServerTable::default();
        let key = listening(&mut table);
        let other = HandleKey {
            index: 9,
            ..key.clone()
        };
        check_handoffs(&mut table, &other, &[1], &[1]);
        let taken = table.take_handoffs(&key, [(2, None), (3, fd())]);
        assert_eq!(taken.refused, [2], "its descriptor was lost");
        assert_eq!(table.set_refusing(&key, true), [3], "held ones are refused");
        check_handoffs(&mut table, &key, &[4], &[4]);
        assert!(table.set_refusing(&key, false).is_empty());
        check_handoffs(&mut table, &key, &[5], &[]);
        assert_eq!(table.close(&key), [5]);
        check_handoffs(&mut table, &key, &[6], &[6]);
        assert!(matches!(table.pop_handoff(&key), Popped::Closed));
    }

    #[test]
    fn stopping_keeps_what_is_held_to_serve_and_refuses_everything_after() {
        let mut table = ServerTable::default();
        let key = listening(&mut table);
        check_handoffs(&mut table, &key, &[1, 2], &[]);
        let stopped = table.stop();
        assert_eq!(stopped.woken.len(), 1);
        assert!(table.is_stopping());
        check_handoffs(&mut table, &key, &[3], &[3]);
        assert!(matches!(table.pop_handoff(&key), Popped::Connection(1, _)));
        assert!(matches!(table.pop_handoff(&key), Popped::Connection(2, _)));
        assert!(matches!(table.pop_handoff(&key), Popped::Closed));
        assert!(
            table
                .query(addr("127.0.0.1:0"), oneshot::channel().0)
                .is_none()
        );
        assert!(table.listen_exclusive(addr("127.0.0.1:0")).is_none());
        assert_eq!(
            table.stop().woken.len(),
            1,
            "stopping twice wakes again, harmlessly"
        );
    }

    /// The primary answers no listen of a stopping worker: one waiting at the stop ends
    /// then, and an answer that comes anyway is nobody's.
    #[test]
    fn a_listen_waiting_at_the_stop_ends_with_it() {
        let mut table = ServerTable::default();
        let (answer, mut reply) = oneshot::channel();
        let (_, seq) = table.query(addr("127.0.0.1:0"), answer).expect("a query");
        assert!(
            matches!(reply.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "nothing yet"
        );
        table.stop();
        assert!(
            matches!(reply.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "ended by the stop"
        );
        assert_eq!(table.on_reply(seq, round_robin(), None), None);
    }
}
