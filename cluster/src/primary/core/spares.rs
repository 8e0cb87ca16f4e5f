//! Warm spares ([`Config::warm_spares`](super::Config::warm_spares)): workers started
//! ahead of need, in no slot. A spare runs its program up to its first `listen()`, whose
//! `queryServer` the core holds unanswered; when a slot needs a worker (a crash, a
//! scale-up, a reload step), a spare is promoted instead of forking: it takes the slot,
//! its held queries are answered, and it serves within milliseconds instead of a boot.
//! A new spare is started to take its place.
//!
//! ```text
//!  fork (no slot) --online--> queryServer held ...  --promote(slot)--> a slot's worker
//!        |                                               (queries answered now)
//!        +-- a reload begins: spares of older code are stopped, new ones started
//!        +-- dies unasked: started again after the restart policy's backoff; given up
//!            (no more spares) when it crash-loops
//! ```
//!
//! A spare is never handed connections (it has no grant), counts in events and stats,
//! and is never promoted into a slot with an environment of its own (Node's
//! `cluster.fork(env)`), which it was not started with.

use std::time::Instant;

use super::lifecycle::{Occupant, Phase, Spare, StopCause, WorkerEntry};
use super::{Core, Effect, Event, Run, Timer};
use crate::primary::restart::{Decision, RestartTracker};
use crate::protocol::{HandleKey, MAX_SERVERS_PER_WORKER, WorkerId};

/// The slot number a spare's entry carries: no slot has it.
pub(crate) const SPARE_SLOT: usize = usize::MAX;

/// The core's bookkeeping of spares.
#[derive(Debug)]
pub(crate) struct Spares {
    /// The generation new spares are started in.
    pub(crate) generation: u64,
    /// Spares that died unasked, as a slot's workers count crashes.
    pub(crate) tracker: RestartTracker,
    /// Given up: they crash-loop.
    pub(crate) given_up: bool,
}

impl Core {
    /// Starts spares until [`Config::warm_spares`](super::Config::warm_spares) live
    /// ones (not stopping) of the current generation exist.
    pub(super) fn ensure_spares(&mut self, now: Instant) {
        if !matches!(self.run, Run::Running)
            || self.spares.given_up
            || self.timers.contains(&Timer::Spare)
        {
            return;
        }
        let generation = self.spares.generation;
        let live = self
            .workers
            .values()
            .filter(|w| w.spare.as_ref().is_some_and(|s| s.generation == generation))
            .filter(|w| {
                matches!(
                    w.phase,
                    Phase::Starting | Phase::Forked { .. } | Phase::Online { .. }
                )
            })
            .count();
        for _ in live..self.config.warm_spares {
            let id = WorkerId(self.next_id);
            self.next_id += 1;
            let mut entry = WorkerEntry::new(SPARE_SLOT, now, 0, !self.config.wait_ready);
            entry.spare = Some(Spare {
                held: Vec::new(),
                generation,
            });
            self.workers.insert(id, entry);
            tracing::debug!(%id, "starting a warm spare");
            self.out.push(Effect::Fork {
                id,
                slot: None,
                env: Vec::new(),
            });
        }
    }

    /// A spare asked for a server: held until it is promoted. Returns false when `id`
    /// is no spare (the query is the caller's to answer).
    pub(super) fn hold_query(
        &mut self,
        id: WorkerId,
        seq: u64,
        key: HandleKey,
        backlog: u32,
    ) -> bool {
        let Some(spare) = self.workers.get_mut(&id).and_then(|w| w.spare.as_mut()) else {
            return false;
        };
        if spare.held.iter().any(|(_, k, _)| *k == key) {
            self.misbehaved(id, format!("asked twice for the server {key}"));
        } else if spare.held.len() >= MAX_SERVERS_PER_WORKER {
            self.misbehaved(
                id,
                format!("asked for more than {MAX_SERVERS_PER_WORKER} servers"),
            );
        } else {
            spare.held.push((seq, key, backlog));
        }
        true
    }

    /// A spare that can take `slot` now: online, of the current code, and the slot has no
    /// environment of its own. The one that has asked for the most servers (the
    /// furthest along), the oldest among equals.
    fn promotable(&self, slot: usize) -> Option<WorkerId> {
        let plain = self.slots.get(&slot).is_some_and(|s| s.env.is_empty());
        if !plain {
            return None;
        }
        let generation = self.spares.generation;
        self.workers
            .iter()
            .filter(|(_, w)| matches!(w.phase, Phase::Online { .. }) && w.ready)
            .filter_map(|(id, w)| Some((*id, w.spare.as_ref()?)))
            .filter(|(_, s)| s.generation == generation)
            .max_by_key(|(id, s)| (s.held.len(), std::cmp::Reverse(*id)))
            .map(|(id, _)| id)
    }

    /// Promotes a spare into `slot`, if one can take it: it becomes the slot's worker,
    /// its held queries are answered, and a new spare is started.
    pub(super) fn promote_spare(&mut self, slot: usize, now: Instant) -> Option<WorkerId> {
        let id = self.promotable(slot)?;
        let restarts = self.slots.get(&slot).map_or(0, |s| s.tracker.restarts());
        let worker = self.workers.get_mut(&id)?;
        let spare = worker.spare.take()?;
        worker.slot = slot;
        worker.restarts = restarts;
        self.set_occupant(slot, Occupant::Worker(id));
        tracing::info!(%id, slot, "promoted a warm spare");
        self.emit(Event::SparePromoted { id, slot });
        for (seq, key, backlog) in spare.held {
            self.query_server(id, seq, key, backlog);
        }
        self.ensure_spares(now);
        Some(id)
    }

    /// A reload begins: spares run the old code. They are stopped, and new ones started.
    pub(super) fn renew_spares(&mut self, now: Instant) {
        self.spares.generation += 1;
        let old: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.spare.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.begin_drain(id, StopCause::Asked, now);
        }
        self.ensure_spares(now);
    }

    /// A spare ended. One that was not asked to is started again after the restart
    /// policy's delay; spares that crash-loop are given up.
    pub(super) fn spare_exited(&mut self, asked: bool, uptime: std::time::Duration, now: Instant) {
        if asked || !matches!(self.run, Run::Running) {
            return self.ensure_spares(now);
        }
        match self.spares.tracker.on_crash(now, uptime) {
            Decision::RestartAfter(delay) if delay.is_zero() => self.ensure_spares(now),
            Decision::RestartAfter(delay) => self.start_timer(Timer::Spare, now + delay),
            Decision::Failed | Decision::Never => {
                tracing::error!("warm spares keep crashing: no more spares");
                self.spares.given_up = true;
            }
        }
    }
}
