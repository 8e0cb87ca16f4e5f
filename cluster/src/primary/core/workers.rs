//! The core's worker and slot lifecycle: forking into a slot, crashes and restarts,
//! control messages, draining and misbehaviour; `workers/exits.rs` has channel ends and
//! exits.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use child::Signal;

use super::handles::HandleKind;
use super::lifecycle::{Occupant, Phase, Server, Slot, StopCause, WorkerEntry};
use super::{Core, Effect, Event, Outcome, RESOURCE_RETRY, ReloadFailure, Run, SlotFailure, Timer};
use crate::primary::restart::{Decision, RestartTracker};

mod exits;
use crate::protocol::{ToPrimary, ToWorker, WorkerId};

impl Core {
    pub(super) fn new_slot(&mut self, env: Vec<(OsString, OsString)>) -> usize {
        let slot = self.next_slot;
        self.next_slot += 1;
        let tracker = RestartTracker::new(self.config.restart.clone());
        self.slots.insert(
            slot,
            Slot {
                occupant: Occupant::Respawning,
                tracker,
                env,
                last_exit: None,
            },
        );
        slot
    }

    /// Starts a worker as the current one of `slot`.
    /// Gives `slot` a new worker: a warm spare if one can take it, else a fork.
    pub(super) fn fork_into(&mut self, slot: usize, now: Instant) -> WorkerId {
        if let Some(id) = self.promote_spare(slot, now) {
            return id;
        }
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let (env, restarts) = match self.slots.get_mut(&slot) {
            Some(s) => {
                s.occupant = Occupant::Worker(id);
                (s.env.clone(), s.tracker.restarts())
            }
            None => (Vec::new(), 0),
        };
        self.workers.insert(
            id,
            WorkerEntry::new(slot, now, restarts, !self.config.wait_ready),
        );
        self.out.push(Effect::Fork {
            id,
            slot: Some(slot),
            env,
        });
        id
    }

    pub(super) fn on_forked(&mut self, id: WorkerId, pid: u32) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.phase != Phase::Starting {
            return;
        }
        worker.phase = Phase::Forked {
            pid,
            overdue: false,
        };
        let slot = worker.slot;
        tracing::debug!(%id, pid, slot, "forked a worker");
        self.reload_step_forked(slot, id);
        self.emit(Event::Fork { id, pid });
        let at = self.now + self.config.connect_timeout;
        self.start_timer(Timer::Connect(id), at);
        if matches!(self.run, Run::Stopping { .. }) {
            // Forked by the batch in which the stop began (a respawn due together with
            // the end of the stop delay): it was still starting when the others were
            // asked to drain.
            self.begin_drain(id, StopCause::Asked, self.now);
        }
        if let Some(request) = self.adding.remove(&id) {
            self.out.push(Effect::Reply(request, Outcome::Added(id)));
        }
        if let Some(starting) = &mut self.starting
            && starting.waiting.remove(&id)
            && starting.waiting.is_empty()
        {
            let request = starting.request;
            self.starting = None;
            self.out.push(Effect::Reply(request, Outcome::Done));
        }
    }

    pub(super) fn on_fork_failed(&mut self, id: WorkerId, error: child::Error, now: Instant) {
        self.fork_failed(id, error, now);
        // A fork that failed in the batch that began a stop may have been the last worker.
        self.check_stopped();
    }

    fn fork_failed(&mut self, id: WorkerId, error: child::Error, now: Instant) {
        let Some(worker) = self.workers.remove(&id) else {
            return;
        };
        let slot = worker.slot;
        if let Some(starting) = self.starting.take_if(|s| s.waiting.contains(&id)) {
            // The first generation cannot start: neither does the primary.
            self.run = Run::Stopped;
            self.out
                .push(Effect::Reply(starting.request, Outcome::ForkFailed(error)));
            self.out.push(Effect::Finished);
            return;
        }
        if let Some(request) = self.adding.remove(&id) {
            self.slots.remove(&slot);
            self.out
                .push(Effect::Reply(request, Outcome::ForkFailed(error)));
            return;
        }
        let transient = lacks_resources(&error);
        if self.slot_current(slot) != Some(id) {
            return;
        }
        if transient {
            // Out of descriptors or memory for now: not the program's fault, no crash;
            // try again a little later.
            tracing::warn!(slot, "no resources to start a worker now; retrying");
            self.set_occupant(slot, Occupant::Respawning);
            if self.running() {
                self.start_timer(Timer::Respawn(slot), now + RESOURCE_RETRY);
            }
            self.advance_reload(now);
        } else {
            tracing::error!(slot, "could not start a worker");
            self.on_crash(slot, id, now, Duration::ZERO);
        }
    }

    pub(super) fn slot_current(&self, slot: usize) -> Option<WorkerId> {
        self.slots.get(&slot).and_then(Slot::current)
    }

    /// A slot's current worker died (or could not start): restart it, or give it up.
    pub(super) fn on_crash(&mut self, slot: usize, id: WorkerId, now: Instant, uptime: Duration) {
        let decision = self
            .slots
            .get_mut(&slot)
            .map(|s| s.tracker.on_crash(now, uptime));
        // A reload's new code that keeps dying fails its step early.
        let decision = match self.reload_keeps_old(slot).is_some() && self.reload_step_crashed(slot)
        {
            true => decision.map(|_| Decision::Failed),
            false => decision,
        };
        self.restart(slot, id, decision, now);
    }

    /// A slot's current worker left without being asked and without failing (it
    /// disconnected itself, or exited 0): replaced at once after a long enough life,
    /// counted as a crash before [`RestartPolicy::min_uptime`](crate::RestartPolicy).
    pub(super) fn on_left(&mut self, slot: usize, id: WorkerId, now: Instant, uptime: Duration) {
        let decision = self
            .slots
            .get_mut(&slot)
            .map(|s| s.tracker.on_left(now, uptime));
        self.restart(slot, id, decision, now);
    }

    /// Carries out a restart decision for `slot`, whose worker `id` left.
    fn restart(&mut self, slot: usize, id: WorkerId, decision: Option<Decision>, now: Instant) {
        let Some(decision) = decision else {
            return;
        };
        let running = self.running();
        match decision {
            Decision::RestartAfter(delay) if delay.is_zero() && running => {
                tracing::info!(slot, "restarting a worker at once");
                self.fork_into(slot, now);
            }
            Decision::RestartAfter(delay) => {
                self.set_occupant(slot, Occupant::Respawning);
                if running {
                    tracing::info!(slot, ?delay, "restarting a worker");
                    self.start_timer(Timer::Respawn(slot), now + delay);
                }
            }
            Decision::Failed => match self.reload_keeps_old(slot) {
                Some(old) => {
                    // The new code crash-loops: the old worker keeps the slot, with a
                    // fresh crash history.
                    tracing::error!(slot, %old, "reload failed for this slot; keeping the old worker");
                    if let Some(s) = self.slots.get_mut(&slot) {
                        s.occupant = Occupant::Worker(old);
                        s.tracker = RestartTracker::new(self.config.restart.clone());
                    }
                    self.reload_failed(slot, Some(id), old, ReloadFailure::CrashLoop);
                }
                None => self.give_up(slot, id, SlotFailure::CrashLoop),
            },
            Decision::Never => self.remove_slot(slot),
        }
        self.advance_reload(now);
    }

    pub(super) fn set_occupant(&mut self, slot: usize, occupant: Occupant) {
        if let Some(s) = self.slots.get_mut(&slot) {
            s.occupant = occupant;
        }
    }

    /// Marks `slot` failed (no more restarts) and says why.
    pub(super) fn give_up(&mut self, slot: usize, id: WorkerId, cause: SlotFailure) {
        self.set_occupant(slot, Occupant::Failed { last: id });
        tracing::error!(slot, %cause, "the slot is given up");
        self.emit(Event::SlotFailed { slot, id, cause });
    }

    /// Forgets a slot; its socket (reuseport) closes once none of its workers is left.
    pub(super) fn remove_slot(&mut self, slot: usize) {
        if self.slots.remove(&slot).is_some() {
            self.cancel_timer(Timer::Respawn(slot));
            self.close_slot_sockets(slot);
        }
    }

    pub(super) fn close_slot_sockets(&mut self, slot: usize) {
        if self.slots.contains_key(&slot) || self.workers.values().any(|w| w.slot == slot) {
            return;
        }
        for (key, handle) in &mut self.handles {
            if let HandleKind::ReusePort { slots } = &mut handle.kind
                && slots.remove(&slot)
            {
                self.out.push(Effect::CloseSocket {
                    key: key.clone(),
                    socket: slot,
                });
            }
        }
    }

    pub(super) fn on_message(&mut self, id: WorkerId, message: ToPrimary, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if !worker.phase.talks() {
            return;
        }
        match (worker.phase, message) {
            (Phase::Forked { pid, .. }, ToPrimary::Online) => {
                worker.phase = Phase::Online { pid };
                self.cancel_timer(Timer::Connect(id));
                self.emit(Event::Online { id });
                self.advance_reload(now);
            }
            // Told to stop while it was starting: it may still report online, once, and
            // is asked to disconnect now that it listens to its channel.
            (
                Phase::Draining {
                    pid,
                    cause,
                    online: false,
                },
                ToPrimary::Online,
            ) => {
                worker.phase = Phase::Draining {
                    pid,
                    cause,
                    online: true,
                };
                self.cancel_timer(Timer::Connect(id));
                self.emit(Event::Online { id });
                self.send(id, ToWorker::Disconnect, None);
            }
            (Phase::Exited { online: false, .. }, ToPrimary::Online) => {
                if let Phase::Exited { online, .. } = &mut worker.phase {
                    *online = true;
                }
                self.emit(Event::Online { id });
            }
            (_, ToPrimary::Online) => self.misbehaved(id, "reported online twice".into()),
            (phase, _) if !phase.came_online() => {
                self.misbehaved(id, "spoke before it was online".into())
            }
            (_, ToPrimary::Ready) => {
                if !worker.ready {
                    worker.ready = true;
                    self.emit(Event::Ready { id });
                    self.advance_reload(now);
                }
            }
            (_, ToPrimary::QueryServer { seq, key, backlog }) => {
                if !self.hold_query(id, seq, key.clone(), backlog) {
                    self.query_server(id, seq, key, backlog)
                }
            }
            (
                _,
                ToPrimary::Listening {
                    key,
                    address,
                    exclusive,
                },
            ) => {
                // Trust only what was granted: a claim for a handle it was not given, or a
                // second claim, is a lie.
                let claim = match (worker.servers.get(&key), exclusive) {
                    (Some(Server::Granted), false) => Ok(Server::Listening),
                    (None, true) => Ok(Server::Exclusive),
                    (None, false) => Err("claims a server it was not given"),
                    (Some(_), _) => Err("claims a server twice"),
                };
                match claim {
                    Ok(server) => {
                        worker.servers.insert(key.clone(), server);
                        self.emit(Event::Listening { id, address, key });
                        self.advance_reload(now);
                    }
                    Err(lie) => self.misbehaved(id, format!("{lie}: {key}")),
                }
            }
            (_, ToPrimary::Accepted { key, seq, accepted }) => {
                self.on_accepted(id, &key, seq, accepted, now)
            }
            (_, ToPrimary::Close { key }) => self.on_close(id, &key, now),
            (_, ToPrimary::GoingDown { reason }) => {
                let (slot, uptime) = (worker.slot, now.saturating_duration_since(worker.started));
                tracing::warn!(%id, ?reason, "worker is going down");
                self.emit(Event::GoingDown { id, reason });
                self.begin_drain(id, StopCause::Panicked, now);
                if self.running() && self.slot_current(slot) == Some(id) {
                    self.on_crash(slot, id, now, uptime);
                }
            }
            (_, ToPrimary::Disconnecting) => {
                let (slot, uptime) = (worker.slot, now.saturating_duration_since(worker.started));
                tracing::info!(%id, "worker disconnected itself");
                self.begin_drain(id, StopCause::WorkerDisconnected, now);
                if self.running() && self.slot_current(slot) == Some(id) {
                    self.on_left(slot, id, now, uptime);
                }
            }
        }
    }

    /// Asks `id` to stop: no new connections, `Disconnect`, and a kill at the deadline.
    pub(super) fn begin_drain(&mut self, id: WorkerId, cause: StopCause, now: Instant) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        // One that never connected (it may not speak the protocol) cannot read the
        // disconnect: it is asked with SIGTERM too.
        let mut terminate = false;
        // One not online yet is told when it comes online: a Node worker may not listen to
        // its channel before then (its cluster code is not set up while `--require`d
        // modules load), and a message read before would be lost.
        let mut tell = true;
        match &mut worker.phase {
            Phase::Forked { pid, overdue } => {
                terminate = *overdue;
                tell = false;
                worker.phase = Phase::Draining {
                    pid: *pid,
                    cause,
                    online: false,
                };
            }
            Phase::Online { pid } => {
                worker.phase = Phase::Draining {
                    pid: *pid,
                    cause,
                    online: true,
                };
            }
            Phase::Draining { cause: old, .. } => {
                *old = old.merge(cause);
                return;
            }
            Phase::Disconnected { cause: old, .. } | Phase::Exited { cause: old, .. } => {
                *old = Some(old.map_or(cause, |old| old.merge(cause)));
                return;
            }
            Phase::Starting => return,
        }
        if tell {
            self.send(id, ToWorker::Disconnect, None);
        }
        if terminate {
            self.terminate(id);
        }
        self.start_timer(Timer::DrainDeadline(id), now + self.drain_deadline);
        for handle in self.handles.values_mut() {
            handle.retire_worker(id);
        }
    }

    pub(super) fn misbehaved(&mut self, id: WorkerId, reason: String) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let phase = worker.phase;
        if phase.cause() == Some(StopCause::Misbehaved) || phase == Phase::Starting {
            return;
        }
        worker.phase = match phase {
            Phase::Forked { pid, .. } | Phase::Online { pid } | Phase::Draining { pid, .. } => {
                Phase::Draining {
                    pid,
                    cause: StopCause::Misbehaved,
                    online: phase.came_online(),
                }
            }
            Phase::Disconnected { pid, .. } => Phase::Disconnected {
                pid,
                cause: Some(StopCause::Misbehaved),
            },
            Phase::Exited {
                pid,
                status,
                online,
                ..
            } => Phase::Exited {
                pid,
                status,
                cause: Some(StopCause::Misbehaved),
                online,
            },
            Phase::Starting => return,
        };
        tracing::warn!(%id, %reason, "worker broke the protocol, killing it");
        self.emit(Event::Misbehaved { id, reason });
        let signal = Signal::SIGKILL;
        self.out.push(Effect::Kill {
            id,
            signal,
            request: None,
        });
        self.forget_worker(id);
    }

    /// Asks a worker that may not read its channel to stop, with `SIGTERM`.
    fn terminate(&mut self, id: WorkerId) {
        self.out.push(Effect::Kill {
            id,
            signal: Signal::SIGTERM,
            request: None,
        });
    }

    /// A worker has not reported online within the connect timeout: say so, once. One
    /// already told to stop is asked again with `SIGTERM`, since it cannot read the
    /// disconnect.
    pub(super) fn connect_timed_out(&mut self, id: WorkerId) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        let waited = self.config.connect_timeout;
        match &mut worker.phase {
            Phase::Forked { overdue, .. } => *overdue = true,
            Phase::Draining { online: false, .. } => self.terminate(id),
            _ => return,
        }
        tracing::warn!(%id, ?waited, "worker has not connected to the cluster channel");
        self.emit(Event::NotConnected { id, waited });
    }
}

/// Whether a fork failed for lack of resources (descriptors, processes, memory), which
/// passes, rather than because of the program.
fn lacks_resources(error: &child::Error) -> bool {
    let errno = match error {
        child::Error::Spawn(e) => e.raw_os_error(),
        child::Error::Ipc(ipc::Error::Io(e)) => e.raw_os_error(),
        _ => None,
    };
    matches!(
        errno,
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM)
    )
}
