//! The model-based property tests of the core: arbitrary interleavings of the world
//! (workers, connections, crashes, commands, timers), checked by the simulator after
//! every step, and a reload under load.

use std::time::Duration;

use child::ExitStatus;
use proptest::prelude::*;

use super::serving_with;
use super::sim::{self, Sim, config};
use crate::primary::core::{Config, Input, Outcome, Request};
use crate::protocol::{ToPrimary, WorkerId};
use crate::settings::Policy;

/// The memory limit of the model's workers, when it has one.
const MEMORY_LIMIT: u64 = 64 << 20;

/// One step of the world.
#[derive(Debug, Clone)]
enum Op {
    Online(u8),
    Listen(u8),
    Ready(u8),
    LateOnline(u8),
    Deliver(u8, bool),
    Connect(u32),
    Crash(u8, Option<bool>, i32),
    ExitAsked(u8),
    CloseChannel(u8),
    GoingDown(u8),
    SelfDisconnect(u8),
    CloseServer(u8, u32),
    Garbage(u8),
    Claim(u8, u32, bool),
    Add,
    Remove,
    Disconnect(u8),
    Kill(u8),
    Reload,
    Stop,
    FireTimer,
    Advance(u64),
    FailNextFork,
    FailNextCopy,
    /// The primary runs out of descriptors for the next hand-offs.
    FailHandoffs(u8),
    /// The worker's memory grows past the limit (`true`) or falls back under it.
    Memory(u8, bool),
}

fn op() -> impl Strategy<Value = Op> {
    let w = || any::<u8>();
    prop_oneof![
        4 => w().prop_map(Op::Online),
        4 => w().prop_map(Op::Listen),
        2 => w().prop_map(Op::Ready),
        1 => w().prop_map(Op::LateOnline),
        12 => (w(), proptest::bool::weighted(0.85)).prop_map(|(w, a)| Op::Deliver(w, a)),
        6 => (0u32..2).prop_map(Op::Connect),
        2 => (w(), proptest::option::of(any::<bool>()), 0i32..3).prop_map(|(w, o, c)| Op::Crash(w, o, c)),
        3 => w().prop_map(Op::ExitAsked),
        1 => w().prop_map(Op::CloseChannel),
        1 => w().prop_map(Op::GoingDown),
        1 => w().prop_map(Op::SelfDisconnect),
        1 => (w(), 0u32..2).prop_map(|(w, k)| Op::CloseServer(w, k)),
        1 => w().prop_map(Op::Garbage),
        1 => (w(), 0u32..8, any::<bool>()).prop_map(|(w, k, x)| Op::Claim(w, k, x)),
        1 => Just(Op::Add),
        1 => Just(Op::Remove),
        1 => w().prop_map(Op::Disconnect),
        1 => w().prop_map(Op::Kill),
        2 => Just(Op::Reload),
        1 => Just(Op::Stop),
        4 => Just(Op::FireTimer),
        2 => (0u64..3000).prop_map(Op::Advance),
        1 => Just(Op::FailNextFork),
        1 => Just(Op::FailNextCopy),
        1 => (1u8..6).prop_map(Op::FailHandoffs),
        2 => (w(), any::<bool>()).prop_map(|(w, high)| Op::Memory(w, high)),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    prop_oneof![
        Just(Policy::RoundRobin),
        Just(Policy::Shared),
        Just(Policy::ReusePort)
    ]
}

fn play(sim: &mut Sim, op: Op) {
    let pick = |sim: &Sim, w: u8| sim.pick(w);
    match op {
        Op::Online(w) => pick(sim, w).into_iter().for_each(|id| sim.online(id)),
        Op::Listen(w) => pick(sim, w).into_iter().for_each(|id| sim.listen(id)),
        Op::Ready(w) => pick(sim, w).into_iter().for_each(|id| sim.ready(id)),
        Op::LateOnline(w) => pick(sim, w)
            .into_iter()
            .for_each(|id| sim.exit_right_after_online(id)),
        Op::Deliver(w, accept) => {
            if let Some(id) = pick(sim, w) {
                sim.deliver(id, accept);
            }
        }
        Op::Connect(index) => sim.connect(index),
        Op::Crash(w, order, code) => {
            if let Some(id) = pick(sim, w) {
                sim.exit(id, ExitStatus::Exited(code), order);
            }
        }
        Op::ExitAsked(w) => {
            if let Some(id) = pick(sim, w).filter(|id| sim.procs[id].asked) {
                sim.exit(id, ExitStatus::Exited(0), Some(true));
            }
        }
        Op::CloseChannel(w) => pick(sim, w)
            .into_iter()
            .for_each(|id| sim.close_channel(id)),
        Op::GoingDown(w) => {
            if let Some(id) = pick(sim, w) {
                let reason = "boom".to_string();
                sim.worker_says(id, ToPrimary::GoingDown { reason });
            }
        }
        Op::SelfDisconnect(w) => {
            if let Some(id) = pick(sim, w) {
                sim.worker_says(id, ToPrimary::Disconnecting);
            }
        }
        Op::CloseServer(w, index) => {
            if let Some(id) = pick(sim, w) {
                sim.close_server(id, index);
            }
        }
        Op::Garbage(w) => {
            if let Some(id) = pick(sim, w).filter(|id| sim.procs[id].channel) {
                sim.procs.get_mut(&id).expect("picked").hostile = true;
                let reason = "undecodable".to_string();
                sim.input(Input::Malformed { id, reason });
            }
        }
        Op::Claim(w, index, exclusive) => {
            if let Some(id) = pick(sim, w) {
                sim.procs.get_mut(&id).expect("picked").hostile = true;
                let key = sim::key(index);
                let address = sim::BOUND.parse().expect("address");
                sim.worker_says(
                    id,
                    ToPrimary::Listening {
                        key,
                        address,
                        exclusive,
                    },
                );
            }
        }
        Op::Add => drop(sim.request(Request::AddWorker { env: Vec::new() })),
        Op::Remove => drop(sim.request(Request::RemoveWorker)),
        Op::Disconnect(w) => {
            let target = pick(sim, w);
            sim.request(Request::Disconnect(target));
        }
        Op::Kill(w) => {
            if let Some(id) = pick(sim, w) {
                sim.request(Request::Kill(id, Sim::kill_signal()));
            }
        }
        Op::Reload => drop(sim.request(Request::Reload)),
        Op::Stop => drop(sim.request(Request::Stop { grace: None })),
        Op::FireTimer => drop(sim.fire_timer()),
        Op::Advance(ms) => sim.now += Duration::from_millis(ms),
        Op::FailNextFork => sim.fail_next_fork = true,
        Op::FailNextCopy => sim.fail_next_copy = Some(libc::EMFILE),
        Op::FailHandoffs(n) => sim.fail_handoffs = usize::from(n),
        Op::Memory(w, high) => {
            if let Some(id) = pick(sim, w) {
                sim.procs.get_mut(&id).expect("picked").rss = match high {
                    true => 2 * MEMORY_LIMIT,
                    false => MEMORY_LIMIT / 2,
                };
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens, in any order: events in Node's order, one exit per fork, no
    /// connection served twice or lost, no timer armed in the past, a slot given up at most once,
    /// and a stop that ends with nothing left; with or without a memory limit (sampled
    /// each second) and a stop delay.
    #[test]
    fn any_interleaving_keeps_the_invariants(
        workers in 1usize..4,
        policy in policy(),
        wait_ready in any::<bool>(),
        memory_limit in any::<bool>(),
        stop_delay in prop_oneof![Just(0u64), Just(2000)],
        warm_spares in 0usize..3,
        ops in proptest::collection::vec(op(), 1..150),
    ) {
        let config = Config {
            wait_ready,
            warm_spares,
            sample_every: memory_limit.then_some(Duration::from_secs(1)),
            max_rss: memory_limit.then_some(MEMORY_LIMIT),
            stop_delay: Duration::from_millis(stop_delay),
            ..config(workers, policy)
        };
        let mut sim = Sim::new(config);
        for op in ops {
            play(&mut sim, op);
        }
        sim.stop_and_check();
    }

    /// A reload under load with cooperative workers: never fewer listening workers than
    /// slots minus one, and at its end every pre-reload worker is gone and the slot count
    /// is what it was.
    #[test]
    fn a_reload_keeps_serving_and_replaces_everyone(
        workers in 1usize..4,
        policy in policy(),
        wait_ready in any::<bool>(),
        steps in proptest::collection::vec((any::<u8>(), proptest::bool::weighted(0.7)), 1..400),
    ) {
        let mut sim = serving_with(workers, policy, wait_ready);
        let before: Vec<WorkerId> = sim.core.workers.keys().copied().collect();
        let reload = sim.request(Request::Reload);
        prop_assert!(sim.core.stats(sim.now).ready);
        for (w, connect) in steps {
            if connect {
                sim.connect(0);
            }
            // One cooperative move of one worker: read a message, come online, listen,
            // or exit when asked. Timers fire only in the final settle, once nobody can
            // move: cooperative workers never meet a deadline.
            let Some(id) = sim.pick(w) else { break };
            let p = &sim.procs[&id];
            if !p.online {
                sim.online(id);
                sim.listen(id);
            } else if wait_ready && !p.ready {
                // A new worker's word that it is ready comes in a later step: the reload
                // must wait for it.
                sim.ready(id);
            } else if p.asked {
                sim.exit(id, ExitStatus::Exited(0), Some(w % 2 == 0));
            } else {
                sim.deliver(id, true);
            }
            prop_assert!(sim.listening_current() + 1 >= workers, "too few listening");
            prop_assert!(sim.core.stats(sim.now).ready, "a reload never makes the cluster unready");
        }
        sim.settle(10_000);
        prop_assert!(
            matches!(sim.replies.get(&reload), Some(Outcome::Reloaded(r)) if r.succeeded() && r.replaced.len() == workers),
            "{:?}", sim.replies.get(&reload)
        );
        for old in &before {
            prop_assert!(sim.exits.contains_key(old), "{} survived the reload", old);
        }
        prop_assert_eq!(sim.core.slots.len(), workers);
        prop_assert_eq!(sim.listening_current(), workers);
        sim.stop_and_check();
    }
}
