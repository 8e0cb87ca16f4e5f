//! Rolling reload: one slot at a time, a new worker listening on as many servers as the
//! old one before the old one is asked to stop.
//!
//! ```text
//!  pending slots --next--> Step { slot, old, target } --new worker listening >= target-->
//!       ^                        |                          drain old, next slot
//!       |                        +-- new workers crash-loop: the old worker stays
//!       |                            (`ReloadFailed`; the slot is not given up)
//!       +-- every slot done: reply to the waiters
//! ```

use std::collections::VecDeque;
use std::time::Instant;

use super::lifecycle::{Occupant, Phase};
use super::{Core, Effect, Outcome, RequestId, StopCause};
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
}

/// One slot being replaced.
#[derive(Debug, Clone, Copy)]
struct Step {
    slot: usize,
    /// The worker being replaced.
    old: WorkerId,
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
        let slots = &self.slots;
        let reload = self.reload.get_or_insert_with(|| Reload {
            pending: slots
                .iter()
                .filter(|(_, s)| s.current().is_some())
                .map(|(slot, _)| *slot)
                .collect(),
            ..Reload::default()
        });
        reload.waiters.push(request);
        self.advance_reload(now);
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
                    Progress::Done => reload.step = None,
                }
            }
            let Some(slot) = reload.pending.pop_front() else {
                for waiter in reload.waiters {
                    self.out.push(Effect::Reply(waiter, Outcome::Done));
                }
                return;
            };
            let Some(old) = self.slot_current(slot) else {
                continue;
            };
            let Some(Phase::Online { listening, .. }) = self.workers.get(&old).map(|w| w.phase)
            else {
                continue; // not serving yet, or already stopping: nothing to replace
            };
            let new = self.fork_into(slot, now);
            tracing::info!(slot, %old, %new, "reload: replacing a worker");
            reload.step = Some(Step {
                slot,
                old,
                target: listening,
            });
        }
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
        let Step { slot, old, target } = step;
        let Some(s) = self.slots.get_mut(&slot) else {
            // The slot was removed meanwhile.
            self.begin_drain(old, StopCause::Asked, now);
            return Progress::Done;
        };
        match s.occupant {
            // Given up although the old worker was not serving any more.
            Occupant::Failed { .. } => Progress::Done,
            Occupant::Worker(new) if new != old => {
                let ready = self.workers.get(&new).is_some_and(
                    |w| matches!(w.phase, Phase::Online { listening, .. } if listening >= target),
                );
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
