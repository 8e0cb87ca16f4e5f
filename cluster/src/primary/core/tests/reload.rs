//! Rolling reloads: every worker replaced, and the old one kept when the new code
//! crash-loops, never listens or cannot start.

use super::*;
use crate::ReloadFailure;
use crate::primary::stats::ReloadReport;

/// The report a reload request was answered with.
fn reload_report(sim: &Sim, request: RequestId) -> ReloadReport {
    match sim.replies.get(&request) {
        Some(Outcome::Reloaded(report)) => report.clone(),
        other => panic!("the reload was answered {other:?}"),
    }
}

#[test]
fn a_reload_replaces_every_worker_and_keeps_the_old_one_when_the_new_code_crash_loops() {
    let mut sim = serving(2, Policy::ReusePort);
    let reload = sim.request(Request::Reload);
    sim.settle(1000);
    let report = reload_report(&sim, reload);
    assert!(report.succeeded(), "{report:?}");
    assert_eq!(report.replaced, [0, 1]);
    assert!(sim.exits.contains_key(&id(1)) && sim.exits.contains_key(&id(2)));
    assert_eq!(sim.listening_current(), 2);

    // Now the new workers die at once: the slot gives up and the old worker stays.
    let before: Vec<WorkerId> = sim.core.workers.keys().copied().collect();
    let reload = sim.request(Request::Reload);
    for _ in 0..20 {
        let newest = *sim.procs.keys().last().expect("a worker");
        if !before.contains(&newest) {
            sim.exit(newest, ExitStatus::Exited(1), Some(true));
        }
        while sim.fire_timer() && !sim.replies.contains_key(&reload) {
            let newest = *sim.procs.keys().last().expect("a worker");
            if !before.contains(&newest) {
                sim.exit(newest, ExitStatus::Exited(1), Some(true));
            }
        }
    }
    let report = reload_report(&sim, reload);
    let failed: Vec<(usize, ReloadFailure)> =
        report.failed.iter().map(|f| (f.slot, f.reason)).collect();
    assert_eq!(
        failed,
        [(0, ReloadFailure::CrashLoop), (1, ReloadFailure::CrashLoop)]
    );
    assert!(report.replaced.is_empty() && !report.succeeded());
    for old in &before {
        assert!(sim.procs[old].alive, "{old} kept serving");
    }
    assert_eq!(sim.reload_failed, [0, 1], "each slot's reload failed once");
    assert!(sim.slot_failed.is_empty(), "no slot was given up");
    assert_eq!(sim.listening_current(), 2);
    sim.stop_and_check();
}

#[test]
fn a_reload_step_that_cannot_progress_times_out_and_keeps_the_old_worker() {
    let mut sim = serving(2, Policy::Shared);
    let reload = sim.request(Request::Reload);
    // The new worker of slot 0 (id 3) comes online but never listens.
    sim.online(id(3));
    assert!(sim.fire_timer(), "the reload timer");
    assert_eq!(sim.reload_failed, [0]);
    assert!(
        sim.procs[&id(3)]
            .inbox
            .iter()
            .any(|(m, _)| *m == ToWorker::Disconnect)
    );
    // The reload goes on with slot 1 and ends.
    sim.settle(1000);
    let report = reload_report(&sim, reload);
    assert_eq!(report.replaced, [1], "{report:?}");
    assert_eq!(report.failed.len(), 1);
    assert_eq!((report.failed[0].slot, report.failed[0].kept), (0, id(1)));
    assert!(matches!(
        report.failed[0].reason,
        ReloadFailure::NotListening { .. }
    ));
    assert!(sim.procs[&id(1)].alive, "slot 0 kept its old worker");
    assert!(!sim.procs[&id(2)].alive, "slot 1 was replaced");
    sim.stop_and_check();
}

#[test]
fn a_reload_whose_new_workers_cannot_even_start_keeps_every_old_worker() {
    let mut sim = serving(2, Policy::Shared);
    // The program is gone: every fork fails, and the slots wait for respawns.
    sim.fail_next_fork = true;
    let reload = sim.request(Request::Reload);
    for _ in 0..100 {
        if sim.replies.contains_key(&reload) {
            break;
        }
        sim.fail_next_fork = true;
        assert!(sim.fire_timer(), "a respawn or the reload timer");
    }
    sim.fail_next_fork = false;
    let report = reload_report(&sim, reload);
    let slots: Vec<usize> = report.failed.iter().map(|f| f.slot).collect();
    assert_eq!(slots, [0, 1], "{report:?}");
    // A failure names a new worker only if it was forked.
    for id in report.failed.iter().filter_map(|f| f.id) {
        assert!(
            sim.events[&id].contains(&"fork"),
            "{id} never started: {report:?}"
        );
    }
    assert!(report.replaced.is_empty());
    assert_eq!(sim.reload_failed, [0, 1], "each slot's failure is reported");
    sim.settle(1000);
    assert!(
        sim.procs[&id(1)].alive && sim.procs[&id(2)].alive,
        "the old workers serve on"
    );
    assert!(sim.core.stats(sim.now).ready);
    assert!(
        sim.core.stats(sim.now).failed_slots.is_empty(),
        "no slot is given up"
    );
    sim.stop_and_check();
}

#[test]
fn a_reload_asked_during_a_reload_runs_a_new_pass_over_every_slot() {
    let mut sim = serving(2, Policy::RoundRobin);
    let first = sim.request(Request::Reload);
    sim.settle(1); // slot 0 replaced (worker 3), slot 1 in progress
    let second = sim.request(Request::Reload);
    sim.settle(1000);
    assert!(reload_report(&sim, first).succeeded());
    assert!(reload_report(&sim, second).succeeded());
    let alive: Vec<u64> = sim
        .procs
        .iter()
        .filter(|(_, p)| p.alive)
        .map(|(id, _)| id.get())
        .collect();
    assert_eq!(alive.len(), 2);
    assert!(
        alive.iter().all(|n| *n > 4),
        "both slots reloaded twice: {alive:?}"
    );
    sim.stop_and_check();
}

/// Whether `id` has been told to stop (read or not).
fn told_to_stop(sim: &Sim, id: WorkerId) -> bool {
    let p = &sim.procs[&id];
    p.asked || p.inbox.iter().any(|(m, _)| *m == ToWorker::Disconnect)
}

#[test]
fn a_worker_above_the_memory_limit_is_replaced_once_its_successor_listens() {
    let limit = 100 << 20;
    let config = Config {
        sample_every: Some(std::time::Duration::from_secs(1)),
        max_rss: Some(limit),
        ..config(2, Policy::RoundRobin)
    };
    let mut sim = Sim::new(config);
    sim.settle(100);
    assert_eq!(sim.listening_current(), 2);
    sim.procs.get_mut(&id(1)).expect("worker 1").rss = limit + 1;
    // One sample above the limit is a peak; the second in a row replaces it.
    for _ in 0..super::super::usage::OVER_LIMIT_SAMPLES * 2 {
        if sim.memory_limited.contains(&id(1)) {
            break;
        }
        assert!(sim.fire_timer(), "the sample timer is armed");
    }
    assert!(
        sim.memory_limited.contains(&id(1)),
        "worker 1 was found above the limit"
    );
    assert!(!sim.memory_limited.contains(&id(2)));
    let new = *sim.procs.keys().last().expect("a successor");
    assert_eq!(new, id(3));
    assert!(
        !told_to_stop(&sim, id(1)),
        "the old worker serves until its successor listens"
    );
    assert!(sim.core.stats(sim.now).ready);
    // Settled: the successor listens, then the old worker is asked and exits.
    sim.settle(100);
    assert!(sim.exits.contains_key(&id(1)));
    assert_eq!(sim.causes.get(&id(1)), Some(&crate::ExitCause::MemoryLimit));
    let stats = sim.core.stats(sim.now);
    assert_eq!(stats.totals.exits.memory_limit, 1);
    let slot = stats.slots.iter().find(|s| s.slot == 0).expect("slot 0");
    assert_eq!(
        slot.last_exit.map(|e| e.cause),
        Some(crate::ExitCause::MemoryLimit)
    );
    assert_eq!(slot.worker, Some(id(3)));
    assert!(
        stats.last_reload.is_none(),
        "a memory replacement is no reload"
    );
    assert!(
        !told_to_stop(&sim, id(2)),
        "one slot at a time, only the one above"
    );
    sim.stop_and_check();
}

#[test]
fn a_reload_step_whose_every_fork_fails_names_no_new_worker() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.fork_failure_transient = true;
    sim.fail_next_fork = true;
    let reload = sim.request(Request::Reload);
    // Out of descriptors for the whole step: every retry's fork fails too.
    for _ in 0..1000 {
        if sim.replies.contains_key(&reload) {
            break;
        }
        sim.fail_next_fork = true;
        assert!(sim.fire_timer(), "a retry or the reload timer");
    }
    sim.fail_next_fork = false;
    let report = reload_report(&sim, reload);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].id, None, "no worker started: {report:?}");
    assert_eq!(report.failed[0].kept, id(1));
    sim.stop_and_check();
}
