//! The primary's whole state as a pure state machine: no I/O, no clock, no tasks.
//!
//! [`Core::handle`] takes one [`Input`] (a worker's message, an exit, a closed channel,
//! an accepted connection, a timer that fired, a command) with the time it happened, and
//! returns the [`Effect`]s the driver must perform, in order: fork, send, kill, bind,
//! close, start or cancel a timer, emit an event, reply to a command. The driver
//! (`driver.rs`) owns the processes, channels, sockets and timers and feeds the results
//! back (`Forked`, `Bound`, ...), so that everything the cluster decides is decided here
//! and model-checked by `core/tests.rs`.
//!
//! Invariants kept here (and checked by the property test):
//!
//! - every forked worker leaves exactly one `Exit` event, after its `Disconnect`; its
//!   events come in Node's order: fork, online, listening, disconnect, exit;
//! - a round-robin connection is handed to exactly one worker that accepts it, or closed;
//! - a timer is pending in the driver exactly while it is in [`Core::timers`];
//! - a stop ends with no worker, no handle and no timer.

mod handles;
mod lifecycle;
mod reload;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use child::Signal;

pub(crate) use self::handles::ConnId;
use self::handles::{Handle, HandleKind};
pub(crate) use self::lifecycle::StopCause;
use self::lifecycle::{Occupant, Phase, Slot, Worker};
use self::reload::Reload;
use super::restart::{Decision, RestartTracker};
use super::{Event, Stats, WorkerStats};
use crate::protocol::{Granted, HandleKey, ToPrimary, ToWorker, WorkerId};
use crate::settings::{Policy, RestartPolicy};

/// How many servers one worker may hold at once; asking for more is misbehaving.
pub(crate) const MAX_SERVERS_PER_WORKER: usize = 128;

/// How many control messages can be waiting for one worker at most, by the protocol:
/// a reply per server asked for, a hand-off in flight per server, and a disconnect.
pub(crate) const CONTROL_QUEUE: usize = 2 * MAX_SERVERS_PER_WORKER + 2;

/// What the core needs to know of the settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) workers: usize,
    pub(crate) policy: Policy,
    pub(crate) restart: RestartPolicy,
    pub(crate) drain_deadline: Duration,
    pub(crate) hold: Duration,
    /// How long an exited worker's channel may stay open before the exit is reported.
    pub(crate) exit_grace: Duration,
}

/// A command's tag; the driver keeps the reply channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RequestId(pub(crate) u64);

/// What the `Primary` handle asks.
#[derive(Debug)]
pub(crate) enum Command {
    /// A new slot, with extra environment for its workers.
    AddWorker {
        env: Vec<(OsString, OsString)>,
    },
    RemoveWorker,
    Disconnect(Option<WorkerId>),
    Kill(WorkerId, Signal),
    Reload,
    Stop,
}

/// The answer to a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Added(WorkerId),
    /// The fork failed; the driver holds the error.
    AddFailed(WorkerId),
    Removed(Option<WorkerId>),
    UnknownWorker(WorkerId),
    Stopped,
}

/// Something that happened.
#[derive(Debug)]
pub(crate) enum Input {
    /// The driver started the process of a `Fork` effect.
    Forked {
        id: WorkerId,
        pid: u32,
    },
    /// The driver could not start it.
    ForkFailed {
        id: WorkerId,
    },
    /// A decoded control message.
    Message {
        id: WorkerId,
        message: ToPrimary,
    },
    /// A control message that broke the protocol (undecodable, or with descriptors).
    Malformed {
        id: WorkerId,
        reason: String,
    },
    /// A message could not be queued for the worker (its control queue is full).
    SendFailed {
        id: WorkerId,
    },
    /// A hand-off could not be sent for a local reason (no descriptor to copy it with).
    HandoffFailed {
        id: WorkerId,
        key: HandleKey,
        seq: u64,
    },
    /// The worker's channel reached its end; `broken` says why, if it broke.
    ChannelClosed {
        id: WorkerId,
        broken: Option<String>,
    },
    Exited {
        id: WorkerId,
        status: child::ExitStatus,
    },
    /// The result of a `Bind` effect: the bound address or an errno.
    Bound {
        key: HandleKey,
        socket: Option<usize>,
        result: Result<SocketAddr, i32>,
    },
    /// A round-robin handle accepted a connection.
    Connection {
        key: HandleKey,
        conn: ConnId,
    },
    TimerFired(Timer),
    Command(RequestId, Command),
}

/// A timer the driver keeps; at most one of each is pending.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Timer {
    /// Start the slot's next worker.
    Respawn(usize),
    /// Kill a stopping worker that has not exited.
    DrainDeadline(WorkerId),
    /// Report an exit whose channel has not closed.
    ExitGrace(WorkerId),
    /// Close round-robin connections held too long.
    Hold(HandleKey),
}

/// A descriptor the driver attaches to a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FdRef {
    /// An accepted connection (a copy; the driver keeps its own until told to close it).
    Conn(ConnId),
    /// A listening socket of a handle (`socket`: a reuseport slot's).
    Listener {
        key: HandleKey,
        socket: Option<usize>,
    },
}

/// What the driver must do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Start a worker for `slot`; answer with `Forked` or `ForkFailed`.
    Fork {
        id: WorkerId,
        slot: usize,
        env: Vec<(OsString, OsString)>,
    },
    /// Queue a control message for a worker.
    Send {
        id: WorkerId,
        message: ToWorker,
        fd: Option<FdRef>,
    },
    /// Signal a worker; reply to `request` with the result, if given.
    Kill {
        id: WorkerId,
        signal: Signal,
        request: Option<RequestId>,
    },
    /// Bind a listening socket for `key` (at `address` if given, else the key's own);
    /// answer with `Bound`. Under round-robin the driver also starts accepting on it.
    Bind {
        key: HandleKey,
        socket: Option<usize>,
        address: Option<SocketAddr>,
        backlog: u32,
    },
    /// Close every socket of a handle.
    CloseHandle(HandleKey),
    /// Close one reuseport slot's socket.
    CloseSocket {
        key: HandleKey,
        socket: usize,
    },
    /// Close the driver's copy of a connection.
    CloseConn(ConnId),
    StartTimer {
        timer: Timer,
        at: Instant,
    },
    CancelTimer(Timer),
    Emit(Event),
    Reply(RequestId, Outcome),
    /// The primary has stopped: nothing is left.
    Finished,
}

#[derive(Debug)]
enum Run {
    Running,
    Stopping { waiters: Vec<RequestId> },
    Stopped,
}

/// The primary's state. See the module docs.
#[derive(Debug)]
pub(crate) struct Core {
    config: Config,
    next_id: u64,
    next_slot: usize,
    workers: BTreeMap<WorkerId, Worker>,
    slots: BTreeMap<usize, Slot>,
    handles: HashMap<HandleKey, Handle>,
    timers: HashMap<Timer, Instant>,
    /// `AddWorker` requests waiting for their fork.
    adding: HashMap<WorkerId, RequestId>,
    reload: Option<Reload>,
    run: Run,
    out: Vec<Effect>,
}

impl Core {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            next_id: 1,
            next_slot: 0,
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            handles: HashMap::new(),
            timers: HashMap::new(),
            adding: HashMap::new(),
            reload: None,
            run: Run::Running,
            out: Vec::new(),
        }
    }

    /// Forks the configured workers.
    pub(crate) fn start(&mut self, now: Instant) -> Vec<Effect> {
        for _ in 0..self.config.workers {
            let slot = self.new_slot(Vec::new());
            self.fork_into(slot, now);
        }
        std::mem::take(&mut self.out)
    }

    /// Reacts to `input`, which happened at `now`; returns what to do, in order.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        match input {
            Input::Forked { id, pid } => self.on_forked(id, pid),
            Input::ForkFailed { id } => self.on_fork_failed(id, now),
            Input::Message { id, message } => self.on_message(id, message, now),
            Input::Malformed { id, reason } => self.misbehaved(id, reason),
            Input::SendFailed { id } => self.misbehaved(id, "its control queue is full".into()),
            Input::HandoffFailed { id, key, seq } => self.on_accepted(id, &key, seq, false, now),
            Input::ChannelClosed { id, broken } => self.on_channel_closed(id, broken, now),
            Input::Exited { id, status } => self.on_exited(id, status, now),
            Input::Bound {
                key,
                socket,
                result,
            } => self.on_bound(&key, socket, result, now),
            Input::Connection { key, conn } => self.on_connection(key, conn, now),
            Input::TimerFired(timer) => self.on_timer(timer, now),
            Input::Command(request, command) => self.on_command(request, command, now),
        }
        std::mem::take(&mut self.out)
    }

    /// Whether `id` is a live worker whose channel is open.
    pub(crate) fn connected(&self, id: WorkerId) -> Option<bool> {
        self.workers.get(&id).map(|w| w.phase.connected())
    }

    /// The workers whose channel is open.
    pub(crate) fn connected_workers(&self) -> impl Iterator<Item = WorkerId> + '_ {
        self.workers
            .iter()
            .filter(|(_, w)| w.phase.connected())
            .map(|(id, _)| *id)
    }

    /// The pending timers and when they fire.
    #[cfg(test)]
    pub(crate) fn timers(&self) -> &HashMap<Timer, Instant> {
        &self.timers
    }

    pub(crate) fn stats(&mut self) -> Stats {
        let mut stats = Stats {
            queued: 0,
            failed_slots: self
                .slots
                .iter()
                .filter(|(_, s)| matches!(s.occupant, Occupant::Failed { .. }))
                .map(|(slot, _)| *slot)
                .collect(),
            workers: Vec::new(),
            ready: self.ready(),
        };
        for handle in self.handles.values_mut() {
            if let Some(rr) = handle.round_robin() {
                stats.queued += rr.queued();
            }
        }
        for (id, worker) in &self.workers {
            let in_flight = self
                .handles
                .values_mut()
                .filter_map(Handle::round_robin)
                .map(|rr| rr.in_flight(*id))
                .sum();
            stats.workers.push(WorkerStats {
                id: *id,
                pid: worker.phase.pid().unwrap_or_default(),
                slot: worker.slot,
                state: worker.phase.state(),
                handed: worker.handed,
                in_flight,
                restarts: worker.restarts,
            });
        }
        stats
    }

    /// Whether every slot has a worker listening and no stop has begun.
    fn ready(&self) -> bool {
        matches!(self.run, Run::Running)
            && !self.slots.is_empty()
            && self.slots.values().all(|s| {
                s.current().is_some_and(|id| {
                    matches!(self.workers[&id].phase, Phase::Online { listening, .. } if listening > 0)
                })
            })
    }

    fn running(&self) -> bool {
        matches!(self.run, Run::Running)
    }

    fn emit(&mut self, event: Event) {
        self.out.push(Effect::Emit(event));
    }

    fn send(&mut self, id: WorkerId, message: ToWorker, fd: Option<FdRef>) {
        self.out.push(Effect::Send { id, message, fd });
    }

    fn start_timer(&mut self, timer: Timer, at: Instant) {
        self.timers.insert(timer.clone(), at);
        self.out.push(Effect::StartTimer { timer, at });
    }

    fn cancel_timer(&mut self, timer: Timer) {
        if self.timers.remove(&timer).is_some() {
            self.out.push(Effect::CancelTimer(timer));
        }
    }

    fn new_slot(&mut self, env: Vec<(OsString, OsString)>) -> usize {
        let slot = self.next_slot;
        self.next_slot += 1;
        let tracker = RestartTracker::new(self.config.restart.clone());
        self.slots.insert(
            slot,
            Slot {
                occupant: Occupant::Respawning,
                tracker,
                env,
            },
        );
        slot
    }

    /// Starts a worker as the current one of `slot`.
    fn fork_into(&mut self, slot: usize, now: Instant) -> WorkerId {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let (env, restarts) = match self.slots.get_mut(&slot) {
            Some(s) => {
                s.occupant = Occupant::Worker(id);
                (s.env.clone(), s.tracker.restarts())
            }
            None => (Vec::new(), 0),
        };
        self.workers.insert(
            id,
            Worker {
                slot,
                started: now,
                phase: Phase::Starting,
                keys: Default::default(),
                handed: 0,
                restarts,
            },
        );
        self.out.push(Effect::Fork { id, slot, env });
        id
    }

    fn on_forked(&mut self, id: WorkerId, pid: u32) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.phase != Phase::Starting {
            return;
        }
        worker.phase = Phase::Forked { pid };
        tracing::debug!(%id, pid, slot = worker.slot, "forked a worker");
        self.emit(Event::Fork { id, pid });
        if let Some(request) = self.adding.remove(&id) {
            self.out.push(Effect::Reply(request, Outcome::Added(id)));
        }
    }

    fn on_fork_failed(&mut self, id: WorkerId, now: Instant) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        let slot = worker.slot;
        if let Some(request) = self.adding.remove(&id) {
            self.slots.remove(&slot);
            self.out
                .push(Effect::Reply(request, Outcome::AddFailed(id)));
            return;
        }
        tracing::error!(slot, "could not start a worker");
        if self.slot_current(slot) == Some(id) {
            self.on_crash(slot, id, now, Duration::ZERO);
        }
    }

    fn slot_current(&self, slot: usize) -> Option<WorkerId> {
        self.slots.get(&slot).and_then(Slot::current)
    }

    /// A slot's current worker died (or could not start): restart it, or give it up.
    fn on_crash(&mut self, slot: usize, id: WorkerId, now: Instant, uptime: Duration) {
        let Some(decision) = self
            .slots
            .get_mut(&slot)
            .map(|s| s.tracker.on_crash(now, uptime))
        else {
            return;
        };
        let running = self.running();
        match decision {
            Decision::RestartAfter(delay) if delay.is_zero() && running => {
                tracing::info!(slot, "restarting a worker at once");
                self.fork_into(slot, now);
            }
            Decision::RestartAfter(delay) => {
                self.set_occupant(slot, Occupant::Respawning);
                if running {
                    tracing::info!(slot, ?delay, "restarting a worker");
                    self.start_timer(Timer::Respawn(slot), now + delay);
                }
            }
            Decision::Failed => match self.reload_keeps_old(slot) {
                Some(old) => {
                    // The new code crash-loops: the old worker keeps the slot, with a
                    // fresh crash history.
                    tracing::error!(slot, %old, "reload failed for this slot; keeping the old worker");
                    if let Some(s) = self.slots.get_mut(&slot) {
                        s.occupant = Occupant::Worker(old);
                        s.tracker = RestartTracker::new(self.config.restart.clone());
                    }
                    self.emit(Event::ReloadFailed {
                        slot,
                        id,
                        kept: old,
                    });
                }
                None => {
                    self.set_occupant(slot, Occupant::Failed { last: id });
                    tracing::error!(slot, "crash loop: the slot is given up");
                    self.emit(Event::SlotFailed { slot, id });
                }
            },
            Decision::Never => self.remove_slot(slot),
        }
        self.advance_reload(now);
    }

    fn set_occupant(&mut self, slot: usize, occupant: Occupant) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.occupant = occupant;
        }
    }

    /// Forgets a slot; its socket (reuseport) closes once none of its workers is left.
    fn remove_slot(&mut self, slot: usize) {
        if self.slots.remove(&slot).is_some() {
            self.cancel_timer(Timer::Respawn(slot));
            self.close_slot_sockets(slot);
        }
    }

    fn close_slot_sockets(&mut self, slot: usize) {
        if self.slots.contains_key(&slot) || self.workers.values().any(|w| w.slot == slot) {
            return;
        }
        for (key, handle) in &mut self.handles {
            if let HandleKind::ReusePort { slots } = &mut handle.kind
                && slots.remove(&slot)
            {
                self.out.push(Effect::CloseSocket {
                    key: key.clone(),
                    socket: slot,
                });
            }
        }
    }

    fn on_message(&mut self, id: WorkerId, message: ToPrimary, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if !worker.phase.talks() {
            return;
        }
        match (worker.phase, message) {
            (Phase::Forked { pid }, ToPrimary::Online) => {
                worker.phase = Phase::Online { pid, listening: 0 };
                self.emit(Event::Online { id });
                self.advance_reload(now);
            }
            (_, ToPrimary::Online) => self.misbehaved(id, "reported online twice".into()),
            (Phase::Forked { .. }, _) => self.misbehaved(id, "spoke before it was online".into()),
            (_, ToPrimary::QueryServer { seq, key, backlog }) => {
                self.query_server(id, seq, key, backlog)
            }
            (_, ToPrimary::Listening { key, address }) => {
                if let Phase::Online { listening, .. } | Phase::Draining { listening, .. } =
                    &mut worker.phase
                {
                    *listening += 1;
                }
                self.emit(Event::Listening { id, address, key });
                self.advance_reload(now);
            }
            (_, ToPrimary::Accepted { key, seq, accepted }) => {
                self.on_accepted(id, &key, seq, accepted, now)
            }
            (_, ToPrimary::Close { key }) => self.on_close(id, &key, now),
            (_, ToPrimary::GoingDown { reason }) => {
                let (slot, uptime) = (worker.slot, now.saturating_duration_since(worker.started));
                tracing::warn!(%id, ?reason, "worker is going down");
                self.emit(Event::GoingDown { id, reason });
                self.begin_drain(id, StopCause::Panicked, now);
                if self.running() && self.slot_current(slot) == Some(id) {
                    self.on_crash(slot, id, now, uptime);
                }
            }
            (_, ToPrimary::Disconnecting) => {
                let slot = worker.slot;
                tracing::info!(%id, "worker disconnected itself");
                self.begin_drain(id, StopCause::WorkerDisconnected, now);
                if self.running() && self.slot_current(slot) == Some(id) {
                    self.fork_into(slot, now);
                }
            }
        }
    }

    fn query_server(&mut self, id: WorkerId, seq: u64, key: HandleKey, backlog: u32) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let slot = worker.slot;
        let held = worker.keys.len()
            + self
                .handles
                .values()
                .flat_map(|h| h.binding.values().flatten())
                .filter(|(w, _)| *w == id)
                .count();
        let asked_twice = worker.keys.contains(&key)
            || self
                .handles
                .get(&key)
                .is_some_and(|h| h.binding.values().flatten().any(|(w, _)| *w == id));
        if asked_twice {
            return self.misbehaved(id, format!("asked twice for the server {key}"));
        }
        if held >= MAX_SERVERS_PER_WORKER {
            return self.misbehaved(
                id,
                format!("asked for more than {MAX_SERVERS_PER_WORKER} servers"),
            );
        }
        let (policy, hold) = (self.config.policy, self.config.hold);
        let handle = self
            .handles
            .entry(key.clone())
            .or_insert_with(|| Handle::new(policy, backlog, hold));
        if handle.has_socket(slot) {
            return self.grant(id, seq, &key, slot);
        }
        let socket = handle.socket_for(slot);
        let waiters = handle.binding.entry(socket).or_default();
        waiters.push((id, seq));
        if waiters.len() == 1 {
            let (address, backlog) = (handle.address, handle.backlog);
            self.out.push(Effect::Bind {
                key,
                socket,
                address,
                backlog,
            });
        }
    }

    /// Lets `id` listen on the bound handle `key`.
    fn grant(&mut self, id: WorkerId, seq: u64, key: &HandleKey, slot: usize) {
        let (Some(worker), Some(handle)) = (self.workers.get_mut(&id), self.handles.get_mut(key))
        else {
            return;
        };
        let Some(address) = handle.address else {
            return;
        };
        worker.keys.insert(key.clone());
        handle.workers.insert(id);
        let accepting = matches!(worker.phase, Phase::Forked { .. } | Phase::Online { .. });
        let (granted, fd) = match &mut handle.kind {
            HandleKind::RoundRobin(rr) => {
                if accepting {
                    rr.add_worker(id);
                }
                (Granted::RoundRobin, None)
            }
            HandleKind::Shared => (
                Granted::Socket,
                Some(FdRef::Listener {
                    key: key.clone(),
                    socket: None,
                }),
            ),
            HandleKind::ReusePort { .. } => (
                Granted::Socket,
                Some(FdRef::Listener {
                    key: key.clone(),
                    socket: Some(slot),
                }),
            ),
        };
        let result = Ok((granted, address));
        self.send(id, ToWorker::QueryReply { seq, result }, fd);
        self.dispatch(key);
    }

    fn on_bound(
        &mut self,
        key: &HandleKey,
        socket: Option<usize>,
        result: Result<SocketAddr, i32>,
        now: Instant,
    ) {
        let Some(handle) = self.handles.get_mut(key) else {
            return;
        };
        let waiters = handle.binding.remove(&socket).unwrap_or_default();
        match result {
            Ok(address) => {
                handle.address.get_or_insert(address);
                if let (HandleKind::ReusePort { slots }, Some(slot)) = (&mut handle.kind, socket) {
                    slots.insert(slot);
                }
                for (id, seq) in waiters {
                    let slot = self.workers.get(&id).map(|w| w.slot);
                    if let Some(slot) = slot {
                        self.grant(id, seq, key, slot);
                    }
                }
            }
            Err(errno) => {
                tracing::debug!(%key, errno, "listen refused");
                if handle.address.is_none() && handle.is_unused() {
                    self.handles.remove(key);
                }
                for (id, seq) in waiters {
                    let result = Err(errno);
                    self.send(id, ToWorker::QueryReply { seq, result }, None);
                }
            }
        }
        self.update_hold(key, now);
    }

    fn on_connection(&mut self, key: HandleKey, conn: ConnId, now: Instant) {
        match self.handles.get_mut(&key).and_then(Handle::round_robin) {
            Some(rr) => {
                rr.push_connection(conn, now);
                self.dispatch(&key);
                self.update_hold(&key, now);
            }
            None => self.out.push(Effect::CloseConn(conn)),
        }
    }

    fn on_accepted(
        &mut self,
        id: WorkerId,
        key: &HandleKey,
        seq: u64,
        accepted: bool,
        now: Instant,
    ) {
        let Some(rr) = self.handles.get_mut(key).and_then(Handle::round_robin) else {
            return;
        };
        // An accepted connection is the worker's now: our copy closes.
        if let Some(conn) = rr.reply(id, seq, accepted) {
            self.out.push(Effect::CloseConn(conn));
        }
        if !accepted {
            let expired = rr.expire(now);
            self.out.extend(expired.into_iter().map(Effect::CloseConn));
        }
        self.dispatch(key);
        self.update_hold(key, now);
    }

    fn on_close(&mut self, id: WorkerId, key: &HandleKey, now: Instant) {
        if let Some(worker) = self.workers.get_mut(&id) {
            worker.keys.remove(key);
        }
        let Some(handle) = self.handles.get_mut(key) else {
            return;
        };
        handle.remove_worker(id);
        if handle.is_unused() && self.running() {
            // The application closed its last server on this handle.
            self.close_handle(key);
        } else {
            self.dispatch(key);
            self.update_hold(key, now);
        }
    }

    fn close_handle(&mut self, key: &HandleKey) {
        let Some(mut handle) = self.handles.remove(key) else {
            return;
        };
        if let Some(rr) = handle.round_robin() {
            let conns = rr.drain();
            self.out.extend(conns.into_iter().map(Effect::CloseConn));
        }
        self.cancel_timer(Timer::Hold(key.clone()));
        self.out.push(Effect::CloseHandle(key.clone()));
    }

    /// Sends queued connections of a round-robin handle to idle workers.
    fn dispatch(&mut self, key: &HandleKey) {
        let Some(rr) = self.handles.get_mut(key).and_then(Handle::round_robin) else {
            return;
        };
        while let Some(handoff) = rr.next_handoff() {
            let (id, seq, conn) = (handoff.worker, handoff.seq, *handoff.conn);
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.handed += 1;
            }
            self.out.push(Effect::Send {
                id,
                message: ToWorker::NewConn {
                    key: key.clone(),
                    seq,
                },
                fd: Some(FdRef::Conn(conn)),
            });
        }
    }

    fn dispatch_all(&mut self, now: Instant) {
        let keys: Vec<HandleKey> = self.handles.keys().cloned().collect();
        for key in keys {
            self.dispatch(&key);
            self.update_hold(&key, now);
        }
    }

    /// Keeps the `Hold` timer of `key` at its scheduler's next deadline.
    fn update_hold(&mut self, key: &HandleKey, now: Instant) {
        let deadline = self
            .handles
            .get_mut(key)
            .and_then(Handle::round_robin)
            .and_then(|rr| rr.next_deadline());
        let timer = Timer::Hold(key.clone());
        match deadline {
            Some(at) if self.timers.get(&timer) != Some(&at) => {
                self.start_timer(timer, at.max(now));
            }
            Some(_) => {}
            None => self.cancel_timer(timer),
        }
    }

    /// Takes `id` out of every handle, queueing its in-flight hand-offs again.
    fn forget_worker(&mut self, id: WorkerId) {
        for handle in self.handles.values_mut() {
            handle.remove_worker(id);
        }
    }

    /// Asks `id` to stop: no new connections, `Disconnect`, and a kill at the deadline.
    fn begin_drain(&mut self, id: WorkerId, cause: StopCause, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match &mut worker.phase {
            Phase::Forked { pid } => {
                worker.phase = Phase::Draining {
                    pid: *pid,
                    listening: 0,
                    cause,
                };
            }
            Phase::Online { pid, listening } => {
                worker.phase = Phase::Draining {
                    pid: *pid,
                    listening: *listening,
                    cause,
                };
            }
            Phase::Draining { cause: old, .. } => {
                *old = old.merge(cause);
                return;
            }
            Phase::Disconnected { cause: old, .. } | Phase::Exited { cause: old, .. } => {
                *old = Some(old.map_or(cause, |old| old.merge(cause)));
                return;
            }
            Phase::Starting => return,
        }
        self.send(id, ToWorker::Disconnect, None);
        self.start_timer(Timer::DrainDeadline(id), now + self.config.drain_deadline);
        for handle in self.handles.values_mut() {
            handle.retire_worker(id);
        }
    }

    fn misbehaved(&mut self, id: WorkerId, reason: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let phase = worker.phase;
        if phase.cause() == Some(StopCause::Misbehaved) || phase == Phase::Starting {
            return;
        }
        worker.phase = match phase {
            Phase::Forked { pid } => Phase::Draining {
                pid,
                listening: 0,
                cause: StopCause::Misbehaved,
            },
            Phase::Online { pid, listening } | Phase::Draining { pid, listening, .. } => {
                Phase::Draining {
                    pid,
                    listening,
                    cause: StopCause::Misbehaved,
                }
            }
            Phase::Disconnected { pid, .. } => Phase::Disconnected {
                pid,
                cause: Some(StopCause::Misbehaved),
            },
            Phase::Exited { pid, status, .. } => Phase::Exited {
                pid,
                status,
                cause: Some(StopCause::Misbehaved),
            },
            Phase::Starting => return,
        };
        tracing::warn!(%id, %reason, "worker broke the protocol, killing it");
        self.emit(Event::Misbehaved { id, reason });
        let signal = Signal::SIGKILL;
        self.out.push(Effect::Kill {
            id,
            signal,
            request: None,
        });
        self.forget_worker(id);
    }

    fn on_channel_closed(&mut self, id: WorkerId, broken: Option<String>, now: Instant) {
        if let Some(reason) = broken {
            self.misbehaved(id, reason);
        }
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match worker.phase {
            Phase::Exited { status, cause, .. } => {
                self.cancel_timer(Timer::ExitGrace(id));
                return self.finalize(id, status, cause, false, now);
            }
            Phase::Starting | Phase::Disconnected { .. } => return,
            Phase::Forked { pid } | Phase::Online { pid, .. } | Phase::Draining { pid, .. } => {
                worker.phase = Phase::Disconnected {
                    pid,
                    cause: worker.phase.cause(),
                };
            }
        }
        self.emit(Event::Disconnect { id });
        // It can no longer answer: its in-flight hand-offs go to others.
        self.forget_worker(id);
        self.dispatch_all(now);
        // A process that closed its channel but lives on is ended at the deadline.
        let timer = Timer::DrainDeadline(id);
        if !self.timers.contains_key(&timer) {
            self.start_timer(timer, now + self.config.drain_deadline);
        }
    }

    fn on_exited(&mut self, id: WorkerId, status: child::ExitStatus, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match worker.phase {
            Phase::Disconnected { cause, .. } => self.finalize(id, status, cause, true, now),
            Phase::Exited { .. } | Phase::Starting => {}
            Phase::Forked { pid } | Phase::Online { pid, .. } | Phase::Draining { pid, .. } => {
                // Messages it sent before exiting come first: wait for the end of its
                // channel, for a bounded time (a descendant may hold it open).
                let cause = worker.phase.cause();
                worker.phase = Phase::Exited { pid, status, cause };
                for handle in self.handles.values_mut() {
                    handle.retire_worker(id);
                }
                self.cancel_timer(Timer::DrainDeadline(id));
                self.start_timer(Timer::ExitGrace(id), now + self.config.exit_grace);
            }
        }
    }

    /// The worker is gone: report it, refill or give up its slot.
    fn finalize(
        &mut self,
        id: WorkerId,
        status: child::ExitStatus,
        cause: Option<StopCause>,
        disconnected: bool,
        now: Instant,
    ) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        self.cancel_timer(Timer::DrainDeadline(id));
        self.cancel_timer(Timer::ExitGrace(id));
        self.forget_worker(id);
        if !disconnected {
            self.emit(Event::Disconnect { id });
        }
        tracing::debug!(%id, %status, "worker exited");
        let exited_after_disconnect = cause.is_some_and(StopCause::exited_after_disconnect);
        self.emit(Event::Exit {
            id,
            status,
            exited_after_disconnect,
        });
        let slot = worker.slot;
        if self.running() && self.slot_current(slot) == Some(id) {
            let uptime = now.saturating_duration_since(worker.started);
            self.on_crash(slot, id, now, uptime);
        }
        self.close_slot_sockets(slot);
        self.dispatch_all(now);
        self.advance_reload(now);
        self.check_stopped();
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
        if self.timers.remove(&timer).is_none() {
            return; // cancelled or replaced meanwhile
        }
        match timer {
            Timer::Respawn(slot) => {
                let respawning = self
                    .slots
                    .get(&slot)
                    .is_some_and(|s| s.occupant == Occupant::Respawning);
                if respawning && self.running() {
                    self.fork_into(slot, now);
                }
            }
            Timer::DrainDeadline(id) => {
                if self.workers.contains_key(&id) {
                    tracing::warn!(%id, "drain deadline passed, killing the worker");
                    let signal = Signal::SIGKILL;
                    self.out.push(Effect::Kill {
                        id,
                        signal,
                        request: None,
                    });
                }
            }
            Timer::ExitGrace(id) => {
                if let Some(Phase::Exited { status, cause, .. }) =
                    self.workers.get(&id).map(|w| w.phase)
                {
                    self.finalize(id, status, cause, false, now);
                }
            }
            Timer::Hold(key) => {
                if let Some(rr) = self.handles.get_mut(&key).and_then(Handle::round_robin) {
                    let expired = rr.expire(now);
                    if !expired.is_empty() {
                        tracing::warn!(%key, count = expired.len(), "closing connections no worker took in time");
                    }
                    self.out.extend(expired.into_iter().map(Effect::CloseConn));
                }
                self.update_hold(&key, now);
            }
        }
    }

    fn on_command(&mut self, request: RequestId, command: Command, now: Instant) {
        let reply = |core: &mut Core, outcome| core.out.push(Effect::Reply(request, outcome));
        match command {
            Command::AddWorker { env } => {
                if !self.running() {
                    return reply(self, Outcome::Stopped);
                }
                let slot = self.new_slot(env);
                let id = self.fork_into(slot, now);
                self.adding.insert(id, request);
            }
            Command::RemoveWorker => {
                let newest = self
                    .slots
                    .iter()
                    .rev()
                    .find_map(|(slot, s)| s.current().map(|id| (*slot, id)));
                if let Some((slot, id)) = newest {
                    self.remove_slot(slot);
                    self.begin_drain(id, StopCause::Asked, now);
                }
                reply(self, Outcome::Removed(newest.map(|(_, id)| id)));
            }
            Command::Disconnect(Some(id)) if !self.workers.contains_key(&id) => {
                reply(self, Outcome::UnknownWorker(id));
            }
            Command::Disconnect(target) => {
                let ids: Vec<WorkerId> = match target {
                    Some(id) => vec![id],
                    None => self.workers.keys().copied().collect(),
                };
                let slots: Vec<usize> = match target {
                    Some(id) => self.slots_of(id),
                    None => self.slots.keys().copied().collect(),
                };
                slots.into_iter().for_each(|slot| self.remove_slot(slot));
                for id in ids {
                    self.begin_drain(id, StopCause::Asked, now);
                }
                self.advance_reload(now);
                reply(self, Outcome::Done);
            }
            Command::Kill(id, _) if !self.workers.contains_key(&id) => {
                reply(self, Outcome::UnknownWorker(id));
            }
            Command::Kill(id, signal) => {
                // Node's `worker.kill()`: disconnect first, then signal; not replaced.
                for slot in self.slots_of(id) {
                    self.remove_slot(slot);
                }
                self.begin_drain(id, StopCause::Asked, now);
                let request = Some(request);
                self.out.push(Effect::Kill {
                    id,
                    signal,
                    request,
                });
                self.advance_reload(now);
            }
            Command::Reload => self.start_reload(request, now),
            Command::Stop => match &mut self.run {
                Run::Stopped => reply(self, Outcome::Done),
                Run::Stopping { waiters } => waiters.push(request),
                Run::Running => {
                    self.run = Run::Stopping {
                        waiters: vec![request],
                    };
                    self.begin_stop(now);
                }
            },
        }
    }

    /// The slots whose current worker is `id`.
    fn slots_of(&self, id: WorkerId) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|(_, s)| s.current() == Some(id))
            .map(|(slot, _)| *slot)
            .collect()
    }

    fn begin_stop(&mut self, now: Instant) {
        if let Some(reload) = self.reload.take() {
            for waiter in reload.waiters {
                self.out.push(Effect::Reply(waiter, Outcome::Done));
            }
        }
        let respawning: Vec<usize> = self.slots.keys().copied().collect();
        for slot in respawning {
            self.cancel_timer(Timer::Respawn(slot));
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.begin_drain(id, StopCause::Asked, now);
        }
        self.check_stopped();
    }

    fn check_stopped(&mut self) {
        if !matches!(self.run, Run::Stopping { .. }) || !self.workers.is_empty() {
            return;
        }
        let keys: Vec<HandleKey> = self.handles.keys().cloned().collect();
        for key in keys {
            self.close_handle(&key);
        }
        let timers: Vec<Timer> = self.timers.keys().cloned().collect();
        for timer in timers {
            self.cancel_timer(timer);
        }
        if let Run::Stopping { waiters } = std::mem::replace(&mut self.run, Run::Stopped) {
            for waiter in waiters {
                self.out.push(Effect::Reply(waiter, Outcome::Done));
            }
        }
        self.out.push(Effect::Finished);
    }
}
