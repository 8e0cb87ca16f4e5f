//! What goes wrong: workers that break the protocol, forks that fail (at the start,
//! for an added worker, for lack of resources).

use super::*;

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
