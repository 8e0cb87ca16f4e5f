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
//!  its exit, end of stream or timeout:
//!    kills its process group, keeps serving
//!  a stop of this primary before it is ready:
//!    SIGTERM, then kills its process group
//! ```
//!
//! `LISTEN_PID` must be the new process's pid, which posix_spawn cannot know before the
//! process exists: the new primary is started through `/bin/sh -c`, which sets
//! `LISTEN_PID=$$` (and `WATCHDOG_PID=$$` under a watchdog) and `exec`s the program, so
//! the pid is the program's.
//!
//! # What is watched, and what is killed
//!
//! The new primary is watched through its pidfd as well as the readiness socket: a
//! program that exits at once fails the upgrade at once, even when a child it left behind
//! holds the socket open. It runs in a session and process group of its own (so it is no
//! longer in a terminal's foreground group, and job-control signals such as `SIGTTOU`,
//! which a primary takes as commands, never reach it from there); it inherits stdin,
//! stdout, stderr, the listening sockets and the readiness socket and nothing else. A
//! failed or abandoned upgrade kills that whole group, before its leader is reaped, so
//! that nothing the new program started (a background process of a script, say) keeps a
//! listening socket. Its workers run in process groups of their own and die with it (their
//! parent-death signal).

use std::ffi::OsString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use child::{Child, Signal, SpawnOptions, Stdio};
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
    /// This primary has stopped, or began to stop before the new one was ready (which was
    /// stopped too).
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
    /// How long a new primary told to stop (this one stops before it is ready) may take
    /// before its process group is killed.
    pub(crate) stop_timeout: Duration,
}

impl UpgradeTarget {
    /// Starts the new primary with `sockets` and waits until it is ready; returns its pid.
    /// If `stop` resolves first, the new primary is sent `SIGTERM` (it stops as gracefully
    /// as this one) and, after at most `stop_timeout`, its process group `SIGKILL`.
    ///
    /// # Cancellation
    ///
    /// Dropping the future before it resolves kills the new primary's process group.
    pub(crate) async fn run(
        &self,
        sockets: Vec<(OwnedFd, String)>,
        stop: impl Future<Output = ()>,
    ) -> Result<u32, UpgradeError> {
        let (ours, theirs) = UnixStream::pair().map_err(UpgradeError::Sockets)?;
        let count = sockets.len();
        // systemd's names never hold ':'; keep it so for names of our own.
        let names: Vec<String> = sockets.iter().map(|(_, n)| n.replace(':', "_")).collect();
        let mut options = SpawnOptions::new()
            .detached(true)
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
        let mut new = NewPrimary(Some(new));
        let pid = new.child().pid();
        tracing::info!(pid, program = ?self.program, "upgrade: new primary started");
        let ended = tokio::select! {
            // A stop wins over a readiness that came at the same time (both then stop), and
            // a primary that wrote READY=1 and then exited was ready.
            biased;
            () = stop => {
                tracing::info!(pid, "upgrade abandoned: stopping the new primary");
                if let Err(e) = new.child().kill(Signal::SIGTERM) {
                    tracing::warn!(pid, error = %e, "could not stop the new primary");
                }
                let stopped = tokio::time::timeout(self.stop_timeout, exited(new.child())).await;
                if stopped.is_err() {
                    let timeout = self.stop_timeout;
                    tracing::warn!(pid, ?timeout, "the new primary did not stop in time; killing it");
                }
                Ended::Failed(UpgradeError::Stopped)
            }
            ready = wait_ready(ours) => match ready {
                Ok(()) => Ended::Ready,
                Err(why) => Ended::Failed(UpgradeError::Exited(why)),
            },
            result = exited(new.child()) => match result {
                Ok(()) => Ended::Exited,
                Err(e) => Ended::Failed(UpgradeError::Exited(format!("watching it: {e}"))),
            },
            () = tokio::time::sleep(self.timeout) => Ended::Failed(UpgradeError::TimedOut(self.timeout)),
        };
        match ended {
            Ended::Ready => {
                // Not killed: it runs on as the service; the reaper reaps it if it ends
                // while this primary still runs.
                new.0.take();
                Ok(pid)
            }
            Ended::Exited => {
                let status = new.end().await;
                let why = status.map_or("it exited".into(), |s| format!("it exited: {s}"));
                Err(UpgradeError::Exited(why))
            }
            Ended::Failed(failure) => {
                new.end().await;
                Err(failure)
            }
        }
    }
}

/// How the wait for a new primary ended.
#[derive(Debug)]
enum Ended {
    Ready,
    /// Its process exited (not reaped yet).
    Exited,
    Failed(UpgradeError),
}

/// The new primary until it is ready. Ended with [`NewPrimary::end`], or dropped (the
/// future cancelled), its process group is killed.
#[derive(Debug)]
struct NewPrimary(Option<Child>);

impl NewPrimary {
    fn child(&self) -> &Child {
        self.0.as_ref().expect("taken only when the upgrade ends")
    }

    /// Kills its process group (still led by the unreaped process, so the group id cannot
    /// have been reused) and reaps it.
    async fn end(&mut self) -> Option<child::ExitStatus> {
        let new = self.0.take()?;
        let pid = new.pid();
        kill_group(&new);
        match new.wait().await {
            Ok(status) => {
                tracing::info!(pid, %status, "upgrade: the new primary is gone");
                Some(status)
            }
            Err(e) => {
                tracing::warn!(pid, error = %e, "could not reap the new primary");
                None
            }
        }
    }
}

impl Drop for NewPrimary {
    fn drop(&mut self) {
        // Reaped in the background by the child crate's reaper.
        if let Some(new) = &self.0 {
            kill_group(new);
        }
    }
}

/// `SIGKILL` to the process group `new` leads.
fn kill_group(new: &Child) {
    if let Err(e) = new.kill_group(Signal::SIGKILL) {
        tracing::warn!(pid = new.pid(), error = %e, "could not kill the new primary's process group");
    }
}

/// Resolves when `new` has exited, without reaping it (its pidfd turns readable).
async fn exited(new: &Child) -> std::io::Result<()> {
    let pidfd = crate::sys::readable_pidfd(new.pidfd())?;
    let _exited = pidfd.readable().await?;
    Ok(())
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
