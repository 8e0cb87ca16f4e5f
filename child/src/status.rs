//! How a child ended: an exit code or a terminating signal.

use std::borrow::Cow;
use std::fmt;

use crate::signal::Signal;

/// How a child process ended, as reported by `waitid`.
///
/// Node reports the same as `(code, signal)`: exactly one of [`ExitStatus::code`] and
/// [`ExitStatus::signal_number`] is `Some`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitStatus {
    /// The process called `exit` with this code (0..=255).
    Exited(i32),
    /// The process was terminated by this signal number.
    Signaled {
        /// The raw signal number (real-time signals included).
        signal: i32,
        /// Whether the kernel wrote a core dump.
        core_dumped: bool,
    },
}

impl ExitStatus {
    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        matches!(self, Self::Exited(0))
    }

    /// The exit code, or `None` if a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        match *self {
            Self::Exited(code) => Some(code),
            Self::Signaled { .. } => None,
        }
    }

    /// The terminating signal, or `None` if the process exited normally (or the signal is a
    /// real-time one that [`Signal`] cannot name: see [`ExitStatus::signal_number`]).
    pub fn signal(&self) -> Option<Signal> {
        self.signal_number().and_then(|n| Signal::try_from(n).ok())
    }

    /// The raw terminating signal number, or `None` if the process exited normally.
    pub fn signal_number(&self) -> Option<i32> {
        match *self {
            Self::Exited(_) => None,
            Self::Signaled { signal, .. } => Some(signal),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self, self.signal()) {
            (Self::Exited(code), _) => write!(f, "exit code {code}"),
            (_, Some(signal)) => write!(f, "signal {}", signal.as_str()),
            (Self::Signaled { signal, .. }, None) => write!(f, "signal {signal}"),
        }
    }
}

/// What a finished child printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the child ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (up to the max buffer).
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr (up to the max buffer).
    pub stderr: Vec<u8>,
}

impl Output {
    /// Stdout as text, with invalid UTF-8 replaced (Node's `encoding: 'utf8'`).
    pub fn stdout_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// Stderr as text, with invalid UTF-8 replaced.
    pub fn stderr_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_and_signal_are_exclusive() {
        let exited = ExitStatus::Exited(3);
        assert_eq!((exited.code(), exited.signal()), (Some(3), None));
        assert!(!exited.success());
        assert_eq!(exited.to_string(), "exit code 3");
        let killed = ExitStatus::Signaled {
            signal: 15,
            core_dumped: false,
        };
        assert_eq!(
            (killed.code(), killed.signal()),
            (None, Some(Signal::SIGTERM))
        );
        assert_eq!(killed.to_string(), "signal SIGTERM");
        let realtime = ExitStatus::Signaled {
            signal: 40,
            core_dumped: false,
        };
        assert_eq!(
            (realtime.signal(), realtime.signal_number()),
            (None, Some(40))
        );
    }
}
