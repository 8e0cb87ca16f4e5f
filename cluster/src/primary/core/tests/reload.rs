//! Rolling reloads: every worker replaced, and the old one kept when the new code
//! crash-loops, never listens or cannot start.

use super::*;

#[test]
fn a_reload_replaces_every_worker_and_keeps_the_old_one_when_the_new_code_crash_loops() {
    let mut sim = serving(2, Policy::ReusePort);
    let reload = sim.request(Request::Reload);
    sim.settle(1000);
    assert!(
        matches!(sim.replies.get(&reload), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&reload)
    );
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
    assert!(
        matches!(sim.replies.get(&reload), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&reload)
    );
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
    assert!(
        matches!(sim.replies.get(&reload), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&reload)
    );
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
    assert!(
        matches!(sim.replies.get(&reload), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&reload)
    );
    assert_eq!(sim.reload_failed, [0, 1], "each slot's failure is reported");
    sim.settle(1000);
    assert!(
        sim.procs[&id(1)].alive && sim.procs[&id(2)].alive,
        "the old workers serve on"
    );
    assert!(sim.core.stats().ready);
    assert!(
        sim.core.stats().failed_slots.is_empty(),
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
    assert!(
        matches!(sim.replies.get(&first), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&first)
    );
    assert!(
        matches!(sim.replies.get(&second), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&second)
    );
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
