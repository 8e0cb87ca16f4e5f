//! The core's own deadlines. The driver holds no copy: it asks
//! [`Core::poll_timeout`](super::Core::poll_timeout) for the earliest one, sleeps until
//! then and feeds `Input::Tick`; the core then fires every timer that is due, earliest
//! first and, for equal deadlines, in the order they were armed.

use std::collections::HashMap;
use std::time::Instant;

use crate::protocol::{HandleKey, WorkerId};

/// A deadline the core keeps; at most one of each is armed.
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
    /// Give up the reload step in progress.
    Reload,
    /// Close a handle no worker has taken up again since its last one left.
    HandleIdle(HandleKey),
    /// A worker with hand-offs in flight has answered none for the hand-off timeout.
    Handoff(WorkerId),
    /// A forked worker has not reported online within the connect timeout.
    Connect(WorkerId),
    /// Sample the workers' memory and CPU.
    Sample,
    /// Start warm spares again after one crashed.
    Spare,
    /// Hand-offs on a round-robin handle go on after one could not be sent.
    Dispatch(HandleKey),
    /// The stop's delay has passed: ask the workers to drain.
    StopDelay,
}

/// The armed timers: each with its deadline and when it was armed (a sequence number,
/// which orders equal deadlines).
#[derive(Debug, Default)]
pub(crate) struct Timers {
    armed: HashMap<Timer, (Instant, u64)>,
    next_seq: u64,
}

impl Timers {
    /// Arms `timer` for `at`, replacing its earlier deadline if it had one.
    pub(crate) fn start(&mut self, timer: Timer, at: Instant) {
        self.armed.insert(timer, (at, self.next_seq));
        self.next_seq += 1;
    }

    pub(crate) fn cancel(&mut self, timer: &Timer) {
        self.armed.remove(timer);
    }

    pub(crate) fn contains(&self, timer: &Timer) -> bool {
        self.armed.contains_key(timer)
    }

    /// When `timer` fires, if it is armed.
    pub(crate) fn get(&self, timer: &Timer) -> Option<Instant> {
        self.armed.get(timer).map(|(at, _)| *at)
    }

    pub(crate) fn clear(&mut self) {
        self.armed.clear();
    }

    /// The earliest deadline.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.armed.values().map(|(at, _)| *at).min()
    }

    /// The timers due at `now`, in firing order, each with its arming sequence (see
    /// [`take`](Self::take)).
    pub(crate) fn due(&self, now: Instant) -> Vec<(Timer, u64)> {
        let mut due: Vec<(Instant, u64, &Timer)> = self
            .armed
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(timer, (at, seq))| (*at, *seq, timer))
            .collect();
        due.sort_by_key(|(at, seq, _)| (*at, *seq));
        due.into_iter()
            .map(|(_, seq, timer)| (timer.clone(), seq))
            .collect()
    }

    /// Disarms `timer` if it is still armed as it was when [`due`](Self::due) listed it
    /// (firing an earlier one may have cancelled or moved it); says whether it fires.
    pub(crate) fn take(&mut self, timer: &Timer, seq: u64) -> bool {
        let still = self.armed.get(timer).is_some_and(|(_, s)| *s == seq);
        if still {
            self.armed.remove(timer);
        }
        still
    }

    /// The deadlines armed since the sequence number `since` (for the simulator's check
    /// that none is in the past).
    #[cfg(test)]
    pub(crate) fn armed_since(&self, since: u64) -> impl Iterator<Item = (&Timer, Instant)> {
        self.armed
            .iter()
            .filter(move |(_, (_, seq))| *seq >= since)
            .map(|(timer, (at, _))| (timer, *at))
    }

    /// The sequence number the next armed timer gets.
    #[cfg(test)]
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }
}
