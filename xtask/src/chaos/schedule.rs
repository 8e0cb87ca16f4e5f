//! The fault schedule of `cargo xtask chaos`: which fault starts when, drawn from a seed
//! with a small PRNG of its own (SplitMix64), so that a seed names one schedule on every
//! machine and any run can be replayed.
//!
//! Every kind that applies to a target comes at least once (in a seeded order), then
//! kinds are drawn at random at one fault per [`MEAN_INTERVAL`] of the window on average.
//! Start times are uniform over the window, so faults overlap. Two binary upgrades
//! (`SIGUSR2`) are kept [`UPGRADE_SPACING`] apart: an operator does not start an upgrade
//! while the last one is still under way (nginx refuses it too).

use std::time::Duration;

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FaultKind {
    /// `kill -9` of a worker.
    Kill,
    /// `SIGSTOP` of a worker, `SIGCONT` after the hold (1-3 s).
    Stop,
    /// `SIGHUP` to the primary: a rolling reload.
    Hup,
    /// `SIGTTIN` to the primary, `SIGTTOU` after the hold (1-3 s): one worker more, then
    /// one less.
    Scale,
    /// `SIGUSR2` to the primary: binary upgrade (httpd-demo only).
    Upgrade,
    /// A worker's `RLIMIT_NOFILE` lowered to a few fds above what it holds, for 2 s.
    WorkerFds,
    /// The primary's `RLIMIT_NOFILE` lowered the same way, for 1 s.
    PrimaryFds,
    /// 1,000 connections at once, each sending one request.
    Burst,
    /// 500 connections that send half a request head and nothing more, for 2 s.
    Slowloris,
    /// `GET /burn?ms=2000`: one worker busy on its CPU for 2 s.
    Burn,
}

impl FaultKind {
    pub(crate) const ALL: [FaultKind; 10] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Hup,
        FaultKind::Scale,
        FaultKind::Upgrade,
        FaultKind::WorkerFds,
        FaultKind::PrimaryFds,
        FaultKind::Burst,
        FaultKind::Slowloris,
        FaultKind::Burn,
    ];

    /// The name in tables, the report and the timeline.
    pub(crate) fn name(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill-9",
            FaultKind::Stop => "sigstop",
            FaultKind::Hup => "sighup",
            FaultKind::Scale => "ttin-ttou",
            FaultKind::Upgrade => "sigusr2",
            FaultKind::WorkerFds => "worker-fds",
            FaultKind::PrimaryFds => "primary-fds",
            FaultKind::Burst => "burst-1000",
            FaultKind::Slowloris => "slowloris-500",
            FaultKind::Burn => "burn-cpu",
        }
    }

    /// How long the fault lasts, given a draw in `0..1000` (only `Stop` and `Scale` vary).
    fn hold(self, draw: u64) -> Duration {
        match self {
            FaultKind::Stop | FaultKind::Scale => Duration::from_millis(1000 + draw * 2),
            FaultKind::WorkerFds | FaultKind::Slowloris | FaultKind::Burn => Duration::from_secs(2),
            FaultKind::PrimaryFds => Duration::from_secs(1),
            FaultKind::Kill | FaultKind::Hup | FaultKind::Upgrade | FaultKind::Burst => {
                Duration::ZERO
            }
        }
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    /// When it starts, from the start of the target's load.
    pub(crate) at: Duration,
    pub(crate) kind: FaultKind,
    /// How long it lasts (a stop's or a lowered limit's length; zero for one-shot faults).
    pub(crate) hold: Duration,
    /// Which worker it picks: this modulo the live workers, in id order.
    pub(crate) pick: u64,
}

/// The longest hold of any fault: the schedule leaves this much after the last start.
pub(crate) const MAX_HOLD: Duration = Duration::from_secs(3);
/// One fault per this much of the window, on average (at least one of each kind).
pub(crate) const MEAN_INTERVAL: Duration = Duration::from_millis(1500);
/// The least time between two `SIGUSR2`s.
pub(crate) const UPGRADE_SPACING: Duration = Duration::from_secs(8);

/// SplitMix64: a tiny, well-mixed generator; the whole state is one `u64`.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw in `0..n` (`n` > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The schedule for faults of `kinds` starting within `from..until`, from `seed`.
pub(crate) fn plan(
    seed: u64,
    kinds: &[FaultKind],
    from: Duration,
    until: Duration,
) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let window = until.saturating_sub(from);
    if kinds.is_empty() || window.is_zero() {
        return Vec::new();
    }
    let window_ms = window.as_millis() as u64;
    let extra = (window.as_millis() / MEAN_INTERVAL.as_millis()) as usize;
    let count = kinds.len().max(extra);
    // Each kind once, in a seeded order, then random kinds.
    let mut order: Vec<FaultKind> = kinds.to_vec();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    while order.len() < count {
        order.push(kinds[rng.below(kinds.len() as u64) as usize]);
    }
    let mut faults: Vec<Planned> = order
        .into_iter()
        .map(|kind| Planned {
            at: from + Duration::from_millis(rng.below(window_ms)),
            kind,
            hold: kind.hold(rng.below(1000)),
            pick: rng.next(),
        })
        .collect();
    faults.sort_by_key(|f| f.at);
    // Upgrades too close to the one before are dropped: only the first of the kind is
    // kept in a `UPGRADE_SPACING` window.
    let mut last_upgrade: Option<Duration> = None;
    faults.retain(|f| {
        if f.kind != FaultKind::Upgrade {
            return true;
        }
        let keep = last_upgrade.is_none_or(|last| f.at >= last + UPGRADE_SPACING);
        if keep {
            last_upgrade = Some(f.at);
        }
        keep
    });
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    const FROM: Duration = Duration::from_secs(2);

    #[test]
    fn a_seed_names_one_schedule() {
        let until = Duration::from_secs(30);
        let a = plan(7, &FaultKind::ALL, FROM, until);
        assert_eq!(a, plan(7, &FaultKind::ALL, FROM, until));
        assert_ne!(a, plan(8, &FaultKind::ALL, FROM, until));
    }

    #[test]
    fn every_kind_comes_and_starts_within_the_window() {
        let until = Duration::from_secs(9);
        for seed in 0..200 {
            let faults = plan(seed, &FaultKind::ALL, FROM, until);
            for kind in FaultKind::ALL {
                assert!(faults.iter().any(|f| f.kind == kind), "{seed}: {kind:?}");
            }
            assert!(faults.iter().all(|f| f.at >= FROM && f.at < until));
            assert!(faults.iter().all(|f| f.hold <= MAX_HOLD));
            assert!(faults.windows(2).all(|w| w[0].at <= w[1].at));
        }
    }

    #[test]
    fn long_windows_get_one_fault_per_mean_interval_and_spaced_upgrades() {
        let until = FROM + Duration::from_secs(600);
        let faults = plan(3, &FaultKind::ALL, FROM, until);
        assert!(faults.len() > 300, "{}", faults.len());
        let upgrades: Vec<Duration> = faults
            .iter()
            .filter(|f| f.kind == FaultKind::Upgrade)
            .map(|f| f.at)
            .collect();
        assert!(upgrades.len() > 10);
        assert!(upgrades.windows(2).all(|w| w[1] - w[0] >= UPGRADE_SPACING));
    }

    #[test]
    fn kinds_that_do_not_apply_never_come() {
        let kinds: Vec<FaultKind> = FaultKind::ALL
            .into_iter()
            .filter(|k| *k != FaultKind::Upgrade)
            .collect();
        let faults = plan(1, &kinds, FROM, Duration::from_secs(120));
        assert!(faults.iter().all(|f| f.kind != FaultKind::Upgrade));
    }
}
