//! Errors of spawning and of handling a running child.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// An error from [`spawn`](crate::spawn) or a [`Child`](crate::Child) method.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The process could not be started; no pid exists and nothing is left behind.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// An async child needs a tokio runtime with IO enabled (the `*_sync` functions do not).
    /// Checked before anything is started.
    #[error("no tokio runtime with io enabled is running")]
    NoRuntime,
    /// Waiting for the child failed.
    #[error("failed to wait for process {pid}")]
    Wait {
        /// The child's pid.
        pid: u32,
        /// The `waitid` or readiness error.
        #[source]
        source: io::Error,
    },
    /// Signalling the child failed for another reason than it having exited.
    #[error("failed to signal process {pid}")]
    Kill {
        /// The child's pid.
        pid: u32,
        /// The `pidfd_send_signal` or `kill` error.
        #[source]
        source: io::Error,
    },
    /// [`Child::kill_group`](crate::Child::kill_group) found no process group led by the
    /// child (it was not started `detached`); nothing was signalled. The child has not
    /// exited: an exited child gives `Ok(false)`.
    #[error("process {pid} does not lead a process group")]
    NotGroupLeader {
        /// The child's pid.
        pid: u32,
    },
    /// The child has no IPC channel (it was not spawned with [`Stdio::Ipc`](crate::Stdio::Ipc)).
    #[error("the child has no ipc channel")]
    NoChannel,
    /// The IPC channel failed.
    #[error("ipc channel failed")]
    Ipc(#[from] ipc::Error),
}

/// Why a process could not be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SpawnErrorKind {
    /// The program (or the working directory) does not exist (`ENOENT`).
    NotFound,
    /// The program is not executable, or a directory is not searchable (`EACCES`).
    PermissionDenied,
    /// The options are invalid: a NUL byte in a string, two IPC slots, a bad fd.
    InvalidInput,
    /// The system ran out of processes, memory or file descriptors.
    ResourceExhausted,
    /// Any other failure; see the source error.
    Other,
}

impl fmt::Display for SpawnErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotFound => "not found",
            Self::PermissionDenied => "permission denied",
            Self::InvalidInput => "invalid input",
            Self::ResourceExhausted => "resources exhausted",
            Self::Other => "failed",
        })
    }
}

/// A process could not be started: names the program and its arguments, like Node's
/// `spawn <file> ENOENT` error with its `path` and `spawnargs`.
///
/// Displayed as `spawn <program> <ERRNO>: <kind>` (`spawn gitx ENOENT: not found`), or
/// `spawn <program> <ERRNO>: working directory <dir> <kind>` when the working directory is
/// what failed.
#[derive(Debug, thiserror::Error)]
#[error(
    "spawn {}{}: {}{kind}",
    .program.to_string_lossy(),
    errno_name(.source),
    cwd_text(.cwd.as_deref())
)]
pub struct SpawnError {
    program: OsString,
    args: Vec<OsString>,
    kind: SpawnErrorKind,
    cwd: Option<PathBuf>,
    #[source]
    source: io::Error,
}

/// ` ENOENT` for an OS error, nothing for another.
fn errno_name(err: &io::Error) -> String {
    err.raw_os_error()
        .map(|n| format!(" {:?}", nix::errno::Errno::from_raw(n)))
        .unwrap_or_default()
}

fn cwd_text(cwd: Option<&Path>) -> String {
    cwd.map(|dir| format!("working directory {} ", dir.display()))
        .unwrap_or_default()
}

impl SpawnError {
    pub(crate) fn new(program: &OsStr, args: &[OsString], source: io::Error) -> Self {
        let kind = match source.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => SpawnErrorKind::NotFound,
            Some(libc::EACCES | libc::EPERM | libc::ENOEXEC) => SpawnErrorKind::PermissionDenied,
            Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
                SpawnErrorKind::ResourceExhausted
            }
            Some(libc::EINVAL | libc::EBADF | libc::E2BIG) => SpawnErrorKind::InvalidInput,
            _ if source.kind() == io::ErrorKind::InvalidInput => SpawnErrorKind::InvalidInput,
            _ => SpawnErrorKind::Other,
        };
        Self {
            program: program.to_owned(),
            args: args.to_vec(),
            kind,
            cwd: None,
            source,
        }
    }

    /// Marks the working directory `cwd` as the cause.
    pub(crate) fn in_cwd(mut self, cwd: &Path) -> Self {
        self.cwd = Some(cwd.to_owned());
        self
    }

    /// The working directory, when it (not the program) is why the spawn failed: it does
    /// not exist, is not a directory or cannot be entered.
    pub fn cwd(&self) -> Option<&Path> {
        self.cwd.as_deref()
    }

    pub(crate) fn invalid(program: &OsStr, args: &[OsString], why: &'static str) -> Self {
        Self::new(
            program,
            args,
            io::Error::new(io::ErrorKind::InvalidInput, why),
        )
    }

    /// The program as given to spawn (Node's `path`).
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// The arguments as given to spawn, without the program (Node's `spawnargs` minus argv0).
    pub fn args(&self) -> &[OsString] {
        &self.args
    }

    /// Why it failed.
    pub fn kind(&self) -> SpawnErrorKind {
        self.kind
    }

    /// The underlying OS error number, if any (`ENOENT`, `EACCES`, ...).
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(errno: i32, kind: SpawnErrorKind) {
        let err = SpawnError::new(
            OsStr::new("prog"),
            &["a".into()],
            io::Error::from_raw_os_error(errno),
        );
        assert_eq!(err.kind(), kind);
        let name = format!("{:?}", nix::errno::Errno::from_raw(errno));
        assert_eq!(err.to_string(), format!("spawn prog {name}: {kind}"));
        assert_eq!(err.args(), &[OsString::from("a")]);
    }

    #[test]
    fn errno_maps_to_kind() {
        check(libc::ENOENT, SpawnErrorKind::NotFound);
        check(libc::EACCES, SpawnErrorKind::PermissionDenied);
        check(libc::EAGAIN, SpawnErrorKind::ResourceExhausted);
        check(libc::EIO, SpawnErrorKind::Other);
    }
}
