//! The core's requests (add, remove, disconnect, kill, reload, stop), timers, and the end
//! of a stop.

use std::time::Instant;

use child::Signal;

use super::handles::Handle;
use super::lifecycle::{Occupant, Phase, StopCause};
use super::{Core, Effect, Outcome, Request, RequestId, Run, Timer};
use crate::protocol::{HandleKey, WorkerId};

impl Core {
    /// Time passed: fires every timer due at `now`, earliest first (equal deadlines in
    /// the order they were armed). One cancelled or moved by an earlier one does not fire;
    /// one armed for `now` meanwhile fires at the next tick.
    pub(super) fn on_tick(&mut self, now: Instant) {
        for (timer, seq) in self.timers.due(now) {
            if self.timers.take(&timer, seq) {
                self.on_timer(timer, now);
            }
        }
    }

    fn on_timer(&mut self, timer: Timer, now: Instant) {
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
            Timer::Reload => self.reload_timed_out(now),
            Timer::HandleIdle(key) => self.handle_idle(&key),
            Timer::Handoff(id) => self.handoff_timed_out(id),
            Timer::Connect(id) => self.connect_timed_out(id),
            Timer::Sample => self.sample(now),
            Timer::Spare => self.ensure_spares(now),
            Timer::Dispatch(key) => self.resume_dispatch(&key, now),
            Timer::StopDelay => {
                if let Run::Leaving { waiters } = &mut self.run {
                    let waiters = std::mem::take(waiters);
                    self.run = Run::Stopping { waiters };
                    self.begin_stop(now);
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

    pub(super) fn on_request(&mut self, request: RequestId, asked: Request, now: Instant) {
        let reply = |core: &mut Core, outcome| core.out.push(Effect::Reply(request, outcome));
        match asked {
            Request::AddWorker { env } => {
                if !self.running() {
                    return reply(self, Outcome::Stopped);
                }
                let slot = self.new_slot(env);
                let id = self.fork_into(slot, now);
                match self.workers.get(&id).map(|w| w.phase) {
                    // A promoted spare: it is already running.
                    Some(phase) if phase != Phase::Starting => reply(self, Outcome::Added(id)),
                    _ => drop(self.adding.insert(id, request)),
                }
            }
            Request::RemoveWorker => {
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
            Request::Disconnect(Some(id)) if !self.workers.contains_key(&id) => {
                reply(self, Outcome::UnknownWorker(id));
            }
            Request::Disconnect(target) => {
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
            Request::Kill(id, _) if !self.workers.contains_key(&id) => {
                reply(self, Outcome::UnknownWorker(id));
            }
            Request::Kill(id, signal) => {
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
            Request::Reload => self.start_reload(request, now),
            Request::Stop { grace } => {
                if let Some(grace) = grace {
                    self.drain_deadline = grace;
                }
                match &mut self.run {
                    Run::Stopped => reply(self, Outcome::Done),
                    Run::Stopping { waiters } | Run::Leaving { waiters } => waiters.push(request),
                    Run::Running if !self.config.stop_delay.is_zero() => {
                        // Not ready at once (a balancer's health check sees it), serving
                        // on until the delay has passed.
                        tracing::info!(delay = ?self.config.stop_delay, "stopping after the stop delay");
                        self.run = Run::Leaving {
                            waiters: vec![request],
                        };
                        self.start_timer(Timer::StopDelay, now + self.config.stop_delay);
                    }
                    Run::Running => {
                        self.run = Run::Stopping {
                            waiters: vec![request],
                        };
                        self.begin_stop(now);
                    }
                }
            }
        }
    }

    /// The slots whose current worker is `id`.
    pub(super) fn slots_of(&self, id: WorkerId) -> Vec<usize> {
        self.slots
            .iter()
            .filter(|(_, s)| s.current() == Some(id))
            .map(|(slot, _)| *slot)
            .collect()
    }

    pub(super) fn begin_stop(&mut self, now: Instant) {
        self.end_reload_for_stop(now);
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

    pub(super) fn check_stopped(&mut self) {
        if !matches!(self.run, Run::Stopping { .. }) || !self.workers.is_empty() {
            return;
        }
        let keys: Vec<HandleKey> = self.handles.keys().cloned().collect();
        for key in keys {
            self.close_handle(&key);
        }
        self.timers.clear();
        if let Run::Stopping { waiters } = std::mem::replace(&mut self.run, Run::Stopped) {
            for waiter in waiters {
                self.out.push(Effect::Reply(waiter, Outcome::Done));
            }
        }
        self.out.push(Effect::Finished);
    }
}
