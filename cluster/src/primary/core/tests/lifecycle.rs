//! A worker's life in Node's order: events, exits and their grace time, crashes and
//! recycling, kills, stops before online, the connect timeout, readiness.

use super::*;

#[test]
fn a_cooperative_worker_goes_through_nodes_events_in_order() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.request(Request::Disconnect(Some(id(1))));
    sim.settle(100);
    assert_eq!(
        sim.events[&id(1)],
        ["fork", "online", "listening", "disconnect", "exit"]
    );
    assert_eq!(sim.exits[&id(1)], (ExitStatus::Exited(0), true));
    assert!(
        sim.procs.len() == 1,
        "a disconnected worker is not replaced"
    );
    sim.stop_and_check();
}

#[test]
fn an_exit_before_the_channel_ends_waits_for_the_channel_or_the_grace_time() {
    let mut sim = serving(1, Policy::Shared);
    sim.exit(id(1), ExitStatus::Exited(1), Some(false));
    assert_eq!(sim.events[&id(1)].last(), Some(&"exit"));
    sim.settle(100);
    // No channel end at all: the grace timer reports the exit.
    sim.exit(id(2), ExitStatus::Exited(1), None);
    assert_eq!(sim.events[&id(2)].last(), Some(&"listening"));
    assert!(sim.fire_timer());
    assert_eq!(sim.events[&id(2)][3..], ["disconnect", "exit"]);
    sim.stop_and_check();
}

#[test]
fn an_unexpected_exit_with_code_zero_counts_toward_the_crash_loop_limit() {
    let mut sim = serving(1, Policy::RoundRobin);
    // The limit is 4 crashes in the window: the 5th gives the slot up, once.
    for _ in 0..10 {
        let Some(id) = sim.pick(0) else { break };
        sim.exit(id, ExitStatus::Exited(0), Some(true));
        sim.settle(100);
    }
    assert_eq!(sim.slot_failed.get(&0), Some(&1));
    assert_eq!(sim.procs.len(), 5, "the first worker and four replacements");
    assert!(sim.exits.values().all(|(_, after)| !after));
    let stats = sim.core.stats(sim.now);
    assert_eq!(stats.failed_slots, [0]);
    assert!(!stats.ready);
    sim.stop_and_check();
}

#[test]
fn a_worker_that_disconnects_itself_is_replaced_at_once_and_never_counts_as_a_crash() {
    let mut sim = serving(1, Policy::RoundRobin);
    for round in 0..10 {
        let old = sim.pick(0).expect("a worker");
        // After its minimum uptime: recycling.
        sim.now += sim.core.config.restart.min_uptime;
        sim.worker_says(old, ToPrimary::Disconnecting);
        let forks = sim.events.len();
        assert_eq!(
            forks,
            round + 2,
            "the replacement starts before the old one exits"
        );
        sim.exit(old, ExitStatus::Exited(0), Some(true));
        sim.settle(100);
        assert_eq!(sim.exits[&old], (ExitStatus::Exited(0), true));
    }
    assert!(sim.slot_failed.is_empty());
    sim.stop_and_check();
}

#[test]
fn kill_disconnects_first_sets_exited_after_disconnect_and_is_not_replaced() {
    let mut sim = serving(2, Policy::RoundRobin);
    let kill = sim.request(Request::Kill(id(1), Signal::SIGTERM));
    assert!(
        matches!(sim.replies.get(&kill), Some(Outcome::Done)),
        "{:?}",
        sim.replies.get(&kill)
    );
    assert_eq!(sim.exits[&id(1)], (signaled(Signal::SIGTERM), true));
    sim.settle(100);
    assert_eq!(sim.procs.len(), 2, "not replaced");
    let unknown = sim.request(Request::Kill(id(9), Signal::SIGTERM));
    assert!(matches!(
        sim.replies.get(&unknown),
        Some(Outcome::UnknownWorker(n)) if *n == id(9)
    ));
    sim.stop_and_check();
}

/// A stop, a reload or a removal that reaches workers still starting: each is stopped
/// (it may still report online), never flagged as misbehaving (issue: SIGHUP then SIGTERM
/// 50 ms later, SIGTTIN then SIGTTOU, SIGTERM right after the start).
#[test]
fn a_worker_told_to_stop_before_it_came_online_is_stopped_not_flagged() {
    let commands = [
        vec![Request::Stop { grace: None }],
        vec![Request::Reload, Request::Stop { grace: None }],
        vec![
            Request::AddWorker { env: Vec::new() },
            Request::RemoveWorker,
            Request::Stop { grace: None },
        ],
    ];
    for commands in commands {
        let mut sim = Sim::new(config(2, Policy::RoundRobin));
        for command in commands {
            sim.request(command);
        }
        // Every worker still starting now reports online, then reads its messages.
        let ids: Vec<WorkerId> = sim.procs.keys().copied().collect();
        for id in ids {
            sim.online(id);
        }
        sim.settle(100);
        assert!(sim.misbehaved.is_empty(), "{:?}", sim.misbehaved);
        assert!(sim.finished);
        for (id, (_, asked)) in &sim.exits {
            assert!(asked, "{id} exited after being asked");
        }
    }
}

/// A worker told to stop while starting comes online and asks for a server before it
/// reads its disconnect (a Node app's `listen()` in its first tick): the query goes
/// unanswered, as under Node's primary. A grant would reach a worker that had closed its
/// servers and its channel already, and it would serve on (found with `--require`).
#[test]
fn a_worker_asked_to_stop_gets_no_server() {
    for policy in [Policy::RoundRobin, Policy::Shared, Policy::ReusePort] {
        let mut sim = Sim::new(config(1, policy));
        sim.request(Request::Stop { grace: None });
        sim.online(id(1));
        sim.listen(id(1));
        let inbox: Vec<_> = sim.procs[&id(1)]
            .inbox
            .iter()
            .map(|(m, _)| m.clone())
            .collect();
        assert_eq!(inbox, [ToWorker::Disconnect], "{policy:?}");
        sim.settle(100);
        assert!(sim.misbehaved.is_empty(), "{:?}", sim.misbehaved);
        assert!(sim.finished);
        assert!(sim.exits[&id(1)].1, "exited as asked");
    }
}

/// A program that never connects (it does not speak the protocol) is reported once
/// after the connect timeout and is sent SIGTERM at the stop, which it can act on.
#[test]
fn a_worker_that_never_connects_is_reported_and_terminated_at_the_stop() {
    let mut sim = Sim::new(config(1, Policy::RoundRobin));
    let waited = sim.core.config.connect_timeout;
    assert_eq!(
        sim.core.timers.get(&Timer::Connect(id(1))),
        Some(sim.now + waited)
    );
    assert!(sim.fire_timer());
    assert!(matches!(
        sim.core.workers[&id(1)].phase,
        Phase::Forked { overdue: true, .. }
    ));
    assert_eq!(sim.events[&id(1)], ["fork", "other"], "reported once");
    sim.request(Request::Stop { grace: None });
    assert_eq!(sim.exits[&id(1)].0, signaled(Signal::SIGTERM));
    assert!(
        sim.finished,
        "stopped without waiting for the drain deadline"
    );
}

/// A worker that comes online in time is never reported.
#[test]
fn a_worker_online_in_time_leaves_no_connect_timer() {
    let sim = serving(2, Policy::Shared);
    for n in 1..=2 {
        assert!(!sim.core.timers.contains(&Timer::Connect(id(n))));
    }
}

/// A worker that disconnects itself right after it starts counts as a crash (backoff,
/// then the slot is given up); one that does so after the minimum uptime is recycled at
/// once, however often.
#[test]
fn leaving_right_after_the_start_is_a_crash_loop_and_leaving_later_is_recycling() {
    let min_uptime = config(1, Policy::RoundRobin).restart.min_uptime;
    for (wait, fails) in [(std::time::Duration::ZERO, true), (min_uptime, false)] {
        let mut sim = serving(1, Policy::RoundRobin);
        for _ in 0..12 {
            let Some(current) = sim.core.slots[&0].current() else {
                break;
            };
            sim.now += wait;
            sim.worker_says(current, ToPrimary::Disconnecting);
            sim.settle(100);
        }
        assert_eq!(sim.slot_failed.contains_key(&0), fails, "waited {wait:?}");
        assert!(sim.misbehaved.is_empty());
        sim.stop_and_check();
    }
}

/// Under `wait_ready`, a listening worker is ready only once it says so.
#[test]
fn under_wait_ready_a_worker_counts_once_it_says_it_is_ready() {
    let config = Config {
        wait_ready: true,
        ..config(1, Policy::RoundRobin)
    };
    let mut sim = Sim::new(config);
    sim.online(id(1));
    sim.listen(id(1));
    while sim.deliver(id(1), true) {}
    assert_eq!(sim.listening_current(), 1);
    assert!(!sim.core.stats(sim.now).ready, "listening is not enough");
    sim.ready(id(1));
    assert!(sim.core.stats(sim.now).ready);
    sim.stop_and_check();
}

#[test]
fn a_stop_with_a_delay_turns_unready_at_once_and_drains_only_after_the_delay() {
    let delay = std::time::Duration::from_secs(2);
    let config = Config {
        stop_delay: delay,
        ..config(2, Policy::RoundRobin)
    };
    let mut sim = Sim::new(config);
    sim.settle(100);
    assert!(sim.core.stats(sim.now).ready);
    let stop = sim.request(Request::Stop { grace: None });
    let stats = sim.core.stats(sim.now);
    assert!(
        !stats.ready && stats.stopping,
        "not ready as soon as the stop is asked"
    );
    let told = |sim: &Sim| {
        sim.procs
            .values()
            .any(|p| p.asked || p.inbox.iter().any(|(m, _)| *m == ToWorker::Disconnect))
    };
    assert!(!told(&sim), "workers serve on during the delay");
    let before = sim.now;
    while !told(&sim) {
        assert!(sim.fire_timer(), "the stop delay fires");
    }
    assert!(
        sim.now >= before + delay,
        "drained no sooner than the delay"
    );
    assert!(!sim.replies.contains_key(&stop));
    sim.settle(1000);
    assert!(matches!(sim.replies.get(&stop), Some(Outcome::Done)));
}

#[test]
fn a_warm_spare_takes_a_crashed_workers_slot_at_once_and_a_reload_replaces_the_spares() {
    let config = Config {
        warm_spares: 1,
        ..config(2, Policy::RoundRobin)
    };
    let mut sim = Sim::new(config);
    sim.settle(100);
    // Two slot workers and a spare, which asked for its server and holds it.
    let spare = id(3);
    assert!(sim.core.workers[&spare].spare.is_some());
    assert_eq!(
        sim.core.workers[&spare]
            .spare
            .as_ref()
            .map(|s| s.held.len()),
        Some(1)
    );
    assert!(
        sim.core.workers[&spare].servers.is_empty(),
        "nothing granted to a spare"
    );
    for _ in 0..20 {
        sim.connect(0);
    }
    sim.settle(100);
    assert_eq!(
        sim.core.workers[&spare].handed, 0,
        "a spare is handed nothing"
    );
    // The first crash: no backoff, the spare takes the slot in the same step.
    sim.exit(id(1), signaled(Signal::SIGKILL), Some(true));
    let promoted = &sim.core.workers[&spare];
    assert!(
        promoted.spare.is_none() && promoted.slot == 0,
        "{promoted:?}"
    );
    assert_eq!(sim.core.slots[&0].current(), Some(spare));
    assert!(
        sim.procs[&spare]
            .inbox
            .iter()
            .any(|(m, _)| matches!(m, ToWorker::QueryReply { .. })),
        "its held query is answered"
    );
    // A new spare is started in its place.
    let new_spare = id(4);
    assert!(sim.core.workers[&new_spare].spare.is_some());
    sim.settle(100);
    assert_eq!(sim.listening_current(), 2);
    // A reload: the spare of the old code is stopped and a new one started.
    let reload = sim.request(Request::Reload);
    assert!(
        sim.procs[&new_spare].asked
            || sim.procs[&new_spare]
                .inbox
                .iter()
                .any(|(m, _)| *m == ToWorker::Disconnect),
        "the old code's spare is stopped"
    );
    sim.settle(1000);
    assert!(matches!(sim.replies.get(&reload), Some(Outcome::Reloaded(r)) if r.succeeded()));
    let spares: Vec<WorkerId> = sim
        .core
        .workers
        .iter()
        .filter(|(_, w)| w.spare.is_some())
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(spares.len(), 1);
    assert!(spares[0] > new_spare, "a spare of the new code: {spares:?}");
    sim.stop_and_check();
}
