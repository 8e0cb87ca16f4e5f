//! The supervisor task: owns the workers, slots and handles, and runs the protocol.
//!
//! Everything that changes cluster state happens here, one message at a time, so no
//! locks guard it. Per-worker tasks only move bytes: a reader forwards the worker's
//! frames, a writer sends control messages in order, a waiter reports the exit.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::{ForkOptions, Signal, Stdio};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handles::Handle;
use super::restart::{Decision, RestartTracker};
use super::{Command, Event, Reply, Stats, UserSender, WorkerState, WorkerStats};
use crate::error::Error;
use crate::protocol::{HandleKey, ToPrimary, ToWorker, WorkerId};
use crate::settings::{Policy, Settings};

/// What the per-worker tasks, accept loops and timers tell the supervisor.
#[derive(Debug)]
pub(crate) enum Internal {
    Message(WorkerId, ipc::Received),
    /// The worker's channel ended; `Some` when it broke (a malformed frame).
    ChannelClosed(WorkerId, Option<String>),
    Exited(WorkerId, child::ExitStatus),
    /// The worker exited a while ago but its channel has not reached its end yet.
    ExitGrace(WorkerId),
    Connection(HandleKey, std::net::TcpStream),
    Respawn(usize),
    DrainDeadline(WorkerId),
}

/// How long an exited worker's channel may stay open before the exit is reported anyway.
const EXIT_GRACE: Duration = Duration::from_secs(1);

type ControlSender = mpsc::UnboundedSender<(ToWorker, Vec<OwnedFd>)>;

#[derive(Debug)]
struct WorkerEntry {
    slot: usize,
    child: Arc<child::Child>,
    control: ControlSender,
    user: UserSender,
    state: WorkerState,
    started: Instant,
    /// Node's `exitedAfterDisconnect`: we asked it to stop.
    asked_to_stop: bool,
    online: bool,
    disconnect_emitted: bool,
    channel_closed: bool,
    listening: usize,
    handed: u64,
    restarts: u32,
    drain: Option<JoinHandle<()>>,
    /// The exit status, held until the channel's last messages have been read.
    exit_status: Option<child::ExitStatus>,
}

#[derive(Debug)]
struct Slot {
    current: Option<WorkerId>,
    last: Option<WorkerId>,
    tracker: RestartTracker,
    failed: bool,
}

#[derive(Debug, Default)]
struct Reload {
    pending: VecDeque<usize>,
    /// The slot being replaced, its old worker and how many servers the new one needs.
    current: Option<(usize, WorkerId, usize)>,
    waiters: Vec<Reply<()>>,
}

#[derive(Debug)]
pub(crate) struct Supervisor {
    settings: Settings,
    policy: Policy,
    program: OsString,
    next_id: u64,
    next_slot: usize,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    slots: BTreeMap<usize, Slot>,
    handles: HashMap<HandleKey, Handle>,
    internal: mpsc::Sender<Internal>,
    events: mpsc::Sender<Event>,
    dropped_events: u64,
    stopping: bool,
    stop_waiters: Vec<Reply<()>>,
    finished: bool,
    reload: Option<Reload>,
}

impl Supervisor {
    /// Forks the configured workers and spawns the supervisor task.
    pub(crate) fn start(
        settings: Settings,
        events: mpsc::Sender<Event>,
        commands: mpsc::Receiver<Command>,
    ) -> Result<(), Error> {
        let program = match &settings.program {
            Some(program) => program.clone(),
            None => std::env::current_exe()
                .map(Into::into)
                .unwrap_or_else(|_| "/proc/self/exe".into()),
        };
        let (internal, internal_rx) = mpsc::channel(1024);
        let mut supervisor = Supervisor {
            policy: settings.effective_policy(),
            settings,
            program,
            next_id: 1,
            next_slot: 0,
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            handles: HashMap::new(),
            internal,
            events,
            dropped_events: 0,
            stopping: false,
            stop_waiters: Vec::new(),
            finished: false,
            reload: None,
        };
        for _ in 0..supervisor.settings.workers {
            let slot = supervisor.new_slot();
            supervisor.fork_into(slot)?;
        }
        tokio::spawn(supervisor.run(commands, internal_rx));
        Ok(())
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        while !self.finished {
            let deadline = self.next_hold_deadline();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                Some(message) = internal.recv() => self.internal(message),
                () = sleep_until(deadline), if deadline.is_some() => self.expire_held(),
            }
        }
        tracing::debug!("supervisor finished");
    }

    fn emit(&mut self, event: Event) {
        if let Err(mpsc::error::TrySendError::Full(event)) = self.events.try_send(event) {
            self.dropped_events += 1;
            tracing::warn!(
                dropped = self.dropped_events,
                ?event,
                "event queue full, event dropped"
            );
        }
    }

    fn new_slot(&mut self) -> usize {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.slots.insert(
            slot,
            Slot {
                current: None,
                last: None,
                tracker: RestartTracker::new(self.settings.restart.clone()),
                failed: false,
            },
        );
        slot
    }

    /// Starts a worker as the current one of `slot`.
    fn fork_into(&mut self, slot: usize) -> Result<WorkerId, Error> {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let env = self.settings.env.clone();
        let silent = self.settings.silent;
        let options = ForkOptions::new()
            .parent_death_signal(Signal::SIGKILL)
            .map_spawn_options(|mut options| {
                options = options
                    .env(crate::WORKER_ID_ENV, id.to_string())
                    .kill_on_drop(true)
                    // Its own session and process group: a terminal's Ctrl-C or a signal
                    // sent to the primary's group reaches only the primary, which then
                    // stops the workers gracefully. The parent-death signal still ends
                    // a worker whose primary dies.
                    .detached(true);
                for (key, value) in env {
                    options = options.env(key, value);
                }
                if silent {
                    options = options
                        .stdin(Stdio::Null)
                        .stdout(Stdio::Null)
                        .stderr(Stdio::Null);
                }
                options
            });
        let mut child =
            child::fork(&self.program, &self.settings.args, options).map_err(Error::Fork)?;
        let (sender, receiver) = child.take_channel().map_err(Error::Fork)?.into_split();
        let pid = child.pid();
        let child = Arc::new(child);
        let user = Arc::new(tokio::sync::Mutex::new(sender));
        let (control, control_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_control(Arc::clone(&user), control_rx));
        tokio::spawn(read_worker(id, receiver, self.internal.clone()));
        tokio::spawn(wait_worker(id, Arc::clone(&child), self.internal.clone()));
        let restarts = self.slots.get(&slot).map_or(0, |s| s.tracker.restarts());
        self.workers.insert(
            id,
            WorkerEntry {
                slot,
                child,
                control,
                user,
                state: WorkerState::Forked,
                started: Instant::now(),
                asked_to_stop: false,
                online: false,
                disconnect_emitted: false,
                channel_closed: false,
                listening: 0,
                handed: 0,
                restarts,
                drain: None,
                exit_status: None,
            },
        );
        if let Some(slot) = self.slots.get_mut(&slot) {
            slot.current = Some(id);
            slot.last = Some(id);
        }
        tracing::debug!(%id, pid, slot, "forked a worker");
        self.emit(Event::Fork { id, pid });
        Ok(id)
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::AddWorker(reply) => {
                let result = if self.stopping {
                    Err(Error::Stopped)
                } else {
                    let slot = self.new_slot();
                    let result = self.fork_into(slot);
                    if result.is_err() {
                        self.slots.remove(&slot);
                    }
                    result
                };
                let _ = reply.send(result);
            }
            Command::RemoveWorker(reply) => {
                let newest = self
                    .slots
                    .iter()
                    .rev()
                    .find(|(_, s)| s.current.is_some())
                    .map(|(slot, s)| (*slot, s.current));
                let removed = newest.and_then(|(slot, current)| {
                    self.slots.remove(&slot);
                    current
                });
                if let Some(id) = removed {
                    self.begin_drain(id, true);
                }
                let _ = reply.send(removed);
            }
            Command::Disconnect(target, reply) => {
                let ids: Vec<WorkerId> = match target {
                    Some(id) if !self.workers.contains_key(&id) => {
                        let _ = reply.send(Err(Error::UnknownWorker(id)));
                        return;
                    }
                    Some(id) => vec![id],
                    None => self.workers.keys().copied().collect(),
                };
                for id in ids {
                    let slot = self.workers[&id].slot;
                    if self.slots.get(&slot).is_some_and(|s| s.current == Some(id)) {
                        self.slots.remove(&slot);
                    }
                    self.begin_drain(id, true);
                }
                let _ = reply.send(Ok(()));
            }
            Command::Kill(id, signal, reply) => {
                let result = match self.workers.get(&id) {
                    Some(worker) => worker.child.kill(signal).map(drop).map_err(Error::Kill),
                    None => Err(Error::UnknownWorker(id)),
                };
                let _ = reply.send(result);
            }
            Command::Senders(target, reply) => {
                let senders = self
                    .workers
                    .iter()
                    .filter(|(id, w)| target.is_none_or(|t| t == **id) && !w.channel_closed)
                    .map(|(_, w)| Arc::clone(&w.user))
                    .collect();
                let _ = reply.send(senders);
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Reload(reply) => self.start_reload(reply),
            Command::Stop(reply) => {
                self.stop_waiters.push(reply);
                self.begin_stop();
            }
        }
    }

    fn internal(&mut self, message: Internal) {
        match message {
            Internal::Message(id, message) => self.on_message(id, message),
            Internal::ChannelClosed(id, broken) => {
                if let Some(reason) = broken {
                    self.misbehaved(id, reason);
                }
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                worker.channel_closed = true;
                worker.state = WorkerState::Disconnected;
                let emit = !std::mem::replace(&mut worker.disconnect_emitted, true);
                // It can no longer answer: its in-flight hand-offs go to others.
                self.forget_worker(id);
                if emit {
                    self.emit(Event::Disconnect { id });
                }
                self.dispatch_all();
                if let Some(status) = self.workers.get_mut(&id).and_then(|w| w.exit_status.take()) {
                    self.on_exit(id, status);
                }
            }
            Internal::Exited(id, status) => {
                let Some(worker) = self.workers.get_mut(&id) else {
                    return;
                };
                if worker.channel_closed {
                    return self.on_exit(id, status);
                }
                // Messages the worker sent before exiting come first: wait for the end of
                // its channel (bounded, in case a descendant still holds it open).
                worker.exit_status = Some(status);
                let internal = self.internal.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(EXIT_GRACE).await;
                    let _ = internal.send(Internal::ExitGrace(id)).await;
                });
            }
            Internal::ExitGrace(id) => {
                if let Some(status) = self.workers.get_mut(&id).and_then(|w| w.exit_status.take()) {
                    self.on_exit(id, status);
                }
            }
            Internal::Connection(key, stream) => {
                if let Some(rr) = self.handles.get_mut(&key).and_then(Handle::round_robin) {
                    rr.push_connection(stream, Instant::now());
                    self.dispatch(&key);
                }
            }
            Internal::Respawn(slot) => self.respawn(slot),
            Internal::DrainDeadline(id) => {
                if let Some(worker) = self.workers.get(&id) {
                    tracing::warn!(%id, "drain deadline passed, killing the worker");
                    let _ = worker.child.kill(Signal::SIGKILL);
                }
            }
        }
    }

    fn on_message(&mut self, id: WorkerId, mut message: ipc::Received) {
        if !self.workers.contains_key(&id) {
            return;
        }
        if message.lane() == ipc::Lane::User {
            self.emit(Event::Message { id, message });
            return;
        }
        let decoded = message.decode::<ToPrimary>();
        let control = match decoded {
            Ok(control) if message.fds().is_empty() => control,
            Ok(_) => return self.misbehaved(id, "control message with descriptors".into()),
            Err(e) => return self.misbehaved(id, format!("undecodable control message: {e}")),
        };
        let _ = message.take_fds();
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match control {
            ToPrimary::Online => {
                worker.online = true;
                if worker.state == WorkerState::Forked {
                    worker.state = WorkerState::Online;
                }
                self.emit(Event::Online { id });
                self.advance_reload();
            }
            ToPrimary::QueryServer { seq, key, backlog } => {
                self.query_server(id, seq, key, backlog)
            }
            ToPrimary::Listening { key, address } => {
                worker.listening += 1;
                if matches!(worker.state, WorkerState::Forked | WorkerState::Online) {
                    worker.state = WorkerState::Listening;
                }
                self.emit(Event::Listening { id, address, key });
                self.advance_reload();
            }
            ToPrimary::Accepted { key, seq, accepted } => {
                if let Some(rr) = self.handles.get_mut(&key).and_then(Handle::round_robin) {
                    // An accepted connection is the worker's now: our copy closes here.
                    drop(rr.reply(id, seq, accepted));
                    if !accepted {
                        drop(rr.expire(Instant::now()));
                    }
                    self.dispatch(&key);
                }
            }
            ToPrimary::Close { key } => {
                if let Some(handle) = self.handles.get_mut(&key) {
                    handle.remove_worker(id);
                    if handle.is_unused() && !self.stopping {
                        // The application closed its last server on this handle.
                        self.handles.remove(&key);
                    } else {
                        self.dispatch(&key);
                    }
                }
            }
            ToPrimary::GoingDown { reason } => {
                let (slot, uptime) = (worker.slot, worker.started.elapsed());
                tracing::warn!(%id, ?reason, "worker is going down");
                self.emit(Event::GoingDown { id, reason });
                self.begin_drain(id, false);
                if let Some(s) = self.slots.get_mut(&slot)
                    && s.current == Some(id)
                {
                    s.current = None;
                    self.schedule_respawn(slot, uptime);
                }
            }
        }
    }

    fn query_server(&mut self, id: WorkerId, seq: u64, key: HandleKey, backlog: u32) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        let (slot, draining) = (worker.slot, worker.drain.is_some());
        let granted = match self.handles.get_mut(&key) {
            Some(handle) => handle.grant(id, slot).map(|g| (g, handle.address)),
            None => Handle::open(
                self.policy,
                &key,
                backlog,
                slot,
                self.settings.hold_connections,
                &self.internal,
            )
            .and_then(|mut handle| {
                let granted = handle.grant(id, slot)?;
                let address = handle.address;
                self.handles.insert(key.clone(), handle);
                Ok((granted, address))
            }),
        };
        let (reply, fds) = match granted {
            Ok(((granted, fd), address)) => (
                ToWorker::QueryReply {
                    seq,
                    result: Ok((granted, address)),
                },
                fd.into_iter().collect(),
            ),
            Err(e) => {
                tracing::debug!(%id, %key, error = %e, "listen refused");
                let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                (
                    ToWorker::QueryReply {
                        seq,
                        result: Err(errno),
                    },
                    Vec::new(),
                )
            }
        };
        if let Some(worker) = self.workers.get(&id) {
            let _ = worker.control.send((reply, fds));
        }
        if draining && let Some(handle) = self.handles.get_mut(&key) {
            handle.retire_worker(id);
        }
        self.dispatch(&key);
    }

    /// Sends queued connections of a round-robin handle to idle workers.
    fn dispatch(&mut self, key: &HandleKey) {
        let Some(rr) = self.handles.get_mut(key).and_then(Handle::round_robin) else {
            return;
        };
        while let Some(handoff) = rr.next_handoff() {
            let (id, seq) = (handoff.worker, handoff.seq);
            let copy = handoff.conn.try_clone().map(OwnedFd::from);
            let sent = match (copy, self.workers.get_mut(&id)) {
                (Ok(fd), Some(worker)) => {
                    worker.handed += 1;
                    let message = ToWorker::NewConn {
                        key: key.clone(),
                        seq,
                    };
                    worker.control.send((message, vec![fd])).is_ok()
                }
                _ => false,
            };
            if !sent {
                rr.remove_worker(id);
            }
        }
    }

    fn dispatch_all(&mut self) {
        let keys: Vec<HandleKey> = self.handles.keys().cloned().collect();
        for key in keys {
            self.dispatch(&key);
        }
    }

    /// Takes `id` out of every handle, queueing its in-flight hand-offs again.
    fn forget_worker(&mut self, id: WorkerId) {
        for handle in self.handles.values_mut() {
            handle.remove_worker(id);
        }
    }

    /// Asks `id` to stop: no new connections, `Disconnect`, and a kill at the deadline.
    fn begin_drain(&mut self, id: WorkerId, asked: bool) {
        let deadline = self.settings.drain_deadline;
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        worker.asked_to_stop |= asked;
        if worker.drain.is_some() {
            return;
        }
        if worker.state != WorkerState::Disconnected {
            worker.state = WorkerState::Disconnecting;
        }
        let _ = worker.control.send((ToWorker::Disconnect, Vec::new()));
        let internal = self.internal.clone();
        worker.drain = Some(tokio::spawn(async move {
            tokio::time::sleep(deadline).await;
            let _ = internal.send(Internal::DrainDeadline(id)).await;
        }));
        for handle in self.handles.values_mut() {
            handle.retire_worker(id);
        }
    }

    fn misbehaved(&mut self, id: WorkerId, reason: String) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        tracing::warn!(%id, %reason, "worker broke the protocol, killing it");
        let _ = worker.child.kill(Signal::SIGKILL);
        self.forget_worker(id);
        self.emit(Event::Misbehaved { id, reason });
        self.dispatch_all();
    }

    fn on_exit(&mut self, id: WorkerId, status: child::ExitStatus) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        if let Some(drain) = &worker.drain {
            drain.abort();
        }
        self.forget_worker(id);
        if !worker.disconnect_emitted {
            self.emit(Event::Disconnect { id });
        }
        tracing::debug!(%id, %status, "worker exited");
        self.emit(Event::Exit {
            id,
            status,
            exited_after_disconnect: worker.asked_to_stop,
        });
        let slot = worker.slot;
        match self.slots.get_mut(&slot) {
            Some(s) if s.current == Some(id) => {
                s.current = None;
                if !self.stopping {
                    self.schedule_respawn(slot, worker.started.elapsed());
                }
            }
            None if !self.workers.values().any(|w| w.slot == slot) => {
                for handle in self.handles.values_mut() {
                    handle.drop_slot(slot);
                }
            }
            _ => {}
        }
        self.dispatch_all();
        self.advance_reload();
        self.check_stopped();
    }

    fn schedule_respawn(&mut self, slot: usize, uptime: Duration) {
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        match s.tracker.on_crash(Instant::now(), uptime) {
            Decision::RestartAfter(delay) => {
                tracing::info!(slot, ?delay, "restarting a worker");
                let internal = self.internal.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = internal.send(Internal::Respawn(slot)).await;
                });
            }
            Decision::Failed => {
                s.failed = true;
                let id = s.last.unwrap_or(WorkerId(0));
                tracing::error!(slot, "crash loop: the slot is given up");
                self.emit(Event::SlotFailed { slot, id });
                self.advance_reload();
            }
            Decision::Never => {
                self.slots.remove(&slot);
                self.advance_reload();
            }
        }
    }

    fn respawn(&mut self, slot: usize) {
        if self.stopping
            || !self
                .slots
                .get(&slot)
                .is_some_and(|s| s.current.is_none() && !s.failed)
        {
            return;
        }
        if let Err(e) = self.fork_into(slot) {
            tracing::error!(slot, error = %e, "could not restart a worker");
            self.schedule_respawn(slot, Duration::ZERO);
        }
    }

    fn start_reload(&mut self, reply: Reply<()>) {
        if self.stopping {
            let _ = reply.send(());
            return;
        }
        let reload = self.reload.get_or_insert_with(|| Reload {
            pending: self
                .slots
                .iter()
                .filter(|(_, s)| s.current.is_some())
                .map(|(slot, _)| *slot)
                .collect(),
            ..Reload::default()
        });
        reload.waiters.push(reply);
        self.advance_reload();
    }

    /// Moves the rolling reload on: when the slot being replaced has a new worker
    /// listening as much as the old one, the old one is asked to stop and the next slot
    /// starts.
    fn advance_reload(&mut self) {
        let Some(mut reload) = self.reload.take() else {
            return;
        };
        loop {
            if let Some((slot, old, target)) = reload.current {
                match self.slots.get_mut(&slot) {
                    Some(s) if s.failed => {
                        // The new code crash-loops: keep the old worker serving.
                        tracing::error!(
                            slot,
                            "reload failed for this slot; keeping the old worker"
                        );
                        if self.workers.contains_key(&old) {
                            s.current = Some(old);
                            s.failed = false;
                        }
                    }
                    Some(s) => {
                        let ready = s
                            .current
                            .and_then(|id| self.workers.get(&id))
                            .is_some_and(|w| w.online && w.listening >= target);
                        if !ready {
                            self.reload = Some(reload);
                            return;
                        }
                        self.begin_drain(old, true);
                    }
                    None => self.begin_drain(old, true),
                }
                reload.current = None;
            }
            let Some(slot) = reload.pending.pop_front() else {
                for waiter in reload.waiters {
                    let _ = waiter.send(());
                }
                return;
            };
            let Some(old) = self.slots.get(&slot).and_then(|s| s.current) else {
                continue;
            };
            let Some(target) = self
                .workers
                .get(&old)
                .filter(|w| w.drain.is_none())
                .map(|w| w.listening)
            else {
                continue;
            };
            match self.fork_into(slot) {
                Ok(new) => {
                    tracing::info!(slot, %old, %new, "reload: replacing a worker");
                    reload.current = Some((slot, old, target));
                }
                Err(e) => {
                    tracing::error!(slot, error = %e, "reload: could not start a worker");
                    if let Some(s) = self.slots.get_mut(&slot) {
                        s.current = Some(old);
                    }
                }
            }
        }
    }

    fn begin_stop(&mut self) {
        self.stopping = true;
        if let Some(reload) = self.reload.take() {
            for waiter in reload.waiters {
                let _ = waiter.send(());
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.begin_drain(id, true);
        }
        self.check_stopped();
    }

    fn check_stopped(&mut self) {
        if !self.stopping || !self.workers.is_empty() {
            return;
        }
        self.handles.clear();
        for waiter in self.stop_waiters.drain(..) {
            let _ = waiter.send(());
        }
        self.finished = true;
    }

    fn next_hold_deadline(&mut self) -> Option<Instant> {
        self.handles
            .values_mut()
            .filter_map(|h| h.round_robin().and_then(|rr| rr.next_deadline()))
            .min()
    }

    fn expire_held(&mut self) {
        let now = Instant::now();
        for (key, handle) in &mut self.handles {
            if let Some(rr) = handle.round_robin() {
                let expired = rr.expire(now);
                if !expired.is_empty() {
                    tracing::warn!(%key, count = expired.len(), "closing connections no worker took in time");
                }
            }
        }
    }

    fn stats(&mut self) -> Stats {
        let mut stats = Stats {
            queued: 0,
            failed_slots: self
                .slots
                .iter()
                .filter(|(_, s)| s.failed)
                .map(|(slot, _)| *slot)
                .collect(),
            workers: Vec::new(),
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
                pid: worker.child.pid(),
                slot: worker.slot,
                state: worker.state,
                handed: worker.handed,
                in_flight,
                restarts: worker.restarts,
            });
        }
        stats
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Kill every worker still running; the waiter tasks (or the child crate's
        // reaper, once the last handle drops) reap them.
        for worker in self.workers.values() {
            let _ = worker.child.kill(Signal::SIGKILL);
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

async fn write_control(
    sender: UserSender,
    mut rx: mpsc::UnboundedReceiver<(ToWorker, Vec<OwnedFd>)>,
) {
    while let Some((message, fds)) = rx.recv().await {
        if let Err(e) = sender.lock().await.send_control(&message, fds).await {
            tracing::debug!(error = %e, "channel to a worker closed");
            return;
        }
    }
}

async fn read_worker(id: WorkerId, mut receiver: ipc::Receiver, internal: mpsc::Sender<Internal>) {
    let broken = loop {
        match receiver.recv().await {
            Ok(Some(message)) => {
                if internal.send(Internal::Message(id, message)).await.is_err() {
                    return;
                }
            }
            Ok(None) | Err(ipc::Error::Closed | ipc::Error::UnexpectedEof { .. }) => break None,
            Err(e) => break Some(format!("broken channel: {e}")),
        }
    };
    let _ = internal.send(Internal::ChannelClosed(id, broken)).await;
}

async fn wait_worker(id: WorkerId, child: Arc<child::Child>, internal: mpsc::Sender<Internal>) {
    let status = match child.wait().await {
        Ok(status) => status,
        Err(e) => {
            tracing::error!(%id, error = %e, "waiting for a worker failed");
            child::ExitStatus::Exited(-1)
        }
    };
    let _ = internal.send(Internal::Exited(id, status)).await;
}
