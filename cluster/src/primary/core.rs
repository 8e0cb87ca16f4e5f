//! The primary's whole state as a pure state machine: no I/O, no clock, no tasks.
//!
//! [`Core::handle`] takes one [`Input`] (a worker's message, an exit, a closed channel,
//! an accepted connection, time passing, a request) with the time it happened, and
//! returns the [`Effect`]s the driver must perform, in order: fork, send, kill, bind,
//! close, emit an event, forget a worker, reply to a request. The core keeps its own deadlines
//! (`timers.rs`); the driver asks [`Core::poll_timeout`] after every batch of effects,
//! sleeps until then and feeds [`Input::Tick`]. The driver (`driver.rs`) owns the
//! processes, channels and sockets and feeds the results back (`Forked`, `Bound`, ...),
//! so that everything the cluster decides is decided here and model-checked by
//! `core/tests.rs`.
//!
//! Invariants kept here (and checked by the property test):
//!
//! - every forked worker leaves exactly one `Exit` event, after its `Disconnect`; its
//!   events come in Node's order: fork, online, listening, disconnect, exit;
//! - a round-robin connection is handed to exactly one worker that accepts it, or closed;
//! - no timer is armed in the past;
//! - a stop ends with no worker, no handle and [`Core::poll_timeout`] `None`.

mod control;
mod handles;
mod lifecycle;
mod reload;
mod serving;
mod spares;
mod status;
#[cfg(test)]
mod tests;
mod timers;
mod usage;
mod workers;

use crate::Endpoint;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::time::{Duration, Instant};

use child::Signal;

pub(crate) use self::handles::ConnId;
use self::handles::Handle;
pub(crate) use self::lifecycle::StopCause;
use self::lifecycle::{Slot, WorkerEntry};
use self::reload::Reload;
pub(crate) use self::timers::Timer;
use self::timers::Timers;
pub(crate) use self::usage::Sample;
use super::stats::{ReloadReport, Totals};
use super::{Event, ReloadFailure, SlotFailure};
pub(crate) use crate::protocol::{HANDOFF_WINDOW, MAX_SERVERS_PER_WORKER};
use crate::protocol::{HandleKey, ToPrimary, ToWorker, WorkerId};
use crate::settings::{Policy, RestartPolicy};

/// How many control messages can be waiting for one worker at most, by the protocol:
/// a reply per server asked for, a window of hand-offs in flight per server, and a
/// disconnect.
pub(crate) const CONTROL_QUEUE: usize = (1 + HANDOFF_WINDOW) * MAX_SERVERS_PER_WORKER + 2;

/// How many accepted connections may wait in the primary for a round-robin worker, per
/// handle. At the bound the primary stops accepting on that handle, so the rest wait in
/// the kernel's listen backlog (bounded by the backlog) instead of its memory.
pub(crate) const MAX_HELD: usize = 1024;

/// How long to wait before retrying a fork that failed for lack of resources (EMFILE,
/// ENFILE, EAGAIN, ENOMEM).
pub(crate) const RESOURCE_RETRY: Duration = Duration::from_millis(250);

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
    /// How long a reload step may wait for the new worker to listen.
    pub(crate) reload_timeout: Duration,
    /// How many connections may wait per round-robin handle (see [`MAX_HELD`]).
    pub(crate) max_held: usize,
    /// How long a worker with hand-offs in flight may answer none before it counts as
    /// hung: killed and replaced, its hand-offs given to others.
    pub(crate) handoff_timeout: Duration,
    /// How long a new worker may take to report online before it is reported.
    pub(crate) connect_timeout: Duration,
    /// Whether a worker counts as ready only once it says so.
    pub(crate) wait_ready: bool,
    /// How often to sample the workers' memory and CPU (`None`: never).
    pub(crate) sample_every: Option<Duration>,
    /// The resident set size a worker may stay above for [`usage::OVER_LIMIT_SAMPLES`]
    /// samples before it is replaced.
    pub(crate) max_rss: Option<u64>,
    /// How long a stop keeps serving, not ready, before its workers are asked to drain.
    pub(crate) stop_delay: Duration,
    /// How many warm spares to keep (`spares.rs`).
    pub(crate) warm_spares: usize,
}

/// A request's tag; the driver keeps the reply channel until the core answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RequestId(pub(crate) u64);

/// What the `Primary` handle asks of the core (the driver answers the handle's queries,
/// which change nothing, itself).
#[derive(Debug)]
pub(crate) enum Request {
    /// A new slot, with extra environment for its workers.
    AddWorker {
        env: Vec<(OsString, OsString)>,
    },
    RemoveWorker,
    Disconnect(Option<WorkerId>),
    Kill(WorkerId, Signal),
    Reload,
    /// Stop; with a grace, workers drain for that long instead of the drain deadline.
    Stop {
        grace: Option<Duration>,
    },
}

/// The answer to a request (or to the start).
#[derive(Debug)]
pub(crate) enum Outcome {
    Done,
    Added(WorkerId),
    /// The fork failed: the driver's error, which the core passes on to the reply.
    ForkFailed(child::Error),
    /// The signal of a `Kill` could not be sent: the driver's error, passed on.
    KillFailed(child::Error),
    Removed(Option<WorkerId>),
    UnknownWorker(WorkerId),
    /// A reload ended (or was cut short by a stop).
    Reloaded(ReloadReport),
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
    /// The driver could not start it. The core decides what the error means (for lack
    /// of resources, it passes) and which reply reports it, if any.
    ForkFailed {
        id: WorkerId,
        error: child::Error,
    },
    /// The result of a `Kill` effect made for a request.
    Signaled {
        request: RequestId,
        result: Result<(), child::Error>,
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
    /// A grant's listening socket could not be copied for the worker (out of
    /// descriptors): the grant is withdrawn and the worker told `errno`.
    GrantFailed {
        id: WorkerId,
        key: HandleKey,
        seq: u64,
        errno: i32,
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
        result: Result<Endpoint, i32>,
    },
    /// A round-robin handle accepted a connection.
    Connection {
        key: HandleKey,
        conn: ConnId,
    },
    /// The answer to a `Sample` effect: each worker's memory and CPU (`None` when its
    /// `/proc` entry could not be read: it is ending).
    Usage(Vec<(WorkerId, Option<Sample>)>),
    /// Time passed: every timer due at `now` fires (see [`Core::poll_timeout`]).
    Tick,
    Request(RequestId, Request),
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
    /// Start a worker for `slot` (`None`: a warm spare); answer with `Forked` or
    /// `ForkFailed`.
    Fork {
        id: WorkerId,
        slot: Option<usize>,
        env: Vec<(OsString, OsString)>,
    },
    /// Queue a control message for a worker.
    Send {
        id: WorkerId,
        message: ToWorker,
        fd: Option<FdRef>,
    },
    /// Signal a worker; with a `request`, answer with `Signaled` (the core replies).
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
        address: Option<Endpoint>,
        backlog: u32,
    },
    /// Close every socket of a handle.
    CloseHandle(HandleKey),
    /// Stop (`false`) or resume (`true`) accepting on a round-robin handle.
    Accept {
        key: HandleKey,
        on: bool,
    },
    /// Close one reuseport slot's socket.
    CloseSocket {
        key: HandleKey,
        socket: usize,
    },
    /// Close the driver's copy of a connection.
    CloseConn(ConnId),
    Emit(Event),
    /// Read these workers' memory and CPU; answer with `Usage`.
    Sample(Vec<(WorkerId, u32)>),
    /// The worker is gone (its `Exit` was emitted): drop its process and channel.
    Forget(WorkerId),
    Reply(RequestId, Outcome),
    /// The primary has ended: after a stop nothing is left; after a failed start (see
    /// [`Core::start`]) the driver ends, killing what was forked.
    Finished,
}

/// The start in progress: its request and the first-generation forks not yet answered.
#[derive(Debug)]
struct Starting {
    request: RequestId,
    waiting: BTreeSet<WorkerId>,
}

#[derive(Debug)]
enum Run {
    Running,
    /// A stop with a delay: serving on, not ready, until the `StopDelay` timer.
    Leaving {
        waiters: Vec<RequestId>,
    },
    Stopping {
        waiters: Vec<RequestId>,
    },
    Stopped,
}

/// The primary's state. See the module docs.
#[derive(Debug)]
pub(crate) struct Core {
    config: Config,
    next_id: u64,
    next_slot: usize,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    slots: BTreeMap<usize, Slot>,
    handles: HashMap<HandleKey, Handle>,
    timers: Timers,
    /// `AddWorker` requests waiting for their fork.
    adding: HashMap<WorkerId, RequestId>,
    /// The start's request, while first-generation forks are unanswered.
    starting: Option<Starting>,
    reload: Option<Reload>,
    /// How the last asked-for reload ended.
    last_reload: Option<ReloadReport>,
    run: Run,
    /// How long a worker asked to stop may drain: the drain deadline, or a stop's grace.
    drain_deadline: Duration,
    /// When the core was made.
    born: Instant,
    /// Counts since the start.
    totals: Totals,
    /// Warm spares' bookkeeping.
    spares: spares::Spares,
    /// When the input being handled happened (the core reads no clock).
    now: Instant,
    out: Vec<Effect>,
}

impl Core {
    /// A core whose first input comes at or after `now`.
    pub(crate) fn new(config: Config, now: Instant) -> Self {
        let spare_tracker = crate::primary::restart::RestartTracker::new(config.restart.clone());
        Self {
            drain_deadline: config.drain_deadline,
            config,
            next_id: 1,
            next_slot: 0,
            workers: BTreeMap::new(),
            slots: BTreeMap::new(),
            handles: HashMap::new(),
            timers: Timers::default(),
            adding: HashMap::new(),
            starting: None,
            reload: None,
            last_reload: None,
            run: Run::Running,
            born: now,
            totals: Totals::default(),
            spares: spares::Spares {
                generation: 0,
                tracker: spare_tracker,
                given_up: false,
            },
            now,
            out: Vec::new(),
        }
    }

    /// Forks the configured workers. `request` is answered once every fork is: `Done`,
    /// or `ForkFailed` with the first error, after which the primary is `Finished` (a
    /// primary whose program cannot start does not start).
    pub(crate) fn start(&mut self, now: Instant, request: RequestId) -> Vec<Effect> {
        self.now = now;
        let mut waiting = BTreeSet::new();
        for _ in 0..self.config.workers {
            let slot = self.new_slot(Vec::new());
            waiting.insert(self.fork_into(slot, now));
        }
        match waiting.is_empty() {
            true => self.out.push(Effect::Reply(request, Outcome::Done)),
            false => self.starting = Some(Starting { request, waiting }),
        }
        if let Some(every) = self.config.sample_every {
            self.start_timer(Timer::Sample, now + every);
        }
        self.ensure_spares(now);
        std::mem::take(&mut self.out)
    }

    /// Reacts to `input`, which happened at `now`; returns what to do, in order.
    pub(crate) fn handle(&mut self, now: Instant, input: Input) -> Vec<Effect> {
        self.now = now;
        match input {
            Input::Forked { id, pid } => self.on_forked(id, pid),
            Input::ForkFailed { id, error } => self.on_fork_failed(id, error, now),
            Input::Signaled { request, result } => {
                let outcome = result.map_or_else(Outcome::KillFailed, |()| Outcome::Done);
                self.out.push(Effect::Reply(request, outcome));
            }
            Input::Message { id, message } => self.on_message(id, message, now),
            Input::Malformed { id, reason } => self.misbehaved(id, reason),
            Input::SendFailed { id } => self.misbehaved(id, "its control queue is full".into()),
            Input::GrantFailed {
                id,
                key,
                seq,
                errno,
            } => self.on_grant_failed(id, &key, seq, errno, now),
            Input::HandoffFailed { id, key, seq } => self.on_handoff_failed(id, &key, seq, now),
            Input::ChannelClosed { id, broken } => self.on_channel_closed(id, broken, now),
            Input::Exited { id, status } => self.on_exited(id, status, now),
            Input::Bound {
                key,
                socket,
                result,
            } => self.on_bound(&key, socket, result, now),
            Input::Connection { key, conn } => self.on_connection(key, conn, now),
            Input::Usage(samples) => self.on_usage(samples, now),
            Input::Tick => self.on_tick(now),
            Input::Request(request, asked) => self.on_request(request, asked, now),
        }
        // Whatever changed a round-robin queue, its accepting follows its length.
        self.update_accepting();
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

    /// When the core next needs `Input::Tick`: its earliest deadline. The driver sleeps
    /// until then (asking again after every batch of effects); `None` once nothing is
    /// armed, which a finished stop always is.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next_deadline()
    }

    /// Whether every slot has a worker listening and no stop has begun. During a reload
    /// step the slot's old worker, still serving, counts for it.
    pub(crate) fn ready(&self) -> bool {
        let serving = |id: Option<WorkerId>| {
            id.and_then(|id| self.workers.get(&id))
                .is_some_and(|w| w.serves(1))
        };
        matches!(self.run, Run::Running)
            && !self.slots.is_empty()
            && self
                .slots
                .iter()
                .all(|(slot, s)| serving(s.current()) || serving(self.reload_keeps_old(*slot)))
    }

    /// Whether workers are kept: no stop has begun, or it is still in its delay.
    fn running(&self) -> bool {
        matches!(self.run, Run::Running | Run::Leaving { .. })
    }

    /// Emits `event`, counting it in the totals.
    fn emit(&mut self, event: Event) {
        match &event {
            Event::Fork { .. } => self.totals.starts += 1,
            Event::Exit { cause, .. } => self.totals.exits.add(*cause),
            Event::ReloadEnded { report } if report.succeeded() => {
                self.totals.reloads_succeeded += 1;
            }
            Event::ReloadEnded { .. } => self.totals.reloads_failed += 1,
            _ => {}
        }
        self.out.push(Effect::Emit(event));
    }

    fn send(&mut self, id: WorkerId, message: ToWorker, fd: Option<FdRef>) {
        self.out.push(Effect::Send { id, message, fd });
    }

    fn start_timer(&mut self, timer: Timer, at: Instant) {
        self.timers.start(timer, at);
    }

    fn cancel_timer(&mut self, timer: Timer) {
        self.timers.cancel(&timer);
    }
}
