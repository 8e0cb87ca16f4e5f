//! The primary side: [`Primary`], its [`Event`]s and [`Stats`].
//!
//! A `Primary` (`handle.rs`) is a handle on one driver task. The driver (`driver.rs`)
//! owns the worker processes, channels and sockets; every decision is made by the pure
//! state machine in `core.rs`, which it feeds with what happens (time passing included)
//! and whose effects it performs. With the `metrics` feature, `metrics.rs` serves
//! `/metrics`, `/status` and `/readyz`, reading the cluster through a `Link` like the handle.

mod command;
mod control_server;
mod core;
mod driver;
mod events;
mod handle;
mod link;
#[cfg(feature = "metrics")]
mod metrics;
mod restart;
mod sockets;
mod stats;
mod systemd;
mod upgrade;

pub use child::Signal;

pub use self::events::{EVENT_BYTES, EVENT_CAPACITY, Event, Events, OutputStream, SlotFailure};
pub use self::handle::{BROADCAST_WAIT, Primary};
pub use self::stats::{
    ExitCause, ExitCounts, LastExit, ReloadFailure, ReloadProgress, ReloadReport,
    SlotReloadFailure, SlotStats, Stats, Totals, Usage, WorkerState, WorkerStats,
};
pub use self::systemd::take_inherited_sockets;
pub use self::upgrade::UpgradeError;
pub use crate::protocol::MAX_SERVERS_PER_WORKER;
