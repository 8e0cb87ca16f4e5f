//! The last minutes of the cluster for the status page's chart: a bounded ring of
//! per-second samples of [`Totals`](crate::Totals) (at most [`HISTORY_POINTS`]; the oldest
//! is dropped), recorded by the metrics server's own ticker, and the rates between them.
//! Pure: no clock (the caller passes the primary's uptime), no I/O.

use std::collections::VecDeque;
use std::time::Duration;

use crate::primary::stats::{ExitCause, Totals};

/// How many samples the ring keeps: five minutes at one a second.
pub(crate) const HISTORY_POINTS: usize = 300;

/// What one tick saw: counts since the start, at an uptime.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at: Duration,
    handed: u64,
    restarts: u64,
}

/// The rates between two samples, at the later one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Rate {
    /// The later sample's uptime.
    pub(crate) at: Duration,
    /// Round-robin hand-offs per second.
    pub(crate) handed: f64,
    /// Restarts per second: exits the primary did not ask for (crash, signal, disconnect,
    /// memory limit), each followed by a replacement unless its slot was given up.
    pub(crate) restarts: f64,
}

/// The ring of samples, oldest first.
#[derive(Debug)]
pub(crate) struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
}

impl Default for History {
    fn default() -> Self {
        Self::with_capacity(HISTORY_POINTS)
    }
}

impl History {
    /// A ring that keeps at most `capacity` samples (at least 2, for one rate).
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        let capacity = capacity.max(2);
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    /// Records the totals seen at `at` (the primary's uptime). A sample not later than the
    /// last one is ignored (no rate can be drawn from it).
    pub(crate) fn record(&mut self, at: Duration, totals: &Totals) {
        if self.samples.back().is_some_and(|last| last.at >= at) {
            return;
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        let unasked = ExitCause::ALL
            .iter()
            .filter(|cause| **cause != ExitCause::Asked)
            .map(|cause| totals.exits.get(*cause))
            .sum();
        self.samples.push_back(Sample {
            at,
            handed: totals.handed,
            restarts: unasked,
        });
    }

    /// How many samples it holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.samples.len()
    }

    /// The rate between each sample and the one before it, oldest first (one fewer than
    /// the samples).
    pub(crate) fn rates(&self) -> Vec<Rate> {
        let per_second =
            |later: u64, earlier: u64, seconds: f64| later.saturating_sub(earlier) as f64 / seconds;
        self.samples
            .iter()
            .zip(self.samples.iter().skip(1))
            .map(|(earlier, later)| {
                let seconds = (later.at - earlier.at).as_secs_f64();
                Rate {
                    at: later.at,
                    handed: per_second(later.handed, earlier.handed, seconds),
                    restarts: per_second(later.restarts, earlier.restarts, seconds),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(handed: u64, crashes: u64, asked: u64) -> Totals {
        let mut totals = Totals {
            handed,
            ..Totals::default()
        };
        for _ in 0..crashes {
            totals.exits.add(ExitCause::Crash);
        }
        for _ in 0..asked {
            totals.exits.add(ExitCause::Asked);
        }
        totals
    }

    #[test]
    fn keeps_at_most_its_capacity_and_drops_the_oldest() {
        let mut history = History::with_capacity(5);
        for second in 1..=12 {
            history.record(Duration::from_secs(second), &totals(second * 10, 0, 0));
        }
        assert_eq!(history.len(), 5);
        let rates = history.rates();
        assert_eq!(rates.len(), 4);
        assert_eq!(
            rates[0].at,
            Duration::from_secs(9),
            "the oldest were dropped"
        );
        assert_eq!(rates[3].at, Duration::from_secs(12));
        assert!(rates.iter().all(|r| r.handed == 10.0), "{rates:?}");
    }

    #[test]
    fn the_default_ring_holds_five_minutes() {
        let mut history = History::default();
        for second in 0..2 * HISTORY_POINTS as u64 {
            history.record(Duration::from_secs(second), &totals(0, 0, 0));
        }
        assert_eq!(history.len(), HISTORY_POINTS);
    }

    #[test]
    fn rates_are_per_second_of_the_time_between_samples_and_count_unasked_exits() {
        let mut history = History::default();
        history.record(Duration::from_secs(10), &totals(100, 1, 0));
        // Two seconds later (a late tick): 50 hand-offs, two crashes and three asked exits.
        history.record(Duration::from_secs(12), &totals(150, 3, 3));
        assert_eq!(
            history.rates(),
            [Rate {
                at: Duration::from_secs(12),
                handed: 25.0,
                restarts: 1.0,
            }]
        );
    }

    #[test]
    fn a_sample_not_later_than_the_last_is_ignored() {
        let mut history = History::default();
        history.record(Duration::from_secs(5), &totals(1, 0, 0));
        history.record(Duration::from_secs(5), &totals(2, 0, 0));
        history.record(Duration::from_secs(4), &totals(3, 0, 0));
        assert_eq!(history.len(), 1);
        assert!(history.rates().is_empty());
    }
}
