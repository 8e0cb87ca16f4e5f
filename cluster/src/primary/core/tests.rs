//! Tests of the primary's core: examples by topic (`tests/lifecycle.rs`,
//! `tests/failures.rs`, `tests/serving.rs`, `tests/reload.rs`) and a model-based property
//! test over arbitrary interleavings (`tests/model.rs`; the simulator in `tests/sim.rs`
//! checks the invariants after every step).

mod failures;
mod lifecycle;
mod model;
mod reload;
mod serving;
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
