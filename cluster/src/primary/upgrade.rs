//! Upgrading the primary itself, nginx's binary upgrade: a new primary from the
//! executable on disk inherits the listening sockets and starts its own workers; this one
//! learns when it is ready and can then stop.
//!
//! ```text
//!  old primary                                   new primary (the program on disk)
//!  copies of every listening socket ──fd 3..──>  adopts them (LISTEN_FDS, systemd.rs)
//!  a socketpair ────────fd 3+N (UPGRADE_FD)──>   forks its workers, which listen
//!  reads "READY=1" <──────────────────────────   once ready: writes "READY=1"
//!  MAINPID=new (sd_notify), then its stop
//!  end of stream or timeout: kills it, keeps serving
//! ```
//!
//! `LISTEN_PID` must be the new process's pid, which posix_spawn cannot know before the
//! process exists: the new primary is started through `/bin/sh -c`, which sets
//! `LISTEN_PID=$$` (and `WATCHDOG_PID=$$` under a watchdog) and `exec`s the program, so
//! the pid is the program's.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use child::{Signal, SpawnOptions, Stdio};
use tokio::io::AsyncReadExt;

use super::systemd::{UPGRADE_FD_ENV, UPGRADE_READY};

/// Sets the pid variables to the shell's own pid, which `exec` keeps for the program.
const WRAPPER: &str = r#"LISTEN_PID=$$; export LISTEN_PID
if [ -n "${WATCHDOG_USEC:-}" ]; then WATCHDOG_PID=$$; export WATCHDOG_PID; fi
exec "$0" "$@""#;

/// Why [`Primary::upgrade`](crate::Primary::upgrade) kept this primary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpgradeError {
    /// The listening sockets could not be copied.
    #[error("copying the listening sockets")]
    Sockets(#[source] std::io::Error),
    /// The new primary could not be started.
    #[error("starting the new primary")]
    Spawn(#[source] child::Error),
    /// It ended, or closed its readiness socket, before it was ready.
    #[error("the new primary ended before it was ready ({0})")]
    Exited(String),
    /// It was not ready in time (it was killed).
    #[error("the new primary was not ready within {0:?}")]
    TimedOut(Duration),
    /// This primary has stopped.
    #[error("the primary has stopped")]
    Stopped,
    /// An upgrade is already in progress.
    #[error("an upgrade is already in progress")]
    InProgress,
}

/// What an upgrade starts: this process's program and arguments, resolved at start.
#[derive(Debug, Clone)]
pub(crate) struct UpgradeTarget {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) timeout: Duration,
}

impl UpgradeTarget {
    /// Starts the new primary with `sockets` and waits until it is ready; returns its pid.
    pub(crate) async fn run(&self, sockets: Vec<(OwnedFd, String)>) -> Result<u32, UpgradeError> {
        let (ours, theirs) = UnixStream::pair().map_err(UpgradeError::Sockets)?;
        let count = sockets.len();
        // systemd's names never hold ':'; keep it so for names of our own.
        let names: Vec<String> = sockets.iter().map(|(_, n)| n.replace(':', "_")).collect();
        let mut options = SpawnOptions::new()
            .stdin(Stdio::Inherit)
            .stdout(Stdio::Inherit)
            .stderr(Stdio::Inherit)
            .env("LISTEN_FDS", count.to_string())
            .env("LISTEN_FDNAMES", names.join(":"))
            .env_remove("LISTEN_PID")
            .env_remove("WATCHDOG_PID")
            .env(UPGRADE_FD_ENV, (3 + count).to_string());
        for (index, (fd, _)) in sockets.into_iter().enumerate() {
            options = options.stdio(3 + index, Stdio::Fd(fd));
        }
        options = options.stdio(3 + count, Stdio::Fd(theirs.into()));
        let mut args: Vec<OsString> = vec!["-c".into(), WRAPPER.into(), self.program.clone()];
        args.extend(self.args.iter().cloned());
        let new = child::spawn("/bin/sh", args, options).map_err(UpgradeError::Spawn)?;
        let pid = new.pid();
        tracing::info!(pid, program = ?self.program, "upgrade: new primary started");
        let waited = tokio::time::timeout(self.timeout, wait_ready(ours)).await;
        let failure = match waited {
            // Dropped without a kill: it runs on as the service; the reaper reaps it if
            // it ends while this primary still runs.
            Ok(Ok(())) => return Ok(pid),
            Ok(Err(why)) => UpgradeError::Exited(why),
            Err(_) => UpgradeError::TimedOut(self.timeout),
        };
        // Its workers die with it (their parent-death signal).
        if let Err(e) = new.kill(Signal::SIGKILL) {
            tracing::warn!(pid, error = %e, "could not kill the new primary");
        }
        match new.wait().await {
            Ok(status) => tracing::info!(pid, %status, "upgrade: the new primary is gone"),
            Err(e) => tracing::warn!(pid, error = %e, "could not reap the new primary"),
        }
        Err(failure)
    }
}

/// Reads the readiness socket until `READY=1`; `Err` with why at its end.
async fn wait_ready(stream: UnixStream) -> Result<(), String> {
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0; 64];
    loop {
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("its readiness socket closed".into());
        }
        seen.extend_from_slice(&buf[..n]);
        if seen.starts_with(UPGRADE_READY) {
            return Ok(());
        }
        if seen.len() >= UPGRADE_READY.len() {
            return Err(format!("it wrote {:?}", String::from_utf8_lossy(&seen)));
        }
    }
}
