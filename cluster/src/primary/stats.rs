//! What a running primary reports about itself: [`Stats`], a snapshot of the core's
//! state (workers, slots, reload, totals since the start) with what the driver measured
//! (each worker's memory and CPU, its build), and the names the status, the events and
//! the metrics share ([`ExitCause`], [`ReloadReport`]).

use std::time::Duration;

use crate::Endpoint;
use crate::protocol::WorkerId;
use crate::settings::Policy;

/// Where a worker is in its life (Node's `worker.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Started, not yet online.
    Forked,
    /// Online, no server listening yet.
    Online,
    /// At least one server listening.
    Listening,
    /// Asked to stop (or going down), draining.
    Disconnecting,
    /// Its channel closed; waiting for the process to end.
    Disconnected,
}

impl WorkerState {
    /// The state as `cluster status` shows it: `starting`, `online`, `listening`,
    /// `draining` (asked to stop, or its channel closed while it ends).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forked => "starting",
            Self::Online => "online",
            Self::Listening => "listening",
            Self::Disconnecting | Self::Disconnected => "draining",
        }
    }
}

/// Why a worker ended, as the events, the status and the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitCause {
    /// It exited with a non-zero code on its own, panicked, or broke the protocol.
    Crash,
    /// A signal ended it that the primary did not send (an OOM kill, a `kill -9`).
    Signal,
    /// The primary asked it to stop: a stop, a reload, a scale-down, `Primary::kill`.
    Asked,
    /// It left on its own without failing: it disconnected itself or exited 0.
    Disconnect,
    /// The primary replaced it for staying above
    /// [`Settings::max_worker_rss`](crate::Settings::max_worker_rss).
    MemoryLimit,
}

impl ExitCause {
    /// Every cause, in a fixed order (the metrics' label values).
    pub const ALL: [ExitCause; 5] = [
        Self::Crash,
        Self::Signal,
        Self::Asked,
        Self::Disconnect,
        Self::MemoryLimit,
    ];

    /// `crash`, `signal`, `asked`, `disconnect`, `memory limit`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Crash => "crash",
            Self::Signal => "signal",
            Self::Asked => "asked",
            Self::Disconnect => "disconnect",
            Self::MemoryLimit => "memory limit",
        }
    }
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a rolling reload could not replace a slot's worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadFailure {
    /// The new workers crashed past the crash-loop limit.
    CrashLoop,
    /// The new worker was not listening on as many servers as the old one within
    /// [`Settings::reload_timeout`](crate::Settings::reload_timeout).
    NotListening {
        /// How long it was given.
        waited: Duration,
    },
}

/// A slot the reload could not replace: its old worker kept serving it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SlotReloadFailure {
    /// The slot.
    pub slot: usize,
    /// The last new worker (crashed, or stopped for not listening in time); `None` when
    /// none could even start.
    pub id: Option<WorkerId>,
    /// The old worker, still serving.
    pub kept: WorkerId,
    /// Why.
    pub reason: ReloadFailure,
}

/// How a rolling reload ended ([`Primary::reload`](crate::Primary::reload)'s answer).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// The slots whose worker was replaced.
    pub replaced: Vec<usize>,
    /// The slots that kept their old worker, and why.
    pub failed: Vec<SlotReloadFailure>,
    /// How long it took, from the request to the last slot.
    pub took: Duration,
    /// The reload ended because the primary began to stop; the slots not reached are in
    /// neither list.
    pub interrupted: bool,
}

impl ReloadReport {
    /// Whether every slot it reached was replaced and no stop cut it short.
    pub fn succeeded(&self) -> bool {
        self.failed.is_empty() && !self.interrupted
    }
}

/// A reload in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadProgress {
    /// Slots replaced (or failed) so far in this pass.
    pub done: usize,
    /// Slots in this pass.
    pub total: usize,
    /// The slot being replaced now.
    pub slot: Option<usize>,
}

/// How a slot's last worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastExit {
    /// The worker.
    pub id: WorkerId,
    /// Its exit code or signal.
    pub status: child::ExitStatus,
    /// Why it ended.
    pub cause: ExitCause,
}

/// A worker's memory and CPU, sampled by the primary from `/proc` (only while something
/// reads them: a control socket, metrics, or a memory limit is set).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Usage {
    /// Resident set size, in bytes.
    pub rss_bytes: u64,
    /// User and system CPU time since it started.
    pub cpu_time: Duration,
    /// CPU use between the last two samples, in percent of one core (`None` after the
    /// first sample).
    pub cpu_percent: Option<f64>,
}

/// One worker's line in [`Stats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The worker.
    pub id: WorkerId,
    /// Its process id.
    pub pid: u32,
    /// The slot it runs in.
    pub slot: usize,
    /// Its state.
    pub state: WorkerState,
    /// How long since it was started.
    pub uptime: Duration,
    /// Connections handed to it by round-robin.
    pub handed: u64,
    /// Round-robin hand-offs it has not answered yet (at most a small window per server).
    pub in_flight: usize,
    /// How many replacements its slot had before it.
    pub restarts: u32,
    /// The addresses it listens on.
    pub listening: Vec<Endpoint>,
    /// Its last memory and CPU sample, if sampling is on.
    pub usage: Option<Usage>,
    /// A warm spare, in no slot yet (its `slot` means nothing).
    pub spare: bool,
    /// Which build of the program it runs: the program file's size and modification
    /// time when it was started, as a short hex id (workers with different ids run
    /// different code).
    pub build: Option<String>,
}

/// One slot's line in [`Stats`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SlotStats {
    /// The slot.
    pub slot: usize,
    /// Its current worker, if it has one (not while it waits to restart one, or once
    /// given up).
    pub worker: Option<WorkerId>,
    /// How many times it started a worker after its first.
    pub restarts: u32,
    /// How its last worker ended, if one did.
    pub last_exit: Option<LastExit>,
    /// Given up (a crash loop, or a lasting listen failure).
    pub failed: bool,
}

/// Exits by cause since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ExitCounts {
    /// [`ExitCause::Crash`].
    pub crash: u64,
    /// [`ExitCause::Signal`].
    pub signal: u64,
    /// [`ExitCause::Asked`].
    pub asked: u64,
    /// [`ExitCause::Disconnect`].
    pub disconnect: u64,
    /// [`ExitCause::MemoryLimit`].
    pub memory_limit: u64,
}

impl ExitCounts {
    /// The count for `cause`.
    pub fn get(&self, cause: ExitCause) -> u64 {
        match cause {
            ExitCause::Crash => self.crash,
            ExitCause::Signal => self.signal,
            ExitCause::Asked => self.asked,
            ExitCause::Disconnect => self.disconnect,
            ExitCause::MemoryLimit => self.memory_limit,
        }
    }

    pub(crate) fn add(&mut self, cause: ExitCause) {
        let count = match cause {
            ExitCause::Crash => &mut self.crash,
            ExitCause::Signal => &mut self.signal,
            ExitCause::Asked => &mut self.asked,
            ExitCause::Disconnect => &mut self.disconnect,
            ExitCause::MemoryLimit => &mut self.memory_limit,
        };
        *count += 1;
    }

    /// Every exit.
    pub fn total(&self) -> u64 {
        ExitCause::ALL.iter().map(|c| self.get(*c)).sum()
    }
}

/// Counts since the primary started (monotonic: Prometheus counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Totals {
    /// Workers started.
    pub starts: u64,
    /// Workers ended, by cause.
    pub exits: ExitCounts,
    /// Reloads that replaced every slot they reached.
    pub reloads_succeeded: u64,
    /// Reloads that left at least one slot on its old worker (or were cut short by a stop).
    pub reloads_failed: u64,
    /// Connections handed to workers by round-robin.
    pub handed: u64,
    /// Times a round-robin handle stopped accepting: its queue was full (no worker took
    /// connections), or `accept` failed for lack of descriptors (`EMFILE`, `ENFILE`).
    pub accept_pauses: u64,
    /// Events dropped because the application did not read the event queue.
    pub dropped_events: u64,
}

/// A snapshot of the cluster.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Stats {
    /// Live workers by id.
    pub workers: Vec<WorkerStats>,
    /// The slots in order (a slot keeps its number across its workers).
    pub slots: Vec<SlotStats>,
    /// Connections the primary holds for lack of a worker.
    pub queued: usize,
    /// Slots given up after a crash loop.
    pub failed_slots: Vec<usize>,
    /// Whether the cluster is ready for traffic: no stop has begun and every slot has a
    /// worker listening (during a reload step, the old worker that still serves counts).
    pub ready: bool,
    /// A stop has begun (the stop delay included).
    pub stopping: bool,
    /// How connections reach the workers.
    pub policy: Policy,
    /// How long since the primary started.
    pub uptime: Duration,
    /// The reload in progress.
    pub reload: Option<ReloadProgress>,
    /// How the last reload ended.
    pub last_reload: Option<ReloadReport>,
    /// Counts since the start.
    pub totals: Totals,
}
