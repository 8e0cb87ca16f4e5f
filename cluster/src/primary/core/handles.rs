//! The core's view of a listening handle: who listens on it, which sockets exist, and
//! (under round-robin) the scheduler. The sockets themselves belong to the driver.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::HANDOFF_WINDOW;
use crate::Endpoint;
use crate::protocol::{AddressFamily, WorkerId};
use crate::scheduler::RoundRobinHandle;
use crate::settings::Policy;

/// A connection accepted by the primary, named by the driver, which holds its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ConnId(pub(crate) u64);

/// A query waiting for a socket to be bound: `(worker, seq)`.
pub(crate) type Waiter = (WorkerId, u64);

#[derive(Debug)]
pub(crate) enum HandleKind {
    /// The primary accepts and hands connections over.
    RoundRobin(RoundRobinHandle<ConnId, WorkerId>),
    /// One socket, a copy in every worker.
    Shared,
    /// One `SO_REUSEPORT` socket per slot, kept across the slot's restarts.
    ReusePort { slots: BTreeSet<usize> },
}

/// One listening handle.
#[derive(Debug)]
pub(crate) struct Handle {
    /// The bound address, once the first socket is bound.
    pub(crate) address: Option<Endpoint>,
    pub(crate) backlog: u32,
    /// Workers granted this handle (under round-robin the scheduler keeps who may get
    /// hand-offs).
    pub(crate) workers: BTreeSet<WorkerId>,
    pub(crate) kind: HandleKind,
    /// Queries waiting for a bind, by the socket they wait for (`None`: the handle's
    /// only socket; `Some(slot)`: a reuseport slot's).
    pub(crate) binding: BTreeMap<Option<usize>, Vec<Waiter>>,
    /// Round-robin: whether the driver was told to stop accepting because
    /// [`Config::max_held`](super::Config::max_held) connections wait already.
    pub(crate) paused: bool,
    /// Round-robin: hand-offs wait after one could not be sent for lack of a descriptor,
    /// until the `Dispatch` timer.
    pub(crate) stalled: bool,
}

impl Handle {
    /// A handle of `family` under `policy`; a Unix socket cannot be bound once per slot,
    /// so under reuseport it is shared.
    pub(crate) fn new(policy: Policy, family: AddressFamily, backlog: u32, hold: Duration) -> Self {
        let policy = match (policy, family) {
            (Policy::ReusePort, AddressFamily::Unix) => Policy::Shared,
            (policy, _) => policy,
        };
        let kind = match policy {
            Policy::RoundRobin => {
                HandleKind::RoundRobin(RoundRobinHandle::new(hold, HANDOFF_WINDOW))
            }
            Policy::Shared => HandleKind::Shared,
            Policy::ReusePort => HandleKind::ReusePort {
                slots: BTreeSet::new(),
            },
        };
        Self {
            address: None,
            backlog,
            workers: BTreeSet::new(),
            kind,
            binding: BTreeMap::new(),
            paused: false,
            stalled: false,
        }
    }

    /// The socket a worker of `slot` listens on: `None` for the handle's only socket,
    /// `Some(slot)` under reuseport.
    pub(crate) fn socket_for(&self, slot: usize) -> Option<usize> {
        match self.kind {
            HandleKind::ReusePort { .. } => Some(slot),
            _ => None,
        }
    }

    /// Whether the socket a worker of `slot` needs is bound.
    pub(crate) fn has_socket(&self, slot: usize) -> bool {
        match &self.kind {
            HandleKind::ReusePort { slots } => slots.contains(&slot),
            _ => self.address.is_some(),
        }
    }

    pub(crate) fn round_robin(&mut self) -> Option<&mut RoundRobinHandle<ConnId, WorkerId>> {
        match &mut self.kind {
            HandleKind::RoundRobin(rr) => Some(rr),
            _ => None,
        }
    }

    /// No new connections for `worker`, which is stopping; in-flight hand-offs stay.
    pub(crate) fn retire_worker(&mut self, worker: WorkerId) {
        if let Some(rr) = self.round_robin() {
            rr.retire_worker(worker);
        }
    }

    /// `worker` is gone (or closed its server): its in-flight hand-offs are queued again.
    pub(crate) fn remove_worker(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
        if let Some(rr) = self.round_robin() {
            rr.remove_worker(worker);
        }
        for waiters in self.binding.values_mut() {
            waiters.retain(|(w, _)| *w != worker);
        }
    }

    /// Whether nobody listens on it or waits for it.
    pub(crate) fn is_unused(&self) -> bool {
        self.workers.is_empty() && self.binding.values().all(Vec::is_empty)
    }
}
