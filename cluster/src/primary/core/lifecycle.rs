//! A worker's life and a slot's occupant, each one enum whose variants carry their data.
//!
//! ```text
//!  Starting --Forked--> Forked --Online--> Online ------------drain--> Draining{cause}
//!      |                  |  \-------------------------------drain--/ (online: false;
//!      |                  |                    |          a late Online is no offence)
//!      |                  +-------- channel closed ----------+--------------+
//!      |                  |                                  v
//!      |                  +-------- exit ------------> Exited{status}   Disconnected{cause}
//!      |                                                     |               |
//!   ForkFailed                        channel closed or grace timer         exit
//!      v                                                     v               v
//!    (gone, no event)                                  (gone: Disconnect?, Exit)
//! ```
//!
//! A worker leaves the table exactly once, and that is when its `Exit` event is emitted.

use std::collections::HashMap;
use std::time::Instant;

use crate::WorkerState;
use crate::primary::restart::RestartTracker;
use crate::primary::stats::{ExitCause, LastExit, Usage};
use crate::protocol::{HandleKey, WorkerId};

/// Why a worker is stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopCause {
    /// The primary asked: disconnect, kill, stop, reload or removal. Node's
    /// `exitedAfterDisconnect`.
    Asked,
    /// The worker disconnected itself ([`crate::Worker::disconnect`]); also
    /// `exitedAfterDisconnect`, and its slot is refilled at once without counting a crash.
    WorkerDisconnected,
    /// The worker panicked and is draining; its slot counted a crash.
    Panicked,
    /// The worker broke the protocol and was killed.
    Misbehaved,
    /// The primary replaced it for staying above the memory limit (asked, like a reload).
    MemoryLimit,
}

impl StopCause {
    /// Node's `exitedAfterDisconnect`.
    pub(crate) fn exited_after_disconnect(self) -> bool {
        matches!(
            self,
            Self::Asked | Self::WorkerDisconnected | Self::MemoryLimit
        )
    }

    /// Why a worker that was stopping for `cause` (if it was) and ended with `status`
    /// ended, as events, status and metrics say it.
    pub(crate) fn exit_cause(cause: Option<StopCause>, status: child::ExitStatus) -> ExitCause {
        match cause {
            Some(Self::MemoryLimit) => ExitCause::MemoryLimit,
            Some(Self::Asked) => ExitCause::Asked,
            Some(Self::WorkerDisconnected) => ExitCause::Disconnect,
            Some(Self::Panicked | Self::Misbehaved) => ExitCause::Crash,
            None => match status {
                child::ExitStatus::Signaled { .. } => ExitCause::Signal,
                child::ExitStatus::Exited(0) => ExitCause::Disconnect,
                _ => ExitCause::Crash,
            },
        }
    }

    /// The cause that stands when `self` holds and `other` happens too: an intentional
    /// stop wins over a panic, nothing overrides a protocol violation.
    pub(crate) fn merge(self, other: StopCause) -> StopCause {
        match (self, other) {
            (Self::Misbehaved, _) | (_, Self::Misbehaved) => Self::Misbehaved,
            (Self::Panicked, cause) => cause,
            (cause, _) => cause,
        }
    }
}

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The core asked the driver to fork it; the driver answers at once.
    Starting,
    /// Running, not online yet; `overdue` once it has not connected within the connect
    /// timeout (it may not speak the protocol at all: a stop then also sends `SIGTERM`).
    Forked { pid: u32, overdue: bool },
    /// Online and serving (its servers are in [`WorkerEntry::servers`]).
    Online { pid: u32 },
    /// Asked to stop (or going down): no new connections, a deadline to exit by.
    /// `online` says whether it had come online before; one told to stop while still
    /// starting may report online afterwards, which is no offence.
    Draining {
        pid: u32,
        cause: StopCause,
        online: bool,
    },
    /// Its channel closed (`Disconnect` emitted); waiting for the process to end.
    Disconnected { pid: u32, cause: Option<StopCause> },
    /// The process ended but its channel is still open: its last messages come first,
    /// for a bounded grace time (`online` as in `Draining`).
    Exited {
        pid: u32,
        status: child::ExitStatus,
        cause: Option<StopCause>,
        online: bool,
    },
}

impl Phase {
    /// The process id, once forked.
    pub(crate) fn pid(&self) -> Option<u32> {
        match *self {
            Self::Starting => None,
            Self::Forked { pid, .. }
            | Self::Online { pid, .. }
            | Self::Draining { pid, .. }
            | Self::Disconnected { pid, .. }
            | Self::Exited { pid, .. } => Some(pid),
        }
    }

    /// Why it is stopping, if it is.
    pub(crate) fn cause(&self) -> Option<StopCause> {
        match *self {
            Self::Draining { cause, .. } => Some(cause),
            Self::Disconnected { cause, .. } | Self::Exited { cause, .. } => cause,
            _ => None,
        }
    }

    /// Whether it has reported online (as far as its messages are still read).
    pub(crate) fn came_online(&self) -> bool {
        match *self {
            Self::Online { .. } => true,
            Self::Draining { online, .. } | Self::Exited { online, .. } => online,
            Self::Starting | Self::Forked { .. } | Self::Disconnected { .. } => false,
        }
    }

    /// Whether it may be given a server: not asked to stop. Node's primary drops the
    /// `queryServer` of a disconnecting worker, and must: a Node worker whose `listen()`
    /// crossed its `disconnect` closes its servers (none yet) and its channel, and would
    /// then take a grant and serve on with nothing left to stop it.
    pub(crate) fn takes_servers(&self) -> bool {
        matches!(self, Self::Forked { .. } | Self::Online { .. })
    }

    /// Whether its control messages are still read: it is running, talking and has not
    /// been condemned for breaking the protocol.
    pub(crate) fn talks(&self) -> bool {
        match self {
            Self::Forked { .. } | Self::Online { .. } => true,
            Self::Draining { cause, .. } => *cause != StopCause::Misbehaved,
            Self::Exited { cause, .. } => *cause != Some(StopCause::Misbehaved),
            Self::Starting | Self::Disconnected { .. } => false,
        }
    }

    /// Whether its channel is still open (user messages can reach it).
    pub(crate) fn connected(&self) -> bool {
        !matches!(self, Self::Starting | Self::Disconnected { .. })
    }
}

/// Where one of a worker's servers stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Server {
    /// The primary granted the handle; the worker has not reported it listening yet.
    Granted,
    /// Granted and reported listening.
    Listening,
    /// Bound by the worker itself (`exclusive`) and reported listening.
    Exclusive,
}

/// One worker in the core's table (the public handle on a worker's own side is
/// [`crate::Worker`]).
#[derive(Debug)]
pub(crate) struct WorkerEntry {
    pub(crate) slot: usize,
    pub(crate) started: Instant,
    pub(crate) phase: Phase,
    /// Its servers: the handles it was granted (or bound itself) and has not closed.
    pub(crate) servers: HashMap<HandleKey, Server>,
    /// Connections handed to it by round-robin.
    pub(crate) handed: u64,
    /// How many replacements its slot had before it.
    pub(crate) restarts: u32,
    /// A listen it was refused for a reason retrying will not change: if it then dies,
    /// its slot is given up at once instead of crash-looping.
    pub(crate) listen_failed: Option<(HandleKey, i32)>,
    /// Whether it counts as ready once listening: set at the start unless the cluster
    /// waits for the worker to say so ([`crate::Settings::wait_ready`]).
    pub(crate) ready: bool,
    /// Its last memory and CPU sample, and when it was taken.
    pub(crate) usage: Option<Usage>,
    pub(crate) sampled: Option<Instant>,
    /// How many samples in a row it has been above the memory limit.
    pub(crate) over_limit: u32,
    /// Set while it is a warm spare (in no slot; `spares.rs`).
    pub(crate) spare: Option<Spare>,
}

/// What makes a worker a warm spare.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Spare {
    /// Its `queryServer`s, held until it is promoted: seq, key, backlog.
    pub(crate) held: Vec<(u64, HandleKey, u32)>,
    /// The code generation it was started in (a reload begins a new one).
    pub(crate) generation: u64,
}

impl WorkerEntry {
    /// A worker of `slot` about to be forked at `now`.
    pub(crate) fn new(slot: usize, now: Instant, restarts: u32, ready: bool) -> Self {
        Self {
            slot,
            started: now,
            phase: Phase::Starting,
            servers: HashMap::new(),
            handed: 0,
            restarts,
            listen_failed: None,
            ready,
            usage: None,
            sampled: None,
            over_limit: 0,
            spare: None,
        }
    }

    /// How many of its servers are listening.
    pub(crate) fn listening(&self) -> usize {
        self.servers
            .values()
            .filter(|s| **s != Server::Granted)
            .count()
    }

    /// Whether it is online and serving on at least `target` servers, and has said it is
    /// ready if the cluster waits for that ([`crate::Settings::wait_ready`]).
    pub(crate) fn serves(&self, target: usize) -> bool {
        matches!(self.phase, Phase::Online { .. }) && self.ready && self.listening() >= target
    }

    /// The public view of its phase.
    pub(crate) fn state(&self) -> WorkerState {
        match self.phase {
            Phase::Starting | Phase::Forked { .. } => WorkerState::Forked,
            Phase::Online { .. } if self.listening() == 0 => WorkerState::Online,
            Phase::Online { .. } => WorkerState::Listening,
            Phase::Draining { .. } | Phase::Exited { .. } => WorkerState::Disconnecting,
            Phase::Disconnected { .. } => WorkerState::Disconnected,
        }
    }
}

/// Who holds a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Occupant {
    /// This worker is the slot's current one.
    Worker(WorkerId),
    /// Its worker died; a `Respawn` timer is running.
    Respawning,
    /// Crashed too often: given up; `last` was its last worker.
    Failed { last: WorkerId },
}

/// A place for one worker, kept across its replacements.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) occupant: Occupant,
    pub(crate) tracker: RestartTracker,
    /// Node's `cluster.fork(env)`: extra environment for this slot's workers.
    pub(crate) env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// How its last worker ended.
    pub(crate) last_exit: Option<LastExit>,
}

impl Slot {
    /// The slot's current worker, if it has one.
    pub(crate) fn current(&self) -> Option<WorkerId> {
        match self.occupant {
            Occupant::Worker(id) => Some(id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_intentional_stop_wins_over_a_panic_and_nothing_over_misbehaving() {
        use StopCause::*;
        assert_eq!(Panicked.merge(Asked), Asked);
        assert_eq!(Asked.merge(Panicked), Asked);
        assert_eq!(Asked.merge(Misbehaved), Misbehaved);
        assert_eq!(Misbehaved.merge(Asked), Misbehaved);
        assert!(WorkerDisconnected.exited_after_disconnect());
        assert!(!Panicked.exited_after_disconnect());
    }
}
