//! [`ProcessHandle`]: one child's pidfd, its cached exit status and the kill bookkeeping.
//!
//! Every reap goes through [`ProcessHandle::try_reap`] under the status lock, so any number of
//! waiters (the handle, a timeout task, the orphan reaper) agree on one status. Signals are
//! sent under the same lock: a process group id cannot be reused while we signal it, because
//! its leader cannot be reaped at that moment.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::status::ExitStatus;
use crate::sys::{self, WaitHow};

/// Which processes a signal goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// The child alone, through its pidfd.
    Process,
    /// The child's process group (the child must lead one: `detached`).
    Group,
}

/// A started, not necessarily reaped, child.
#[derive(Debug)]
pub(crate) struct ProcessHandle {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    status: Mutex<Option<ExitStatus>>,
    killed: AtomicBool,
}

impl ProcessHandle {
    pub(crate) fn new(pid: u32, pidfd: OwnedFd) -> Self {
        Self {
            pid,
            pidfd: Arc::new(pidfd),
            status: Mutex::new(None),
            killed: AtomicBool::new(false),
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    /// The pidfd itself, shared, for a reactor registration that must keep it open.
    pub(crate) fn shared_pidfd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.pidfd)
    }

    fn lock(&self) -> MutexGuard<'_, Option<ExitStatus>> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The status if the child was already reaped (no syscall).
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        *self.lock()
    }

    /// Reaps the child if it has exited.
    pub(crate) fn try_reap(&self) -> io::Result<Option<ExitStatus>> {
        let mut status = self.lock();
        if status.is_none() {
            *status = sys::pidfd_wait(self.pidfd.as_fd(), WaitHow::TryReap)?;
        }
        Ok(*status)
    }

    /// Blocks the thread until the child exits, then reaps it.
    pub(crate) fn wait_blocking(&self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.try_reap()? {
                return Ok(status);
            }
            sys::pidfd_wait(self.pidfd.as_fd(), WaitHow::BlockNoReap)?;
        }
    }

    /// Sends `signal`; `Ok(false)` if the child had already exited. Marks it killed on success.
    ///
    /// For [`Target::Group`], `ESRCH` is returned as an error: the child is not reaped (we
    /// hold the status lock), so it exists and the group does not.
    pub(crate) fn kill(&self, signal: i32, target: Target) -> io::Result<bool> {
        let status = self.lock();
        if status.is_some() {
            return Ok(false);
        }
        let sent = match target {
            Target::Process => sys::pidfd_send_signal(self.pidfd.as_fd(), signal),
            Target::Group => sys::kill_group(self.pid as libc::pid_t, signal),
        };
        drop(status);
        match sent {
            Ok(()) => {
                self.killed.store(true, Ordering::Release);
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) && target == Target::Process => {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether a signal sent through [`ProcessHandle::kill`] was delivered.
    pub(crate) fn killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Signal;

    fn start(program: &str, args: &[&str]) -> ProcessHandle {
        let mut options = crate::SpawnOptions::new()
            .stdin(crate::Stdio::Null)
            .stdout(crate::Stdio::Null)
            .stderr(crate::Stdio::Null);
        let args: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        let launched = crate::launch::launch(program.as_ref(), &args, &mut options).unwrap();
        ProcessHandle::new(launched.pid, launched.pidfd)
    }

    #[test]
    fn reaps_exactly_once_and_caches_the_status() {
        let process = start("/bin/sh", &["-c", "exit 7"]);
        assert_eq!(process.wait_blocking().unwrap(), ExitStatus::Exited(7));
        assert_eq!(process.try_reap().unwrap(), Some(ExitStatus::Exited(7)));
        assert!(
            !process.kill(libc::SIGTERM, Target::Process).unwrap(),
            "no signal after reaping"
        );
        assert!(!process.killed());
    }

    #[test]
    fn kill_marks_killed_and_status_shows_the_signal() {
        let process = start("/bin/sleep", &["100"]);
        assert!(
            process
                .kill(Signal::SIGKILL as i32, Target::Process)
                .unwrap()
        );
        assert!(process.killed());
        assert_eq!(
            process.wait_blocking().unwrap().signal(),
            Some(Signal::SIGKILL)
        );
    }
}
