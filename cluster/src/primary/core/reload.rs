//! Rolling reload: one slot at a time, a new worker listening on as many servers as the
//! old one before the old one is asked to stop.
//!
//! ```text
//!  pending slots --next--> Step { slot, old, target } --new worker listening >= target-->
//!       ^                        |                          drain old, next slot
//!       |                        +-- new workers crash-loop, or the step times out: the
//!       |                            old worker stays (`ReloadFailed`; not given up)
//!       +-- every slot done: reply to the waiters; a reload asked meanwhile starts a
//!           new pass, so every slot ends on the newest code
//! ```

use std::collections::VecDeque;
use std::time::Instant;

use super::lifecycle::{Occupant, Phase};
use super::{Core, Effect, Event, Outcome, ReloadFailure, RequestId, StopCause, Timer};
use crate::primary::restart::RestartTracker;
use crate::protocol::WorkerId;

/// A reload in progress.
#[derive(Debug, Default)]
pub(crate) struct Reload {
    /// Slots still to replace, in order.
    pending: VecDeque<usize>,
    /// The slot being replaced now.
    step: Option<Step>,
    /// Who waits for the end.
    pub(crate) waiters: Vec<RequestId>,
    /// Reloads asked during this one: a new pass starts when this one ends.
    pub(crate) again: Vec<RequestId>,
}

/// One slot being replaced.
#[derive(Debug, Clone, Copy)]
struct Step {
    slot: usize,
    /// The worker being replaced.
    old: WorkerId,
    /// The first new worker (a respawn of the slot gets a newer one).
    new: WorkerId,
    /// How many servers the new one must be listening on.
    target: usize,
}

/// Where a step stands.
enum Progress {
    Waiting,
    Done,
}

impl Core {
    pub(super) fn start_reload(&mut self, request: RequestId, now: Instant) {
        if !self.running() {
            self.out.push(Effect::Reply(request, Outcome::Done));
            return;
        }
        match &mut self.reload {
            // Slots already replaced would keep older code: queue a new pass.
            Some(reload) => reload.again.push(request),
            None => self.reload = Some(self.new_pass(vec![request])),
        }
        self.advance_reload(now);
    }

    /// A pass over every slot that has a worker.
    fn new_pass(&self, waiters: Vec<RequestId>) -> Reload {
        Reload {
            pending: self
                .slots
                .iter()
                .filter(|(_, s)| s.current().is_some())
                .map(|(slot, _)| *slot)
                .collect(),
            step: None,
            waiters,
            again: Vec::new(),
        }
    }

    /// Moves the reload on as far as it can go now.
    pub(super) fn advance_reload(&mut self, now: Instant) {
        let Some(mut reload) = self.reload.take() else {
            return;
        };
        loop {
            if let Some(step) = reload.step {
                match self.progress(step, now) {
                    Progress::Waiting => {
                        self.reload = Some(reload);
                        return;
                    }
                    Progress::Done => {
                        reload.step = None;
                        self.cancel_timer(Timer::Reload);
                    }
                }
            }
            let Some(slot) = reload.pending.pop_front() else {
                for waiter in reload.waiters {
                    self.out.push(Effect::Reply(waiter, Outcome::Done));
                }
                if reload.again.is_empty() {
                    return;
                }
                reload = self.new_pass(std::mem::take(&mut reload.again));
                continue;
            };
            let Some(old) = self.slot_current(slot) else {
                continue;
            };
            let Some(listening) = self
                .workers
                .get(&old)
                .filter(|w| w.serves(0))
                .map(|w| w.listening())
            else {
                continue; // not serving yet, or already stopping: nothing to replace
            };
            let new = self.fork_into(slot, now);
            tracing::info!(slot, %old, %new, "reload: replacing a worker");
            reload.step = Some(Step {
                slot,
                old,
                new,
                target: listening,
            });
            self.start_timer(Timer::Reload, now + self.config.reload_timeout);
        }
    }

    /// The step in progress took too long: stop its new worker, keep the old one.
    pub(super) fn reload_timed_out(&mut self, now: Instant) {
        let Some(step) = self.reload.as_mut().and_then(|r| r.step.take()) else {
            return;
        };
        let Step { slot, old, .. } = step;
        let new = self.slot_current(slot).filter(|new| *new != old);
        // A new worker that could not even start (a missing program) leaves the slot
        // waiting for its respawn: the old worker takes it back just the same.
        let respawning = self
            .slots
            .get(&slot)
            .is_some_and(|s| matches!(s.occupant, Occupant::Respawning));
        let old_serving = self.workers.get(&old).is_some_and(|w| w.serves(0));
        if old_serving && (new.is_some() || respawning) {
            let waited = self.config.reload_timeout;
            let last = new.unwrap_or(step.new);
            tracing::error!(slot, new = %last, ?waited, "reload: the new worker is not listening; keeping the old one");
            if let Some(s) = self.slots.get_mut(&slot) {
                s.occupant = Occupant::Worker(old);
                s.tracker = RestartTracker::new(self.config.restart.clone());
            }
            match new {
                Some(new) => self.begin_drain(new, StopCause::Asked, now),
                None => self.cancel_timer(Timer::Respawn(slot)),
            }
            self.emit(Event::ReloadFailed {
                slot,
                id: last,
                kept: old,
                reason: ReloadFailure::NotListening { waited },
            });
        }
        self.advance_reload(now);
    }

    /// The old worker of `slot` if a reload is replacing it and it still serves.
    pub(super) fn reload_keeps_old(&self, slot: usize) -> Option<WorkerId> {
        let step = self.reload.as_ref()?.step.filter(|s| s.slot == slot)?;
        self.workers
            .get(&step.old)
            .is_some_and(|w| matches!(w.phase, Phase::Online { .. }))
            .then_some(step.old)
    }

    fn progress(&mut self, step: Step, now: Instant) -> Progress {
        let Step {
            slot, old, target, ..
        } = step;
        let Some(s) = self.slots.get_mut(&slot) else {
            // The slot was removed meanwhile.
            self.begin_drain(old, StopCause::Asked, now);
            return Progress::Done;
        };
        match s.occupant {
            // Given up although the old worker was not serving any more.
            Occupant::Failed { .. } => Progress::Done,
            Occupant::Worker(new) if new != old => {
                let ready = self.workers.get(&new).is_some_and(|w| w.serves(target));
                if !ready {
                    return Progress::Waiting;
                }
                self.begin_drain(old, StopCause::Asked, now);
                Progress::Done
            }
            // The old worker is the slot's again: nothing left to replace.
            Occupant::Worker(_) => Progress::Done,
            Occupant::Respawning => Progress::Waiting,
        }
    }
}
