//! Support shared by the workspace's tests, benches and `cargo xtask`: the one process
//! guard, `/proc` reading, a log to wait on, a median, and the JSON lines the benches
//! hand to xtask.
//!
//! This is not a layer of the library: it depends on no workspace member, and the library
//! crates use it only as a dev-dependency (xtask normally).
//!
//! - [`KillOnDrop`]: every process a test or bench starts is killed and reaped on every
//!   path; processes that are not our children can be adopted and are killed.
//! - [`ProcStat`], [`is_running`], [`children_of`]: what `/proc/PID/stat` says.
//! - [`LineLog`]: lines of a child's output as they arrive; wait for one without sleeping.
//! - [`median`]: of benchmark rounds.
//! - [`TempDir`]: a fresh directory, removed on every path.
//! - [`free_port`]: a loopback port for a server on a fixed port, which no concurrent
//!   connection can take meanwhile.
//! - [`BenchLine`] and [`BenchArgs`]: a bench's `--json` output, written with serde_json
//!   by the benches and read back by `cargo xtask bench`.
//! - [`node_available`], [`node_timing`]: Node 20 as a peer.
//! - [`WorkerInfo`]: which `httpd-demo` worker answered.
//! - [`KeepAliveLoad`]: a bounded keep-alive HTTP/1.1 client load that records every
//!   request's outcome, and [`http_get`] for readiness checks.
//!
//! ```
//! use std::process::{Command, Stdio};
//! use std::time::Duration;
//!
//! use testkit::{KillOnDrop, LineLog, ProcStat, median};
//!
//! let mut command = Command::new("/bin/sh");
//! command.args(["-c", "echo ready; exec sleep 30"]).stdout(Stdio::piped());
//! let mut guard = KillOnDrop::spawn(&mut command)?;
//! let log = LineLog::of(guard.child_mut().stdout.take().expect("piped"));
//! log.wait_for(0, "ready", Duration::from_secs(10))?;
//! let pid = guard.pid();
//! assert!(ProcStat::read(pid).is_some_and(|s| s.is_running()));
//! drop(guard); // SIGKILL, then reaped: not even a zombie is left
//! assert_eq!(ProcStat::read(pid), None);
//!
//! assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod bench_line;
mod guard;
mod load;
mod log;
mod node;
mod port;
mod proc_stat;
mod stats;
mod temp_dir;
mod worker_info;

pub use bench_line::{BenchArgs, BenchLine, Benchmark, Subject, Unit};
pub use guard::{KillOnDrop, kill_all_groups};
pub use load::{
    KeepAliveLoad, LoadConfig, Outcome, Sample, assert_none_failed, http_exchange, http_get,
};
pub use log::{Line, LineLog, LogError, assert_listen_fds_log};
pub use node::{NODE_INSTALL_HINT, NodeError, node_available, node_timing};
pub use port::free_port;
pub use proc_stat::{ProcStat, children_of, is_running};
pub use stats::median;
pub use temp_dir::TempDir;
pub use worker_info::WorkerInfo;
