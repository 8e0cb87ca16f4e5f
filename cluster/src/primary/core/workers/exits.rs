//! A worker's end: its channel closing, its process exiting (whichever comes first, the
//! other within a grace time), and the exit reported once, its slot refilled or given up.

use std::time::Instant;

use super::super::lifecycle::{Phase, StopCause};
use super::super::{Core, Effect, Event, SlotFailure, Timer};
use crate::primary::stats::LastExit;
use crate::protocol::WorkerId;

impl Core {
    pub(in crate::primary::core) fn on_channel_closed(
        &mut self,
        id: WorkerId,
        broken: Option<String>,
        now: Instant,
    ) {
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
            Phase::Forked { pid, .. } | Phase::Online { pid, .. } | Phase::Draining { pid, .. } => {
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
        if !self.timers.contains(&timer) {
            self.start_timer(timer, now + self.drain_deadline);
        }
    }

    pub(in crate::primary::core) fn on_exited(
        &mut self,
        id: WorkerId,
        status: child::ExitStatus,
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        match worker.phase {
            Phase::Disconnected { cause, .. } => self.finalize(id, status, cause, true, now),
            Phase::Exited { .. } | Phase::Starting => {}
            Phase::Forked { pid, .. } | Phase::Online { pid, .. } | Phase::Draining { pid, .. } => {
                // Messages it sent before exiting come first: wait for the end of its
                // channel, for a bounded time (a descendant may hold it open).
                let (cause, online) = (worker.phase.cause(), worker.phase.came_online());
                worker.phase = Phase::Exited {
                    pid,
                    status,
                    cause,
                    online,
                };
                for handle in self.handles.values_mut() {
                    handle.retire_worker(id);
                }
                self.cancel_timer(Timer::DrainDeadline(id));
                self.start_timer(Timer::ExitGrace(id), now + self.config.exit_grace);
            }
        }
    }

    /// The worker is gone: report it, refill or give up its slot.
    pub(in crate::primary::core) fn finalize(
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
        self.cancel_timer(Timer::Handoff(id));
        self.cancel_timer(Timer::Connect(id));
        self.forget_worker(id);
        if !disconnected {
            self.emit(Event::Disconnect { id });
        }
        tracing::debug!(%id, %status, "worker exited");
        let exited_after_disconnect = cause.is_some_and(StopCause::exited_after_disconnect);
        let exit_cause = StopCause::exit_cause(cause, status);
        self.emit(Event::Exit {
            id,
            status,
            exited_after_disconnect,
            cause: exit_cause,
        });
        if let Some(s) = self.slots.get_mut(&worker.slot) {
            s.last_exit = Some(LastExit {
                id,
                status,
                cause: exit_cause,
            });
        }
        self.out.push(Effect::Forget(id));
        let slot = worker.slot;
        if worker.spare.is_some() {
            let asked = cause.is_some_and(StopCause::exited_after_disconnect);
            let uptime = now.saturating_duration_since(worker.started);
            self.spare_exited(asked, uptime, now);
        }
        if self.running() && self.slot_current(slot) == Some(id) {
            match worker.listen_failed {
                // Restarting would fail the same way: say so now, not after a crash loop.
                Some((key, errno)) => self.give_up(slot, id, SlotFailure::Listen { key, errno }),
                None => {
                    let uptime = now.saturating_duration_since(worker.started);
                    match status {
                        child::ExitStatus::Exited(0) => self.on_left(slot, id, now, uptime),
                        _ => self.on_crash(slot, id, now, uptime),
                    }
                }
            }
        }
        self.close_slot_sockets(slot);
        self.dispatch_all(now);
        self.advance_reload(now);
        self.check_stopped();
    }
}
