//! Node-style cluster: a primary process that starts workers, hands them connections,
//! replaces the ones that die and reloads them one by one, so that nobody needs PM2.
//!
//! # Layer
//!
//! The top library of the workspace: it builds on `child` (which starts a worker with an
//! IPC channel, Node's `fork`, never `fork(2)`) and `ipc` (whose control lane carries the
//! cluster's own protocol: online, queryServer and its reply, listening, newconn and
//! accepted, close, disconnect). It knows TCP listeners and processes, nothing about HTTP.
//!
//! Inside, the primary is a pure state machine (no I/O, no clock: events in, effects out,
//! model-checked with proptest) and a thin async driver that performs the effects; see
//! `ARCHITECTURE.md`.
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
//!   A primary that may be socket-activated (systemd's `LISTEN_FDS`) or upgraded
//!   (`SIGUSR2`) calls [`take_inherited_sockets`] first thing in `main`, before it creates
//!   a runtime.
//! - A worker: [`Worker::connect`], then [`Worker::listen`] and [`Listener::accept`],
//!   whatever the [`Policy`]; [`Worker::stopping`] says when to drain.
//!
//! # Operating a running primary
//!
//! [`Settings::control_socket`] makes a primary answer `status`, `reload`, `scale` and
//! `stop` on a Unix socket (the protocol and a [`control::Client`] are in [`control`]);
//! the `cluster` command creates one by default and its subcommands (`cluster status`)
//! talk to it. [`Primary::stats`] is the same status in process: workers with their
//! state, uptime, memory and CPU, slots with their restarts and last exit's
//! [`ExitCause`], the reload in progress and how the last one ended, and monotonic
//! [`Totals`]. [`Settings::max_worker_rss`] replaces a worker that stays above a memory
//! limit, gracefully; [`Settings::stop_delay`] keeps serving, not ready, for a while
//! after a stop is asked.
//!
//! # Invariants
//!
//! - A round-robin connection is delivered to exactly one worker, or closed: a hand-off
//!   refused, or in flight to a worker that dies or stops first, goes to another worker
//!   (Node's `RoundRobinHandle` with the holes closed); with no worker alive, connections
//!   are held for [`Settings::hold_connections`].
//! - A worker has at most a small window (8) of round-robin hand-offs in flight per
//!   server (Node: one); workers that keep up take turns, and one that stalls (half
//!   its window or more in flight beyond the least busy) is passed over.
//! - Every forked worker produces exactly one [`Event::Exit`], after its
//!   [`Event::Disconnect`]; a worker's events come in Node's order: fork, online,
//!   listening, disconnect, exit. The one exception is an application that does not read
//!   its events: when the bounded event queue is full, later events (an `Exit` too) are
//!   dropped and logged (see *Bounds*).
//! - Worker ids are never reused; a replacement gets a new id.
//! - Nothing a worker sends can crash the primary: a malformed or unexpected control
//!   frame gets the worker killed and replaced.
//! - Every worker dies with its primary: channel end-of-stream makes [`Worker::stopping`]
//!   resolve ([`StopReason::PrimaryGone`]), and a parent-death signal (`SIGKILL`) covers a
//!   primary killed outright.
//!
//! # Bounds
//!
//! Every queue is bounded, with a policy for when it is full:
//!
//! - the primary's control queue to each worker holds what the protocol allows (a reply
//!   and a hand-off per server, a disconnect); a worker that lets it fill, asks twice for
//!   the same server or for more than [`MAX_SERVERS_PER_WORKER`] is misbehaving: killed
//!   and replaced ([`Event::Misbehaved`]), the others unaffected; so is a Node worker that
//!   sends handles without reading the answers it is owed (`ipc::Error::PeerNotReading`,
//!   a broken channel);
//! - [`Primary::send`] waits while the worker's socket is full (back-pressure); a worker
//!   keeps at most [`USER_QUEUE_CAPACITY`] unread user messages and [`USER_QUEUE_BYTES`]
//!   of them, and drops the oldest;
//! - events wait in a queue of [`EVENT_CAPACITY`] events and [`EVENT_BYTES`] of message
//!   and output bytes; when nobody reads it, later events are dropped with a log line
//!   (kind and size), never blocking the primary;
//! - a worker's hand-offs waiting for `accept` are bounded; past it they are refused and go
//!   to another worker; a worker that answers none of its hand-offs within
//!   [`Settings::handoff_timeout`] (10 s) counts as hung: it is killed and replaced, and its
//!   hand-offs go to other workers, so no client waits on a frozen process;
//! - round-robin connections waiting in the primary for a worker (while none can take
//!   them, say between a crash and its replacement) are bounded per handle (1024): at the
//!   bound the primary stops accepting on it, and the kernel's listen backlog holds the
//!   rest until a worker takes them.
//!
//! # Observing a running primary
//!
//! With [`Settings::metrics`] (the `metrics` feature), the primary serves over HTTP/1, on
//! an address of its own: `/metrics` for Prometheus (the OpenMetrics text format, from
//! [`Stats`] snapshots: workers by state, starts and exits by [`ExitCause`], reloads,
//! hand-offs, per-slot memory and CPU), `/status` (a self-contained HTML page with a
//! chart of the last minutes), `/readyz` ([`Stats::ready`]: 200 or 503, a balancer's
//! health check, which [`Settings::stop_delay`] gives time to act) and `/healthz`. The
//! endpoint reads the cluster as [`Primary::stats`] does and never blocks the primary;
//! it ends with it.
//!
//! # Logging
//!
//! Through `tracing`, target `cluster::*`: `info` for workers restarted and reloads
//! (`restarting a worker`, `reload: replacing a worker`), `warn` for a worker that broke the
//! protocol, went down (panicked), overran its drain deadline, dropped events or
//! connections no worker took in time, `error` for failed forks, crash loops (`the slot
//! is given up`) and failed reloads, `debug` for each fork, exit and refused listen.
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
//!             (address, listening) = (a.inet(), listening + 1);
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
//! - Workers inherit the primary's stdio and session but run in a process group of their
//!   own, so a terminal's Ctrl-C (or a signal sent to the primary's group) reaches only
//!   the primary, which stops them gracefully; to signal a worker, use [`Primary::kill`]
//!   or its pid. They still die with the primary through the parent-death signal. (In the
//!   primary's session, they share its CPU share under Linux's autogroup.)
//! - The parent-death signal follows Linux `PR_SET_PDEATHSIG` semantics: it fires when
//!   the *thread* that started the worker exits. Start and run the [`Primary`] on a
//!   runtime whose threads live as long as the workers (any tokio runtime's worker
//!   threads do; `spawn_blocking` threads do not).
//! - Under [`Policy::ReusePort`], removing a slot (`SIGTTOU`, [`Primary::remove_worker`])
//!   closes its socket: connections still in that socket's accept queue are reset unless
//!   the kernel migrates them to the group's other sockets (`net.ipv4.tcp_migrate_req=1`,
//!   Linux 5.14+; measured here under keep-alive load: 2 to 6 failed requests per SIGTTOU
//!   without it, 0 with it). The primary logs a warning at start when it is not set. A
//!   reload keeps each slot's socket, so it resets nothing; under rr and shared, removing
//!   a worker resets nothing either. A primary refuses (`EADDRINUSE`) a fixed port that
//!   another program's reuseport group holds, rather than joining it; the check and the
//!   bind are two steps, so a program binding exactly in between still joins.
//! - The panic hook fires for every panic of a worker process, including ones that a
//!   `catch_unwind` or a tokio task would have contained.
//! - [`Primary::kill`] is Node's `worker.kill()`: the worker is disconnected first and is
//!   not replaced. A worker killed from outside (by its pid) crashed and is replaced.
//!
//! - Known limits: a worker whose *main* task panics may exit before its going-down
//!   notice is written (the exit is then reported as a crash, which it is); a worker that
//!   starts a frame on its channel and never finishes it is not timed out (its hand-offs
//!   wait; a drain deadline or its exit ends it); a SIGTTIN whose fork fails for lack of
//!   descriptors is reported (`SIGTTIN: could not add a worker`) and not retried, while a
//!   replacement's failed fork is; [`Error::Fork`] carries the cause as its `source`.
//!
//! # Features
//!
//! - `metrics` (default): the metrics endpoint ([`Settings::metrics`]) and its
//!   dependencies (hyper, hyper-util, http-body-util, prometheus-client).
//! - `cli` (default): the `cluster` command (`src/bin/cluster/`) and its dependencies
//!   (clap, anyhow, tracing-subscriber, shlex); it turns `metrics` on. The library needs
//!   none of them: depend on it with `default-features = false` (and `features =
//!   ["metrics"]` for the endpoint).
//!
//! # Platform
//!
//! Linux.

#![warn(missing_docs)]

pub mod control;
mod endpoint;
mod env;
mod error;
mod net;
mod node_drain;
mod node_protocol;
mod primary;
mod protocol;
mod scheduler;
mod settings;
mod sys;
mod worker;

pub use child::ExitStatus;
pub use endpoint::Endpoint;
pub use env::{Role, WORKER_ID_ENV, WORKER_SLOT_ENV, is_primary, is_worker, role};
pub use error::{Error, ListenError};
pub use ipc::Received;
pub use primary::{
    BROADCAST_WAIT, EVENT_BYTES, EVENT_CAPACITY, Event, Events, ExitCause, ExitCounts, LastExit,
    MAX_SERVERS_PER_WORKER, OutputStream, Primary, ReloadFailure, ReloadProgress, ReloadReport,
    Signal, SlotFailure, SlotReloadFailure, SlotStats, Stats, Totals, UpgradeError, Usage,
    WorkerState, WorkerStats, take_inherited_sockets,
};
pub use protocol::{AddressFamily, HandleKey, WorkerId};
pub use settings::{
    Policy, RestartPolicy, SCHED_POLICY_ENV, Settings, UnknownPolicy, executable_path,
};
pub use worker::{
    DEFAULT_BACKLOG, ListenOptions, Listener, StopReason, USER_QUEUE_BYTES, USER_QUEUE_CAPACITY,
    Worker,
};
