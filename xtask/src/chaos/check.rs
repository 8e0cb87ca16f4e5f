//! The checker of `cargo xtask chaos`: a pure function of what one target's run recorded
//! (requests, faults, the primary's event log, samples of the processes) that says what
//! holds and what does not.
//!
//! - **Failures.** A failed request is explained only by a `kill -9` (of this run) of the
//!   worker that held its connection at that moment:
//!   - on a connection that had answered before, the holder is the worker that answered
//!     its previous request (`held_by`): explained if that worker was killed before the
//!     request ended;
//!   - on a connection's first request the holder is unknown (the primary or the kernel
//!     chose it), so the rule is conservative: explained only if some worker of the target
//!     was killed while the request was in flight (between its start and its end).
//!
//!   Every other failure is unexplained: a worker the primary killed itself (hung, past a
//!   drain deadline), a refused or reset connection while no kill happened, a timeout.
//! - **Recovery.** After each fault ends, a request succeeds within [`RECOVERY`].
//! - **Drift.** The primary's RSS and descriptor count at the end are within 10% (or
//!   [`RSS_SLACK_KB`] / [`FD_SLACK`]) of their values after the warm-up.
//! - **Processes.** No process was a zombie at two samples in a row (a worker is a zombie
//!   for the moment between its death and its primary's wait: a single sample may catch
//!   that); nothing of the run is left after the stop, and the port is closed.
//! - **Event log.** One exit per fork (per primary, whose worker ids are its own), no exit
//!   without a fork, and no request that started after a worker's exit was logged answered
//!   by that worker; every pid that answered was forked by a primary of the run.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::client::{Outcome, Request};
use super::faults::FaultRecord;
use super::schedule::FaultKind;
use super::target::LogEvent;

/// How soon the service must answer again after a fault ends.
pub(crate) const RECOVERY: Duration = Duration::from_secs(1);
/// RSS drift always allowed, in kB.
pub(crate) const RSS_SLACK_KB: u64 = 2048;
/// Descriptor drift always allowed.
pub(crate) const FD_SLACK: u64 = 8;
/// Slack between the event log's wall clock (milliseconds) and the load's clock.
const LOG_SLACK: Duration = Duration::from_millis(50);

/// The primary's resident set (kB) and descriptor count at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub(crate) struct Usage {
    pub(crate) rss_kb: u64,
    pub(crate) fds: u64,
}

/// Everything one target's run recorded.
#[derive(Debug, Default)]
pub(crate) struct Run {
    pub(crate) requests: Vec<Request>,
    pub(crate) faults: Vec<FaultRecord>,
    pub(crate) events: Vec<LogEvent>,
    /// The load's start on the wall clock, in milliseconds since the epoch.
    pub(crate) wall_start_ms: u64,
    pub(crate) warm: Usage,
    pub(crate) end: Usage,
    /// Pids seen as zombies at two samples in a row.
    pub(crate) zombies: Vec<u32>,
    /// Processes of the run still there after the stop.
    pub(crate) left: Vec<u32>,
    pub(crate) port_open_after: bool,
    pub(crate) capped: bool,
    pub(crate) dropped_events: u64,
}

/// What the checker found.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub(crate) requests: usize,
    pub(crate) failed: usize,
    pub(crate) explained: usize,
    /// The unexplained failures (the first few are shown).
    pub(crate) unexplained: Vec<Request>,
    /// The longest time from a fault's end to the next success, and that fault.
    pub(crate) longest_gap: Duration,
    pub(crate) longest_gap_after: Option<FaultKind>,
    pub(crate) rss_drift_kb: i64,
    pub(crate) fd_drift: i64,
    pub(crate) faults: BTreeMap<&'static str, usize>,
    /// Every rule broken, in words.
    pub(crate) problems: Vec<String>,
}

impl Verdict {
    pub(crate) fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks one target's run.
pub(crate) fn check(run: &Run) -> Verdict {
    let mut v = Verdict {
        requests: run.requests.len(),
        ..Verdict::default()
    };
    for f in &run.faults {
        *v.faults.entry(f.kind.name()).or_default() += 1;
    }
    let kills: Vec<(Duration, u32)> = run
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::Kill)
        .filter_map(|f| Some((f.start, f.pid?)))
        .collect();
    for r in run.requests.iter().filter(|r| !r.is_ok()) {
        v.failed += 1;
        if explained(r, &kills) {
            v.explained += 1;
        } else {
            v.unexplained.push(*r);
        }
    }
    if !v.unexplained.is_empty() {
        let first: Vec<String> = v.unexplained.iter().take(5).map(describe).collect();
        v.problems.push(format!(
            "{} unexplained failures; the first: {}",
            v.unexplained.len(),
            first.join("; ")
        ));
    }
    recovery(run, &mut v);
    drift(run, &mut v);
    if !run.zombies.is_empty() {
        v.problems.push(format!("zombies: {:?}", run.zombies));
    }
    if !run.left.is_empty() {
        v.problems
            .push(format!("left after the stop: {:?}", run.left));
    }
    if run.port_open_after {
        v.problems
            .push("the port still accepts after the stop".into());
    }
    if run.capped {
        v.problems.push("the load reached its record limit".into());
    }
    if run.dropped_events > 0 {
        v.problems
            .push(format!("{} event lines dropped", run.dropped_events));
    }
    event_log(run, &mut v);
    v
}

/// Whether a failed request is explained by one of `kills` (time, pid).
pub(crate) fn explained(r: &Request, kills: &[(Duration, u32)]) -> bool {
    match r.held_by {
        Some(holder) => kills.iter().any(|&(at, pid)| pid == holder && at <= r.end),
        None => kills.iter().any(|&(at, _)| r.start <= at && at <= r.end),
    }
}

fn describe(r: &Request) -> String {
    let outcome = match r.outcome {
        Outcome::Status(status) => format!("status {status}"),
        Outcome::Error(kind) => kind.name().to_owned(),
    };
    format!(
        "{outcome} at {:.3}-{:.3} s on connection {} (held by {:?})",
        r.start.as_secs_f64(),
        r.end.as_secs_f64(),
        r.conn,
        r.held_by
    )
}

/// After each fault ends, the first success ends within [`RECOVERY`].
fn recovery(run: &Run, v: &mut Verdict) {
    let successes: Vec<Duration> = run
        .requests
        .iter()
        .filter(|r| r.is_ok())
        .map(|r| r.end)
        .collect();
    let last = run.requests.iter().map(|r| r.end).max().unwrap_or_default();
    for f in &run.faults {
        let next = successes.partition_point(|&end| end < f.end);
        let gap = successes
            .get(next)
            .map_or(last.saturating_sub(f.end), |&end| end - f.end);
        if gap > v.longest_gap {
            v.longest_gap = gap;
            v.longest_gap_after = Some(f.kind);
        }
        if gap > RECOVERY {
            v.problems.push(format!(
                "no success for {:.3} s after {} ended at {:.3} s",
                gap.as_secs_f64(),
                f.kind.name(),
                f.end.as_secs_f64()
            ));
        }
    }
}

fn drift(run: &Run, v: &mut Verdict) {
    v.rss_drift_kb = run.end.rss_kb as i64 - run.warm.rss_kb as i64;
    v.fd_drift = run.end.fds as i64 - run.warm.fds as i64;
    let rss_bound = (run.warm.rss_kb / 10).max(RSS_SLACK_KB);
    let fd_bound = (run.warm.fds / 10).max(FD_SLACK);
    if v.rss_drift_kb.unsigned_abs() > rss_bound {
        v.problems.push(format!(
            "primary RSS {} kB after warm-up, {} kB at the end",
            run.warm.rss_kb, run.end.rss_kb
        ));
    }
    if v.fd_drift.unsigned_abs() > fd_bound {
        v.problems.push(format!(
            "primary fds {} after warm-up, {} at the end",
            run.warm.fds, run.end.fds
        ));
    }
}

/// What the event log says of one worker.
#[derive(Debug, Default)]
struct Logged {
    pid: Option<u32>,
    forks: usize,
    exits: usize,
    /// When its exit was logged, on the load's clock.
    exited: Option<Duration>,
}

fn event_log(run: &Run, v: &mut Verdict) {
    let mut workers: BTreeMap<(u32, u64), Logged> = BTreeMap::new();
    for e in &run.events {
        let Some(id) = e.id else { continue };
        let at = Duration::from_millis(e.ts_ms.saturating_sub(run.wall_start_ms));
        let entry = workers.entry((e.primary, id)).or_default();
        match e.event.as_str() {
            "fork" => {
                entry.pid = e.pid;
                entry.forks += 1;
            }
            "exit" => {
                entry.exits += 1;
                entry.exited = Some(at);
            }
            _ => {}
        }
    }
    let mut forked: BTreeSet<u32> = BTreeSet::new();
    let mut exited_at: BTreeMap<u32, Duration> = BTreeMap::new();
    for (&(primary, id), logged) in &workers {
        let Logged {
            pid,
            forks,
            exits,
            exited,
        } = *logged;
        if forks != 1 || exits != 1 {
            v.problems.push(format!(
                "event log: worker {id} of primary {primary} forked {forks} times, exited {exits}"
            ));
        }
        if let Some(pid) = pid {
            forked.insert(pid);
            if let Some(at) = exited {
                exited_at.insert(pid, at);
            }
        }
    }
    let mut strangers = BTreeSet::new();
    let mut after_exit = BTreeSet::new();
    for r in &run.requests {
        let Some(pid) = r.pid else { continue };
        if !forked.contains(&pid) {
            strangers.insert(pid);
        }
        if exited_at
            .get(&pid)
            .is_some_and(|&at| r.start > at + LOG_SLACK)
        {
            after_exit.insert(pid);
        }
    }
    if !strangers.is_empty() {
        v.problems.push(format!(
            "event log: pids answered but never forked: {strangers:?}"
        ));
    }
    if !after_exit.is_empty() {
        v.problems.push(format!(
            "event log: workers answered requests started after their exit: {after_exit:?}"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::client::ErrorKind;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn request(start: u64, end: u64, ok: bool, pid: u32, held_by: Option<u32>) -> Request {
        Request {
            start: ms(start),
            end: ms(end),
            outcome: if ok {
                Outcome::Status(200)
            } else {
                Outcome::Error(ErrorKind::Reset)
            },
            pid: ok.then_some(pid),
            conn: 1,
            held_by,
        }
    }

    fn fault(kind: FaultKind, start: u64, end: u64, pid: Option<u32>) -> FaultRecord {
        FaultRecord {
            kind,
            start: ms(start),
            end: ms(end),
            pid,
            detail: String::new(),
        }
    }

    fn event(ts_ms: u64, event: &str, id: u64, pid: Option<u32>) -> LogEvent {
        LogEvent {
            ts_ms,
            primary: 1,
            event: event.into(),
            id: Some(id),
            pid,
            status: None,
        }
    }

    /// A run with workers 10 and 11 forked and exited cleanly, answering `requests`.
    fn run(requests: Vec<Request>, faults: Vec<FaultRecord>) -> Run {
        Run {
            requests,
            faults,
            events: vec![
                event(0, "fork", 1, Some(10)),
                event(0, "fork", 2, Some(11)),
                event(9000, "exit", 1, None),
                event(9000, "exit", 2, None),
            ],
            warm: Usage {
                rss_kb: 10_000,
                fds: 20,
            },
            end: Usage {
                rss_kb: 10_500,
                fds: 22,
            },
            ..Run::default()
        }
    }

    #[track_caller]
    fn check_explained(r: Request, kills: &[(u64, u32)], expected: bool) {
        let kills: Vec<(Duration, u32)> = kills.iter().map(|&(at, pid)| (ms(at), pid)).collect();
        assert_eq!(explained(&r, &kills), expected, "{r:?} {kills:?}");
    }

    #[test]
    fn a_failure_on_a_held_connection_needs_a_kill_of_its_holder() {
        check_explained(request(100, 110, false, 0, Some(10)), &[(90, 10)], true);
        check_explained(request(100, 110, false, 0, Some(10)), &[(105, 10)], true);
        check_explained(request(100, 110, false, 0, Some(10)), &[(105, 11)], false);
        check_explained(request(100, 110, false, 0, Some(10)), &[(120, 10)], false);
        check_explained(request(100, 110, false, 0, Some(10)), &[], false);
    }

    #[test]
    fn a_failure_on_a_fresh_connection_needs_a_kill_while_in_flight() {
        check_explained(request(100, 110, false, 0, None), &[(105, 10)], true);
        check_explained(request(100, 110, false, 0, None), &[(90, 10)], false);
        check_explained(request(100, 110, false, 0, None), &[(111, 10)], false);
    }

    #[test]
    fn a_clean_run_passes_and_counts() {
        let requests = vec![
            request(0, 5, true, 10, None),
            request(100, 110, false, 0, Some(10)),
            request(110, 120, true, 11, None),
        ];
        let v = check(&run(
            requests,
            vec![fault(FaultKind::Kill, 105, 105, Some(10))],
        ));
        assert!(v.passed(), "{:?}", v.problems);
        assert_eq!((v.requests, v.failed, v.explained), (3, 1, 1));
        assert_eq!(v.longest_gap, ms(15));
        assert_eq!(v.faults.get("kill-9"), Some(&1));
    }

    #[test]
    fn a_slow_recovery_fails() {
        let requests = vec![
            request(0, 5, true, 10, None),
            request(2000, 2100, true, 10, None),
        ];
        let v = check(&run(
            requests,
            vec![fault(FaultKind::Stop, 10, 1000, Some(10))],
        ));
        assert_eq!(v.longest_gap, ms(1100));
        assert!(!v.passed());
    }

    #[test]
    fn drift_beyond_the_bound_fails() {
        let mut r = run(vec![request(0, 5, true, 10, None)], vec![]);
        r.end.fds = 29;
        assert!(!check(&r).passed());
        r.end.fds = 28;
        assert!(check(&r).passed());
        r.end.rss_kb = 12_049;
        assert!(!check(&r).passed());
    }

    #[test]
    fn the_event_log_must_be_consistent() {
        let mut r = run(vec![request(0, 5, true, 10, None)], vec![]);
        r.events.pop();
        assert!(!check(&r).passed(), "a fork without an exit");
        let r = run(vec![request(0, 5, true, 99, None)], vec![]);
        assert!(!check(&r).passed(), "an answer from a stranger");
        let r = run(vec![request(9100, 9105, true, 10, None)], vec![]);
        assert!(!check(&r).passed(), "an answer after the exit");
    }
}
