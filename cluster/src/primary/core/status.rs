//! The core's state as the application sees it: [`Stats`], built at `now` (uptimes are
//! measured from the times the core was given, it reads no clock). The driver adds what
//! only it knows (each worker's build, its own counts) before answering.

use std::time::Instant;

use super::handles::Handle;
use super::lifecycle::Occupant;
use super::{Core, Run};
use crate::primary::stats::{SlotStats, Stats, WorkerStats};

impl Core {
    pub(crate) fn stats(&mut self, now: Instant) -> Stats {
        let mut queued = 0;
        for handle in self.handles.values_mut() {
            if let Some(rr) = handle.round_robin() {
                queued += rr.queued();
            }
        }
        let mut workers = Vec::with_capacity(self.workers.len());
        for (id, worker) in &self.workers {
            let in_flight = self
                .handles
                .values_mut()
                .filter_map(Handle::round_robin)
                .map(|rr| rr.in_flight(*id))
                .sum();
            let mut listening: Vec<_> = worker
                .servers
                .keys()
                .filter_map(|key| self.handles.get(key)?.address.clone())
                .collect();
            listening.sort_by_key(ToString::to_string);
            listening.dedup();
            workers.push(WorkerStats {
                id: *id,
                pid: worker.phase.pid().unwrap_or_default(),
                slot: worker.slot,
                state: worker.state(),
                uptime: now.saturating_duration_since(worker.started),
                handed: worker.handed,
                in_flight,
                restarts: worker.restarts,
                listening,
                usage: worker.usage,
                spare: worker.spare.is_some(),
                build: None,
            });
        }
        let slots = self
            .slots
            .iter()
            .map(|(slot, s)| SlotStats {
                slot: *slot,
                worker: s.current(),
                restarts: s.tracker.restarts(),
                last_exit: s.last_exit,
                failed: matches!(s.occupant, Occupant::Failed { .. }),
            })
            .collect::<Vec<_>>();
        Stats {
            failed_slots: slots.iter().filter(|s| s.failed).map(|s| s.slot).collect(),
            workers,
            slots,
            queued,
            ready: self.ready(),
            stopping: !matches!(self.run, Run::Running),
            policy: self.config.policy,
            uptime: now.saturating_duration_since(self.born),
            reload: self.reload_progress(),
            last_reload: self.last_reload.clone(),
            totals: self.totals,
        }
    }
}
