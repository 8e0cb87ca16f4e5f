//! Respawn decisions for one worker slot: exponential backoff and the crash-loop limit.
//! Pure: the caller passes the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::RestartPolicy;

/// What to do after a slot's worker crashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start a replacement after this delay.
    RestartAfter(Duration),
    /// Too many crashes within the window: give the slot up.
    Failed,
    /// Restarts are disabled.
    Never,
}

/// The crash history of one slot.
#[derive(Debug)]
pub(crate) struct RestartTracker {
    policy: RestartPolicy,
    next_delay: Duration,
    crashes: VecDeque<Instant>,
    restarts: u32,
}

impl RestartTracker {
    pub(crate) fn new(policy: RestartPolicy) -> Self {
        Self {
            next_delay: policy.backoff_min,
            policy,
            crashes: VecDeque::new(),
            restarts: 0,
        }
    }

    /// How many replacements this slot has had.
    pub(crate) fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Records that a worker left at `now` after `uptime` without being asked and without
    /// failing (it disconnected itself, or exited 0): a worker that lived at least
    /// [`min_uptime`](RestartPolicy::min_uptime) is being recycled and is replaced at once
    /// without counting; one that left sooner counts as a crash (PM2's `min_uptime`), so
    /// a program that leaves right after it starts backs off and is given up like one that
    /// crashes.
    pub(crate) fn on_left(&mut self, now: Instant, uptime: Duration) -> Decision {
        if !self.policy.enabled || uptime < self.policy.min_uptime {
            return self.on_crash(now, uptime);
        }
        self.restarts += 1;
        Decision::RestartAfter(Duration::ZERO)
    }

    /// Records a crash at `now` of a worker that ran for `uptime`.
    ///
    /// A worker that had been stable, or the first crash of the slot within the window,
    /// is replaced at once (as Node users expect of PM2); each further crash in a row waits
    /// the backoff, which doubles up to its cap.
    pub(crate) fn on_crash(&mut self, now: Instant, uptime: Duration) -> Decision {
        if !self.policy.enabled {
            return Decision::Never;
        }
        let stable = uptime >= self.policy.stable_after;
        if stable {
            self.next_delay = self.policy.backoff_min;
        }
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > self.policy.window)
        {
            self.crashes.pop_front();
        }
        if self.crashes.len() > self.policy.max_restarts as usize {
            return Decision::Failed;
        }
        let delay = if stable || self.crashes.len() == 1 {
            Duration::ZERO
        } else {
            let delay = self.next_delay;
            self.next_delay = (delay * 2).min(self.policy.backoff_max);
            delay
        };
        self.restarts += 1;
        Decision::RestartAfter(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy() -> RestartPolicy {
        RestartPolicy::new()
            .backoff_min(ms(100))
            .backoff_max(ms(800))
            .stable_after(ms(1000))
            .crash_loop_limit(5, ms(10_000))
    }

    #[track_caller]
    fn check(crashes: &[(u64, u64)], expected: &[Decision]) {
        let start = Instant::now();
        let mut tracker = RestartTracker::new(policy());
        let got: Vec<_> = crashes
            .iter()
            .map(|&(at, up)| tracker.on_crash(start + ms(at), ms(up)))
            .collect();
        assert_eq!(got, expected);
    }

    use Decision::{Failed, RestartAfter};

    #[test]
    fn backoff_doubles_to_the_cap() {
        check(
            &[(0, 10), (200, 10), (500, 10), (1000, 10), (2000, 10)],
            &[
                RestartAfter(ms(0)),
                RestartAfter(ms(100)),
                RestartAfter(ms(200)),
                RestartAfter(ms(400)),
                RestartAfter(ms(800)),
            ],
        );
    }

    #[test]
    fn a_stable_run_resets_the_backoff() {
        check(
            &[(0, 10), (200, 10), (300, 10), (5000, 2000), (5100, 10)],
            &[
                RestartAfter(ms(0)),
                RestartAfter(ms(100)),
                RestartAfter(ms(200)),
                RestartAfter(ms(0)),
                RestartAfter(ms(100)),
            ],
        );
    }

    #[test]
    fn a_crash_loop_fails_the_slot() {
        let crashes: Vec<_> = (0..6).map(|i| (i * 10, 1)).collect();
        let mut expected: Vec<_> = [0, 100, 200, 400, 800]
            .iter()
            .map(|n| RestartAfter(ms(*n)))
            .collect();
        expected.push(Failed);
        check(&crashes, &expected);
    }

    #[test]
    fn old_crashes_leave_the_window() {
        let crashes: Vec<_> = (0..8).map(|i| (i * 3000, 1)).collect();
        let got = {
            let start = Instant::now();
            let mut tracker = RestartTracker::new(policy());
            crashes
                .iter()
                .map(|&(at, up)| tracker.on_crash(start + ms(at), ms(up)))
                .collect::<Vec<_>>()
        };
        assert!(!got.contains(&Failed), "{got:?}");
    }

    #[test]
    fn leaving_soon_counts_as_a_crash_and_leaving_late_is_recycling() {
        let start = Instant::now();
        let mut tracker = RestartTracker::new(policy().min_uptime(ms(500)));
        // Recycled after a long life: at once, however often, never given up.
        for i in 0..20 {
            assert_eq!(
                tracker.on_left(start + ms(i * 10), ms(600)),
                RestartAfter(Duration::ZERO)
            );
        }
        // Leaving right after the start backs off and is given up like a crash loop.
        let got: Vec<_> = (0..6)
            .map(|i| tracker.on_left(start + ms(1000 + i * 10), ms(100)))
            .collect();
        let mut expected: Vec<_> = [0, 100, 200, 400, 800]
            .iter()
            .map(|n| RestartAfter(ms(*n)))
            .collect();
        expected.push(Failed);
        assert_eq!(got, expected);
    }

    #[test]
    fn disabled_never_restarts_and_a_stable_worker_is_replaced_at_once() {
        let mut never = RestartTracker::new(RestartPolicy::never());
        assert_eq!(never.on_crash(Instant::now(), ms(1)), Decision::Never);
        let mut tracker = RestartTracker::new(policy());
        let start = Instant::now();
        for i in 0..3 {
            assert_eq!(
                tracker.on_crash(start + ms(i * 5000), ms(5000)),
                RestartAfter(Duration::ZERO)
            );
        }
        assert_eq!(tracker.restarts(), 3);
    }
}
