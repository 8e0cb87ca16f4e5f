//! Tests of the primary's core: examples of Node's lifecycle and a model-based property
//! test over arbitrary interleavings (the simulator in `tests/sim.rs` checks the
//! invariants after every step).

mod model;
mod sim;

use child::{ExitStatus, Signal};

use self::sim::{Sim, config, signaled};
use super::lifecycle::Phase;
use super::{
    Config, Core, Effect, Input, MAX_SERVERS_PER_WORKER, Outcome, Request, RequestId, Timer,
};
use crate::protocol::{ToPrimary, ToWorker, WorkerId};
use crate::settings::Policy;

fn id(n: u64) -> WorkerId {
    WorkerId(n)
}

/// A cluster of `workers` cooperative workers, all online and listening once.
fn serving(workers: usize, policy: Policy) -> Sim {
    serving_with(workers, policy, false)
}

/// Started and settled: every worker online and listening (and ready).
fn serving_with(workers: usize, policy: Policy, wait_ready: bool) -> Sim {
    let config = Config {
        wait_ready,
        ..config(workers, policy)
    };
    let mut sim = Sim::new(config);
    sim.settle(100);
    assert_eq!(sim.listening_current(), workers);
    sim
}

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
    let stats = sim.core.stats();
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

#[test]
fn a_worker_asking_for_too_many_servers_or_the_same_one_twice_is_killed_and_replaced() {
    let mut sim = serving(2, Policy::Shared);
    sim.hostile(id(1));
    sim.hostile(id(2));
    for n in 0..MAX_SERVERS_PER_WORKER + 1 {
        let key = sim::key(u32::try_from(n).expect("small") + 10);
        let seq = 100 + n as u64;
        sim.worker_says(
            id(1),
            ToPrimary::QueryServer {
                seq,
                key,
                backlog: 8,
            },
        );
    }
    assert_eq!(sim.misbehaved, [id(1)]);
    let key = sim::key(0);
    sim.worker_says(
        id(2),
        ToPrimary::QueryServer {
            seq: 9,
            key,
            backlog: 8,
        },
    );
    assert_eq!(
        sim.misbehaved,
        [id(1), id(2)],
        "worker 2 already holds key 0"
    );
    sim.settle(100);
    assert_eq!(sim.listening_current(), 2, "both replaced and serving");
    sim.stop_and_check();
}

#[test]
fn a_worker_whose_control_queue_is_full_is_killed_and_replaced() {
    let mut sim = serving(2, Policy::RoundRobin);
    sim.hostile(id(1));
    sim.input(Input::SendFailed { id: id(1) });
    assert_eq!(sim.misbehaved, [id(1)]);
    assert!(!sim.procs[&id(1)].alive, "killed");
    sim.settle(100);
    assert_eq!(sim.listening_current(), 2, "replaced; worker 2 untouched");
    assert!(sim.procs[&id(2)].alive);
    sim.stop_and_check();
}

#[test]
fn a_worker_that_answers_no_hand_off_in_time_is_killed_and_its_hand_offs_go_on() {
    let mut sim = serving(2, Policy::RoundRobin);
    sim.connect(0); // to worker 1, which is frozen and never reads it
    assert!(sim.core.timers.contains(&Timer::Handoff(id(1))));
    while sim.deliver(id(2), true) {} // worker 2 answers what it gets
    assert!(!sim.core.timers.contains(&Timer::Handoff(id(2))));
    assert!(sim.fire_timer(), "worker 1's deadline");
    assert_eq!(sim.misbehaved, [id(1)]);
    assert!(
        !sim.procs[&id(1)].alive,
        "killed before its hand-off goes on"
    );
    assert!(
        !sim.procs[&id(2)].inbox.is_empty(),
        "the connection went to worker 2"
    );
    sim.stop_and_check();
}

#[test]
fn a_connection_in_flight_to_a_dying_worker_goes_to_another() {
    let mut sim = serving(2, Policy::RoundRobin);
    sim.connect(0);
    // Worker 1 got it (longest idle) but dies before answering.
    assert!(!sim.procs[&id(1)].inbox.is_empty());
    sim.exit(id(1), signaled(Signal::SIGKILL), Some(true));
    assert!(!sim.procs[&id(2)].inbox.is_empty(), "re-queued to worker 2");
    sim.stop_and_check();
}

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
fn a_worker_is_trusted_only_for_what_it_was_granted() {
    let mut sim = serving(3, Policy::RoundRobin);
    for n in 1..=3 {
        sim.hostile(id(n));
    }
    let address: crate::Endpoint = sim::BOUND.parse().expect("address");
    let lie = |key| ToPrimary::Listening {
        key,
        address: address.clone(),
        exclusive: false,
    };
    sim.worker_says(id(1), lie(sim::key(7)));
    sim.worker_says(id(2), lie(sim::key(0)));
    let exclusive = ToPrimary::Listening {
        key: sim::key(5),
        address,
        exclusive: true,
    };
    sim.worker_says(id(3), exclusive);
    assert_eq!(
        sim.misbehaved,
        [id(1), id(2)],
        "a server never given, a second claim"
    );
    assert_eq!(
        sim.events[&id(3)]
            .iter()
            .filter(|e| **e == "listening")
            .count(),
        2
    );
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

#[test]
fn a_server_whose_last_worker_is_gone_closes_after_the_hold_time_unless_taken_up() {
    let mut sim = serving(1, Policy::RoundRobin);
    // Worker 1 opens a second server (key 1), then dies; its replacement opens only key 0.
    sim.listen(id(1));
    while sim.deliver(id(1), true) {}
    assert_eq!(sim.core.handles.len(), 2);
    sim.exit(id(1), signaled(Signal::SIGKILL), Some(true));
    sim.settle(100); // fires timers once nobody moves: the idle one closes key 1
    assert!(
        sim.core.handles.contains_key(&sim::key(0)),
        "taken up by the replacement"
    );
    assert!(
        !sim.core.handles.contains_key(&sim::key(1)),
        "closed: nobody holds it"
    );
    assert_eq!(sim.core.poll_timeout(), None, "{:?}", sim.core.timers);
    sim.stop_and_check();
}

#[test]
fn a_failed_fork_is_retried_and_a_failed_add_is_reported() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.fail_next_fork = true;
    let add = sim.request(Request::AddWorker { env: Vec::new() });
    assert!(matches!(
        sim.replies.get(&add),
        Some(Outcome::ForkFailed(_))
    ));
    assert_eq!(sim.core.slots.len(), 1, "the slot of a failed add is gone");
    sim.fail_next_fork = true;
    sim.exit(id(1), ExitStatus::Exited(1), Some(true));
    sim.settle(100);
    assert_eq!(sim.listening_current(), 1, "the respawn is retried");
    sim.stop_and_check();
}

#[test]
fn a_fork_that_fails_for_lack_of_resources_is_retried_and_never_counts_as_a_crash() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.fork_failure_transient = true;
    sim.fail_next_fork = true;
    sim.exit(id(1), signaled(Signal::SIGKILL), Some(true)); // one real crash
    // Out of descriptors twenty times in a row, past the crash-loop limit of 4.
    for _ in 0..20 {
        sim.fail_next_fork = true;
        assert!(sim.fire_timer(), "a retry is scheduled");
    }
    assert!(sim.fire_timer(), "the retry that works");
    sim.settle(100);
    assert!(
        sim.slot_failed.is_empty(),
        "no crash loop: {:?}",
        sim.slot_failed
    );
    assert_eq!(sim.listening_current(), 1);
    sim.stop_and_check();
}

#[test]
fn a_listen_that_retrying_cannot_fix_gives_the_slot_up_at_once() {
    let mut sim = Sim::new(config(1, Policy::RoundRobin));
    sim.fail_next_bind = Some(libc::EADDRINUSE);
    sim.settle(100);
    // The worker was refused, then (as an app does) exited non-zero.
    sim.exit(id(1), ExitStatus::Exited(1), Some(true));
    assert_eq!(sim.slot_failed.get(&0), Some(&1));
    assert_eq!(sim.procs.len(), 1, "not restarted");
    sim.stop_and_check();
}

#[test]
fn a_full_round_robin_queue_pauses_accepting_until_a_worker_takes_them() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.fail_next_fork = true;
    sim.exit(id(1), signaled(Signal::SIGKILL), Some(true));
    // No worker: the simulator's bound is 3 waiting connections.
    for _ in 0..3 {
        sim.connect(0);
    }
    assert!(sim.paused.contains(&sim::key(0)), "paused at the bound");
    sim.settle(100); // the respawn comes, listens and takes them
    assert!(sim.paused.is_empty(), "accepting again");
    assert_eq!(sim.core.stats().queued, 0);
    sim.stop_and_check();
}

#[test]
fn held_connections_expire_and_a_stop_closes_the_rest() {
    let mut sim = serving(1, Policy::RoundRobin);
    sim.exit(id(1), ExitStatus::Exited(1), Some(true));
    // The first crash is restarted at once; the replacement never comes online.
    assert!(!sim.core.timers.contains(&Timer::Respawn(0)));
    sim.connect(0);
    sim.connect(0);
    assert_eq!(sim.core.stats().queued, 2);
    sim.stop_and_check();
}

/// A stop, a reload or a removal that reaches workers still starting: each is stopped
/// (it may still report online), never flagged as misbehaving (issue: SIGHUP then SIGTERM
/// 50 ms later, SIGTTIN then SIGTTOU, SIGTERM right after the start).
#[test]
fn a_worker_told_to_stop_before_it_came_online_is_stopped_not_flagged() {
    let commands = [
        vec![Request::Stop],
        vec![Request::Reload, Request::Stop],
        vec![
            Request::AddWorker { env: Vec::new() },
            Request::RemoveWorker,
            Request::Stop,
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
    sim.request(Request::Stop);
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
    assert!(!sim.core.stats().ready, "listening is not enough");
    sim.ready(id(1));
    assert!(sim.core.stats().ready);
    sim.stop_and_check();
}

/// A grant whose listening socket cannot be copied (out of descriptors) is withdrawn by
/// the core: the worker is told the errno and holds no server, and a later listen works.
#[test]
fn a_grant_whose_socket_cannot_be_copied_is_withdrawn_and_the_worker_told() {
    let mut sim = Sim::new(config(1, Policy::Shared));
    sim.fail_next_copy = Some(libc::EMFILE);
    sim.online(id(1));
    sim.listen(id(1));
    let refused = sim.procs[&id(1)].inbox.iter().any(|(m, fd)| {
        matches!(m, ToWorker::QueryReply { result: Err(e), .. } if *e == libc::EMFILE)
            && fd.is_none()
    });
    assert!(refused, "{:?}", sim.procs[&id(1)].inbox);
    assert!(
        sim.core.workers[&id(1)].servers.is_empty(),
        "no stale grant"
    );
    assert!(sim.events[&id(1)].contains(&"other"), "ListenFailed");
    while sim.deliver(id(1), true) {}
    sim.listen(id(1)); // the app tries again, on the next key
    while sim.deliver(id(1), true) {}
    assert_eq!(sim.listening_current(), 1);
    assert!(sim.misbehaved.is_empty());
    sim.stop_and_check();
}

/// A first-generation worker that cannot be forked fails the start: once every fork is
/// answered, the core replies to the start with the driver's error and ends the primary.
#[test]
fn a_failed_first_fork_fails_the_start_with_its_error() {
    let now = std::time::Instant::now();
    let mut core = Core::new(config(2, Policy::RoundRobin), now);
    let start = RequestId(0);
    let forks: Vec<WorkerId> = core
        .start(now, start)
        .iter()
        .filter_map(|e| match e {
            Effect::Fork { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(forks.len(), 2);
    let forked = core.handle(
        now,
        Input::Forked {
            id: forks[0],
            pid: 1001,
        },
    );
    assert!(
        !forked.iter().any(|e| matches!(e, Effect::Reply(..))),
        "the start waits for every fork: {forked:?}"
    );
    let error = std::io::Error::from_raw_os_error(libc::ENOENT);
    let error = child::Error::Ipc(ipc::Error::Io(error));
    let failed = core.handle(
        now,
        Input::ForkFailed {
            id: forks[1],
            error,
        },
    );
    assert!(
        matches!(
            &failed[..],
            [Effect::Reply(r, Outcome::ForkFailed(_)), Effect::Finished] if *r == start
        ),
        "{failed:?}"
    );
}
