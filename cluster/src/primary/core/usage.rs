//! The workers' memory and CPU: the core asks for a sample every
//! [`Config::sample_every`](super::Config::sample_every) (`Effect::Sample`, answered by
//! `Input::Usage`), keeps the last one per worker (with the CPU use since the one before),
//! and replaces a worker that stays above
//! [`Config::max_rss`](super::Config::max_rss) for [`OVER_LIMIT_SAMPLES`] samples in a
//! row: gracefully, by the reload's steps (a new worker listening first), one slot at a
//! time.

use std::time::{Duration, Instant};

use super::lifecycle::Phase;
use super::{Core, Effect, Event, Run, Timer};
use crate::primary::stats::Usage;
use crate::protocol::WorkerId;

/// How many samples in a row a worker must be above the memory limit to be replaced (a
/// short peak, a garbage collector's, is let pass).
pub(crate) const OVER_LIMIT_SAMPLES: u32 = 2;

/// One reading of a worker's `/proc` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Resident set size, in bytes.
    pub(crate) rss_bytes: u64,
    /// User and system CPU time since it started.
    pub(crate) cpu_time: Duration,
}

impl Core {
    /// The `Sample` timer: ask for every running worker's usage, and again later.
    pub(super) fn sample(&mut self, now: Instant) {
        let pids: Vec<(WorkerId, u32)> = self
            .workers
            .iter()
            .filter_map(|(id, w)| match w.phase {
                Phase::Forked { pid, .. } | Phase::Online { pid } | Phase::Draining { pid, .. } => {
                    Some((*id, pid))
                }
                _ => None,
            })
            .collect();
        if !pids.is_empty() {
            self.out.push(Effect::Sample(pids));
        }
        if let (Some(every), false) = (self.config.sample_every, matches!(self.run, Run::Stopped)) {
            self.start_timer(Timer::Sample, now + every);
        }
    }

    /// The answer to a `Sample`: keep each reading; replace a worker above the memory
    /// limit for long enough.
    pub(super) fn on_usage(&mut self, samples: Vec<(WorkerId, Option<Sample>)>, now: Instant) {
        let limit = self.config.max_rss;
        let mut over = Vec::new();
        for (id, sample) in samples {
            let Some(worker) = self.workers.get_mut(&id) else {
                continue;
            };
            let Some(sample) = sample else {
                continue;
            };
            let cpu_percent = worker.usage.zip(worker.sampled).and_then(|(last, at)| {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let used = sample.cpu_time.saturating_sub(last.cpu_time).as_secs_f64();
                (elapsed > 0.0).then(|| 100.0 * used / elapsed)
            });
            worker.usage = Some(Usage {
                rss_bytes: sample.rss_bytes,
                cpu_time: sample.cpu_time,
                cpu_percent,
            });
            worker.sampled = Some(now);
            // Only a serving worker can be replaced the graceful way (its successor must
            // listen as it does); one still starting is counted once it serves.
            let serving = worker.serves(0);
            match limit {
                Some(limit) if serving && sample.rss_bytes > limit => {
                    worker.over_limit = worker.over_limit.saturating_add(1);
                    if worker.over_limit >= OVER_LIMIT_SAMPLES {
                        over.push((id, worker.slot, sample.rss_bytes, limit));
                    }
                }
                _ => worker.over_limit = 0,
            }
        }
        for (id, slot, rss_bytes, limit) in over {
            let replacing = self.replacing_for_memory(slot);
            if !self.running() || self.slot_current(slot) != Some(id) || replacing {
                continue;
            }
            tracing::warn!(%id, slot, rss_bytes, limit, "a worker stays above the memory limit: replacing it");
            self.emit(Event::MemoryLimit {
                id,
                slot,
                rss_bytes,
                limit,
            });
            self.replace_for_memory(slot, id, now);
        }
    }
}
