//! Rolling reload: one slot at a time, a new worker listening on as many servers as the
//! old one before the old one is asked to stop.
//!
//! ```text
//!  pending slots --next--> Step { slot, old, target } --new worker listening >= target-->
//!       ^                        |                          drain old, next slot
//!       |                        +-- new workers crash-loop, or the step times out: the
//!       |                            old worker stays (`ReloadFailed`; not given up)
//!       +-- every slot done: reply to the waiters with a `ReloadReport`; a reload
//!           asked meanwhile starts a new pass, so every slot ends on the newest code
//! ```
//!
//! A worker above the memory limit is replaced by the same steps (`usage.rs` queues its
//! slot with the cause `MemoryLimit`); a pass nobody asked for (only such replacements)
//! replies to nobody and is not counted as a reload.

use std::collections::VecDeque;
use std::time::Instant;

use super::lifecycle::{Occupant, Phase};
use super::{Core, Effect, Event, Outcome, ReloadFailure, RequestId, Run, StopCause, Timer};
use crate::primary::restart::RestartTracker;
use crate::primary::stats::{ReloadProgress, ReloadReport, SlotReloadFailure};
use crate::protocol::WorkerId;

/// How many new workers of one reload step may crash before the step fails (the old
/// worker keeps its slot).
pub(crate) const RELOAD_CRASHES: u32 = 3;

/// A reload in progress.
#[derive(Debug)]
pub(crate) struct Reload {
    /// Slots still to replace, in order, and why (`Asked` for a reload, `MemoryLimit`).
    pending: VecDeque<(usize, StopCause)>,
    /// The slot being replaced now.
    step: Option<Step>,
    /// Who waits for the end.
    pub(crate) waiters: Vec<RequestId>,
    /// Reloads asked during this one: a new pass starts when this one ends.
    pub(crate) again: Vec<RequestId>,
    /// Whether a reload was asked for (not only memory-limit replacements).
    asked: bool,
    /// The worker found above the memory limit, by slot: a `MemoryLimit` replacement is
    /// for that worker only (a crash or a spare may have put another in its slot since).
    memory: Vec<(usize, WorkerId)>,
    /// When it was asked for.
    began: Instant,
    /// Slots in the pass, and how many are done.
    total: usize,
    done: usize,
    /// What it replaced and what not, so far.
    report: ReloadReport,
}

/// One slot being replaced.
#[derive(Debug, Clone, Copy)]
struct Step {
    slot: usize,
    /// The worker being replaced.
    old: WorkerId,
    /// How many servers the new one must be listening on.
    target: usize,
    /// Why the old one is replaced.
    cause: StopCause,
    /// How many of the step's new workers crashed so far.
    crashes: u32,
    /// The step's last new worker that was forked (its forks may all fail).
    forked: Option<WorkerId>,
}

/// Where a step stands.
enum Progress {
    Waiting,
    /// Over; `true` when the new worker took the slot over.
    Done(bool),
}

impl Core {
    pub(super) fn start_reload(&mut self, request: RequestId, now: Instant) {
        if !matches!(self.run, Run::Running) {
            let report = ReloadReport {
                interrupted: true,
                ..ReloadReport::default()
            };
            self.out
                .push(Effect::Reply(request, Outcome::Reloaded(report)));
            return;
        }
        let pass = self.new_pass(vec![request], now);
        match &mut self.reload {
            // A pass of memory-limit replacements only becomes this reload: the slots
            // it has not reached yet join it.
            Some(reload) if !reload.asked => {
                let step = reload.step.map(|s| s.slot);
                for (slot, cause) in pass.pending {
                    let queued = reload.pending.iter().any(|(s, _)| *s == slot);
                    if !queued && step != Some(slot) {
                        reload.pending.push_back((slot, cause));
                    }
                }
                reload.total = reload.done + reload.pending.len() + usize::from(step.is_some());
                reload.waiters.push(request);
                reload.asked = true;
                reload.began = now;
            }
            // Slots already replaced would keep older code: queue a new pass.
            Some(reload) => reload.again.push(request),
            None => self.reload = Some(pass),
        }
        // Spares run the code they were started with: never promote old code now.
        self.renew_spares(now);
        self.advance_reload(now);
    }

    /// A pass over every slot that has a worker.
    fn new_pass(&self, waiters: Vec<RequestId>, now: Instant) -> Reload {
        let pending: VecDeque<(usize, StopCause)> = self
            .slots
            .iter()
            .filter(|(_, s)| s.current().is_some())
            .map(|(slot, _)| (*slot, StopCause::Asked))
            .collect();
        Reload {
            total: pending.len(),
            pending,
            step: None,
            waiters,
            again: Vec::new(),
            asked: true,
            memory: Vec::new(),
            began: now,
            done: 0,
            report: ReloadReport::default(),
        }
    }

    /// Queues `slot`'s worker for replacement because it stays above the memory limit:
    /// in the reload in progress (which may have replaced it already), or in a pass of
    /// its own.
    pub(super) fn replace_for_memory(&mut self, slot: usize, id: WorkerId, now: Instant) {
        let reload = self.reload.get_or_insert_with(|| Reload {
            pending: VecDeque::new(),
            step: None,
            waiters: Vec::new(),
            again: Vec::new(),
            asked: false,
            memory: Vec::new(),
            began: now,
            total: 0,
            done: 0,
            report: ReloadReport::default(),
        });
        if reload.step.is_some_and(|s| s.slot == slot) {
            return; // being replaced now
        }
        reload.memory.retain(|(s, _)| *s != slot);
        reload.memory.push((slot, id));
        match reload.pending.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, cause)) => *cause = StopCause::MemoryLimit,
            None => {
                reload.pending.push_back((slot, StopCause::MemoryLimit));
                reload.total += 1;
            }
        }
        self.advance_reload(now);
    }

    /// A new worker of the step replacing `slot` crashed: whether the step has seen
    /// [`RELOAD_CRASHES`] of them, so that the old worker keeps the slot now instead of
    /// after a whole crash loop (new code that dies at start fails a reload in about a
    /// second, not after the restart policy's backoff).
    pub(super) fn reload_step_crashed(&mut self, slot: usize) -> bool {
        let Some(step) = self
            .reload
            .as_mut()
            .and_then(|r| r.step.as_mut())
            .filter(|s| s.slot == slot)
        else {
            return false;
        };
        step.crashes += 1;
        step.crashes >= RELOAD_CRASHES
    }

    /// A worker of `slot` was forked: the reload step replacing it, if any, notes it.
    pub(super) fn reload_step_forked(&mut self, slot: usize, id: WorkerId) {
        if let Some(step) = self
            .reload
            .as_mut()
            .and_then(|r| r.step.as_mut())
            .filter(|s| s.slot == slot && s.old != id)
        {
            step.forked = Some(id);
        }
    }

    /// Whether `slot` is being replaced, or queued to be for its memory.
    pub(super) fn replacing_for_memory(&self, slot: usize) -> bool {
        self.reload.as_ref().is_some_and(|r| {
            r.step.is_some_and(|s| s.slot == slot)
                || r.pending.contains(&(slot, StopCause::MemoryLimit))
        })
    }

    /// The reload in progress, for the status.
    pub(super) fn reload_progress(&self) -> Option<ReloadProgress> {
        let reload = self.reload.as_ref().filter(|r| r.asked)?;
        Some(ReloadProgress {
            done: reload.done,
            total: reload.total,
            slot: reload.step.map(|s| s.slot),
        })
    }

    /// A stop began: whoever waits for a reload is told it was cut short.
    pub(super) fn end_reload_for_stop(&mut self, now: Instant) {
        if let Some(mut reload) = self.reload.take() {
            reload.report.interrupted = true;
            self.finish_pass(reload, now);
        }
    }

    /// A pass is over: its waiters get the report, an asked-for pass is counted and
    /// shown. Returns the reloads asked for meanwhile.
    fn finish_pass(&mut self, reload: Reload, now: Instant) -> Vec<RequestId> {
        let Reload {
            waiters,
            again,
            asked,
            began,
            mut report,
            ..
        } = reload;
        if asked {
            report.took = now.saturating_duration_since(began);
            for waiter in waiters {
                self.out
                    .push(Effect::Reply(waiter, Outcome::Reloaded(report.clone())));
            }
            self.last_reload = Some(report.clone());
            self.emit(Event::ReloadEnded { report });
        }
        if !matches!(self.run, Run::Running | Run::Leaving { .. }) {
            let report = ReloadReport {
                interrupted: true,
                ..ReloadReport::default()
            };
            for waiter in &again {
                self.out
                    .push(Effect::Reply(*waiter, Outcome::Reloaded(report.clone())));
            }
            return Vec::new();
        }
        again
    }

    /// Records that the step of `slot` failed (the old worker `kept` serves on) and says so.
    pub(super) fn reload_failed(
        &mut self,
        slot: usize,
        id: Option<WorkerId>,
        kept: WorkerId,
        reason: ReloadFailure,
    ) {
        if let Some(reload) = &mut self.reload {
            reload.report.failed.push(SlotReloadFailure {
                slot,
                id,
                kept,
                reason,
            });
        }
        self.emit(Event::ReloadFailed {
            slot,
            id,
            kept,
            reason,
        });
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
                    Progress::Done(replaced) => {
                        reload.step = None;
                        reload.done += 1;
                        if replaced {
                            reload.report.replaced.push(step.slot);
                        }
                        self.cancel_timer(Timer::Reload);
                    }
                }
            }
            let Some((slot, cause)) = reload.pending.pop_front() else {
                let again = self.finish_pass(reload, now);
                if again.is_empty() {
                    return;
                }
                reload = self.new_pass(again, now);
                continue;
            };
            let Some(old) = self.slot_current(slot) else {
                continue;
            };
            let cause = match cause {
                // The worker found above the limit is gone (it crashed, a spare took its
                // slot): its successor was never said to be above it. Replaced only if a
                // reload was asked for, as that.
                StopCause::MemoryLimit if !reload.memory.contains(&(slot, old)) => {
                    if !reload.asked {
                        reload.done += 1;
                        continue;
                    }
                    StopCause::Asked
                }
                other => other,
            };
            let Some(listening) = self
                .workers
                .get(&old)
                .filter(|w| w.serves(0))
                .map(|w| w.listening())
            else {
                reload.done += 1;
                continue; // not serving yet, or already stopping: nothing to replace
            };
            let new = self.fork_into(slot, now);
            tracing::info!(slot, %old, %new, ?cause, "reload: replacing a worker");
            reload.step = Some(Step {
                slot,
                old,
                target: listening,
                cause,
                crashes: 0,
                forked: None,
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
            // The worker on the slot now, or the step's last one that started.
            let last = new.or(step.forked);
            tracing::error!(slot, new = ?last, ?waited, "reload: the new worker is not listening; keeping the old one");
            if let Some(s) = self.slots.get_mut(&slot) {
                s.occupant = Occupant::Worker(old);
                s.tracker = RestartTracker::new(self.config.restart.clone());
            }
            match new {
                Some(new) => self.begin_drain(new, StopCause::Asked, now),
                None => self.cancel_timer(Timer::Respawn(slot)),
            }
            // The step is over: it counts as done, failed.
            if let Some(reload) = &mut self.reload {
                reload.done += 1;
            }
            self.reload_failed(slot, last, old, ReloadFailure::NotListening { waited });
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
            slot,
            old,
            target,
            cause,
            ..
        } = step;
        let Some(s) = self.slots.get_mut(&slot) else {
            // The slot was removed meanwhile.
            self.begin_drain(old, StopCause::Asked, now);
            return Progress::Done(false);
        };
        match s.occupant {
            // Given up although the old worker was not serving any more.
            Occupant::Failed { .. } => Progress::Done(false),
            Occupant::Worker(new) if new != old => {
                let ready = self.workers.get(&new).is_some_and(|w| w.serves(target));
                if !ready {
                    return Progress::Waiting;
                }
                self.begin_drain(old, cause, now);
                Progress::Done(true)
            }
            // The old worker is the slot's again: nothing left to replace.
            Occupant::Worker(_) => Progress::Done(false),
            Occupant::Respawning => Progress::Waiting,
        }
    }
}
