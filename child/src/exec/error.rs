//! [`ExecError`]: a failed `exec`, `exec_file` or sync run, with everything Node puts on it.

use std::borrow::Cow;
use std::fmt;

use crate::signal::Signal;

use crate::error::Error;
use crate::status::{ExitStatus, Output};

/// Which output stream overflowed the max buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamName {
    /// The child's stdout.
    Stdout,
    /// The child's stderr.
    Stderr,
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        })
    }
}

/// Why an exec-style run failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExecErrorKind {
    /// The process could not be started (see [`std::error::Error::source`]).
    Spawn,
    /// It exited with a non-zero code or was ended by a signal it did not get from us.
    Failed,
    /// The timeout passed; it was killed with the kill signal (Node's `ETIMEDOUT`) and did
    /// not then exit 0 (a child that handles the signal and exits 0 is a success, as in
    /// Node's `exec`).
    TimedOut,
    /// The cancellation future ([`SpawnOptions::cancel_on`](crate::SpawnOptions::cancel_on)) completed; it was killed with the kill signal (Node's `AbortError`).
    Cancelled,
    /// A stream exceeded the max buffer; it was killed and the output truncated to the
    /// limit (Node's `ENOBUFS`, "stdout maxBuffer length exceeded").
    MaxBufferExceeded(StreamName),
    /// Reading its output or waiting for it failed (see the source).
    Io,
}

/// A failed exec-style run. Carries Node's error fields: `code`, `signal`, `killed`,
/// `cmd`, and the (possibly truncated) `stdout` and `stderr`.
///
/// Displayed as Node does: `Command failed: <cmd>` and stderr on the next line, or
/// `stdout maxBuffer length exceeded`.
#[derive(Debug)]
pub struct ExecError {
    pub(crate) inner: Box<Details>,
}

/// The fields of an [`ExecError`], boxed so `Result<Output, ExecError>` stays small.
#[derive(Debug)]
pub(crate) struct Details {
    pub(crate) kind: ExecErrorKind,
    pub(crate) cmd: String,
    pub(crate) status: Option<ExitStatus>,
    pub(crate) killed: bool,
    pub(crate) kill_signal: Signal,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) source: Option<Error>,
}

impl ExecError {
    pub(crate) fn new(kind: ExecErrorKind, cmd: String, kill_signal: Signal) -> Self {
        let details = Details {
            kind,
            cmd,
            status: None,
            killed: false,
            kill_signal,
            stdout: Vec::new(),
            stderr: Vec::new(),
            source: None,
        };
        Self {
            inner: Box::new(details),
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<Error>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Why it failed.
    pub fn kind(&self) -> ExecErrorKind {
        self.inner.kind
    }

    /// The command line, as Node's `cmd`: the exec command, or the file and args joined.
    pub fn cmd(&self) -> &str {
        &self.inner.cmd
    }

    /// How the process ended, if it was started and reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        self.inner.status
    }

    /// The exit code (`None` when a signal ended it or it never started).
    pub fn code(&self) -> Option<i32> {
        self.inner.status.and_then(|s| s.code())
    }

    /// The signal that ended the process, if one did.
    pub fn signal(&self) -> Option<Signal> {
        self.inner.status.and_then(|s| s.signal())
    }

    /// Whether we killed it (timeout, cancellation, max buffer).
    pub fn killed(&self) -> bool {
        self.inner.killed
    }

    /// What it wrote to stdout before it ended or was killed (truncated to the max buffer).
    pub fn stdout(&self) -> &[u8] {
        &self.inner.stdout
    }

    /// What it wrote to stderr before it ended or was killed (truncated to the max buffer).
    pub fn stderr(&self) -> &[u8] {
        &self.inner.stderr
    }

    /// Stdout as text, with invalid UTF-8 replaced.
    pub fn stdout_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.inner.stdout)
    }

    /// Stderr as text, with invalid UTF-8 replaced.
    pub fn stderr_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.inner.stderr)
    }

    /// The output and status, when the process was started and reaped.
    pub fn into_output(self) -> Option<Output> {
        Some(Output {
            status: self.inner.status?,
            stdout: self.inner.stdout,
            stderr: self.inner.stderr,
        })
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.inner.kind {
            ExecErrorKind::Spawn => {
                // Name the cause at the top, as Node's `spawn gitx ENOENT`.
                let cause = match &self.inner.source {
                    Some(Error::Spawn(e)) => {
                        let errno = e.raw_os_error().map(nix::errno::Errno::from_raw);
                        match (e.cwd(), errno) {
                            (Some(_), Some(errno)) => format!(": working directory {errno:?}"),
                            (None, Some(errno)) => format!(": {errno:?}"),
                            (_, None) => format!(": {}", e.kind()),
                        }
                    }
                    Some(Error::NoRuntime) => ": no tokio runtime with io enabled".into(),
                    _ => String::new(),
                };
                return write!(f, "could not start `{}`{cause}", self.inner.cmd);
            }
            ExecErrorKind::Io => return write!(f, "failed to run `{}`", self.inner.cmd),
            ExecErrorKind::MaxBufferExceeded(stream) => {
                return write!(f, "{stream} maxBuffer length exceeded");
            }
            ExecErrorKind::Failed => String::new(),
            ExecErrorKind::TimedOut => {
                format!(
                    " (timed out, killed with {})",
                    self.inner.kill_signal.as_str()
                )
            }
            ExecErrorKind::Cancelled => {
                format!(
                    " (cancelled, killed with {})",
                    self.inner.kill_signal.as_str()
                )
            }
        };
        write!(f, "Command failed: {}{why}", self.inner.cmd)?;
        if !self.inner.stderr.is_empty() {
            write!(f, "\n{}", self.stderr_lossy())?;
        }
        Ok(())
    }
}

impl std::error::Error for ExecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(kind: ExecErrorKind, expected: &str) {
        let mut err = ExecError::new(kind, "ls /nope".into(), Signal::SIGTERM);
        err.inner.stderr = b"ls: cannot access '/nope'\n".to_vec();
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn display_matches_node() {
        check(
            ExecErrorKind::Failed,
            "Command failed: ls /nope\nls: cannot access '/nope'\n",
        );
        check(
            ExecErrorKind::TimedOut,
            "Command failed: ls /nope (timed out, killed with SIGTERM)\nls: cannot access '/nope'\n",
        );
        check(
            ExecErrorKind::MaxBufferExceeded(StreamName::Stdout),
            "stdout maxBuffer length exceeded",
        );
        check(ExecErrorKind::Spawn, "could not start `ls /nope`");
        let mut err = ExecError::new(ExecErrorKind::TimedOut, "sleep 9".into(), Signal::SIGKILL);
        assert_eq!(
            err.to_string(),
            "Command failed: sleep 9 (timed out, killed with SIGKILL)",
            "no blank line without stderr"
        );
        err.inner.kind = ExecErrorKind::Spawn;
        err.inner.source = Some(Error::Spawn(crate::SpawnError::new(
            "gitx".as_ref(),
            &[],
            std::io::Error::from_raw_os_error(libc::ENOENT),
        )));
        assert_eq!(err.to_string(), "could not start `sleep 9`: ENOENT");
    }
}
