//! Servers and connections: grants, binds, hand-offs and their deadline, held
//! connections, paused accepting, idle handles.

use super::*;

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
    assert_eq!(sim.core.stats(sim.now).queued, 0);
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
    assert_eq!(sim.core.stats(sim.now).queued, 2);
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

/// Found by `cargo xtask chaos --seed 7` (node/rr): with the primary out of descriptors,
/// a Node hand-off (whose channel keeps a copy of the connection) could not be sent, the
/// core took it for the worker's refusal, both workers "refused" it and it was closed: a
/// reset. A local failure is nobody's refusal: the connection waits and goes out later.
#[test]
fn a_hand_off_the_primary_cannot_send_waits_and_goes_out_later_instead_of_closing() {
    let mut sim = serving(2, Policy::RoundRobin);
    sim.fail_handoffs = 4;
    sim.connect(0);
    assert_eq!(
        sim.fail_handoffs, 3,
        "one failed attempt, then hand-offs wait"
    );
    assert_eq!(sim.core.stats(sim.now).queued, 1, "still held, not closed");
    assert!(
        sim.core
            .timers
            .contains(&Timer::Dispatch(super::sim::key(0)))
    );
    // Each retry after the pause fails until descriptors are back; then it is served.
    sim.settle(100);
    assert_eq!(sim.fail_handoffs, 0);
    assert_eq!(sim.core.stats(sim.now).queued, 0);
    let served = sim.conns_served().filter(|(_, by)| by.is_some()).count();
    assert_eq!(served, 1, "delivered once, to a worker");
    sim.stop_and_check();
}
