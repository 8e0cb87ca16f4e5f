//! Node-style cluster: a primary process that starts workers, hands them connections,
//! replaces the ones that die and reloads them one by one, so that nobody needs PM2.
//!
//! # Layer
//!
//! The top library of the workspace: it builds on `child` (which starts a worker with an
//! IPC channel, Node's `fork`, never `fork(2)`) and `ipc` (whose control lane carries the
//! [`protocol`]). It knows TCP listeners and processes, nothing about HTTP.
//!
//! # Roles
//!
//! One program plays both parts. [`role`] tells which: a process started by a [`Primary`]
//! finds its id in [`WORKER_ID_ENV`] (Node's `NODE_UNIQUE_ID`) and its channel through the
//! `child` crate; any other process is a primary.
//!
//! - The primary: [`Primary::start`] with [`Settings`], then [`Primary::run_until_signal`]
//!   (`SIGTERM`/`SIGINT` stop gracefully, `SIGHUP` reloads, `SIGTTIN`/`SIGTTOU` add or
//!   remove a worker), or drive it yourself: [`Primary::next_event`], [`Primary::send`],
//!   [`Primary::disconnect`], [`Primary::reload`], [`Primary::stop`], [`Primary::stats`].
//! - A worker: [`Worker::connect`], then [`Worker::listen`] and [`Listener::accept`],
//!   whatever the [`Policy`]; [`Worker::stopping`] says when to drain.
//!
//! # Invariants
//!
//! - A round-robin connection is delivered to exactly one worker, or closed: a hand-off
//!   refused, or in flight to a worker that dies or stops first, goes to another worker
//!   (see [`scheduler`]); with no worker alive, connections are held for
//!   [`Settings::hold_connections`].
//! - A worker has at most one round-robin hand-off in flight.
//! - Worker ids are never reused; a replacement gets a new id.
//! - Nothing a worker sends can crash the primary: a malformed or unexpected control
//!   frame gets the worker killed and replaced.
//! - Every worker dies with its primary: channel end-of-stream makes it exit, and a
//!   parent-death signal (`SIGKILL`) covers a primary killed outright.
//!
//! # Example
//!
//! A complete cluster: this program runs as the primary, starts two copies of itself as
//! workers, and each worker answers connections on a port they share.
//!
//! ```
//! use std::net::SocketAddr;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     if cluster::is_worker() {
//!         let worker = cluster::Worker::connect().await?;
//!         let mut listener = worker.listen("127.0.0.1:0".parse()?).await?;
//!         while let Some(mut stream) = listener.accept().await? {
//!             stream.write_all(format!("hello from {}\n", worker.id()).as_bytes()).await?;
//!         }
//!         return Ok(()); // stopping: the primary asked us to drain
//!     }
//!     let settings = cluster::Settings::new().workers(2);
//!     let mut primary = cluster::Primary::start(settings).await?;
//!     let mut address: Option<SocketAddr> = None;
//!     let mut listening = 0;
//!     while listening < 2 {
//!         if let Some(cluster::Event::Listening { address: a, .. }) = primary.next_event().await {
//!             (address, listening) = (Some(a), listening + 1);
//!         }
//!     }
//!     let mut stream = tokio::net::TcpStream::connect(address.expect("listening")).await?;
//!     let mut reply = String::new();
//!     stream.read_to_string(&mut reply).await?;
//!     assert!(reply.starts_with("hello from "));
//!     primary.stop().await?; // graceful: every worker drains and exits
//!     Ok(())
//! }
//! ```
//!
//! # Caveats
//!
//! - Workers inherit the primary's stdio but run in their own session and process group,
//!   so a terminal's Ctrl-C (or a signal sent to the primary's group) reaches only the
//!   primary, which stops them gracefully; to signal a worker, use [`Primary::kill`] or
//!   its pid. They still die with the primary through the parent-death signal.
//! - The parent-death signal follows Linux `PR_SET_PDEATHSIG` semantics: it fires when
//!   the *thread* that started the worker exits. Start and run the [`Primary`] on a
//!   runtime whose threads live as long as the workers (any tokio runtime's worker
//!   threads do; `spawn_blocking` threads do not).
//! - Under [`Policy::ReusePort`], removing a slot closes its socket: connections still in
//!   that socket's backlog are reset.
//! - The panic hook fires for every panic of a worker process, including ones that a
//!   `catch_unwind` or a tokio task would have contained.
//! - Events go through a bounded queue ([`EVENT_CAPACITY`]); if nobody reads them, later
//!   ones are dropped (with a log line), never blocking the primary.
//!
//! # Platform
//!
//! Linux.

mod env;
mod error;
mod net;
mod primary;
mod protocol;
mod scheduler;
mod settings;
mod worker;

pub use child::ExitStatus;
pub use env::{WORKER_ID_ENV, WORKER_SLOT_ENV};
pub use error::{Error, ListenError};
pub use ipc::Received;
pub use primary::{
    EVENT_CAPACITY, Event, Events, MAX_SERVERS_PER_WORKER, OutputStream, Primary, Signal, Stats,
    WorkerState, WorkerStats,
};
pub use protocol::{AddressFamily, HandleKey, WorkerId};
pub use settings::{Policy, RestartPolicy, SCHED_POLICY_ENV, Settings, UnknownPolicy};
pub use worker::{
    DEFAULT_BACKLOG, ListenOptions, Listener, StopReason, USER_QUEUE_CAPACITY, Worker,
};

/// Which part this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started by a primary.
    Primary,
    /// Started by a primary, with this id.
    Worker(WorkerId),
}

/// This process's role, from [`WORKER_ID_ENV`]. A value that is not a positive number
/// counts as absent (the process is a primary).
pub fn role() -> Role {
    env::worker_id().map_or(Role::Primary, Role::Worker)
}

/// Whether this process is a primary (Node's `cluster.isPrimary`).
pub fn is_primary() -> bool {
    role() == Role::Primary
}

/// Whether this process is a worker (Node's `cluster.isWorker`).
pub fn is_worker() -> bool {
    !is_primary()
}
