//! [`Signal`]: this crate's own name for a Linux signal, so that no dependency's signal
//! type (and its major version) is part of `child`'s API.

use std::fmt;
use std::str::FromStr;

/// A standard Linux signal, by the name `signal(7)` gives it. Its discriminant is the
/// signal's number (`Signal::SIGTERM as i32 == 15`).
///
/// Real-time signals (`SIGRTMIN..=SIGRTMAX`) and the obsolete `SIGSTKFLT` have no variant:
/// [`ExitStatus::signal_number`](crate::ExitStatus::signal_number) reports them by number.
/// To use a signal with another crate, go through the number: `nix`'s
/// `Signal::try_from(signal as i32)`, `libc::kill(pid, signal as i32)`.
///
/// ```
/// use child::Signal;
///
/// assert_eq!(Signal::SIGTERM as i32, 15);
/// assert_eq!(Signal::try_from(9), Ok(Signal::SIGKILL));
/// assert_eq!("SIGHUP".parse(), Ok(Signal::SIGHUP));
/// assert_eq!(Signal::SIGINT.to_string(), "SIGINT");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(i32)]
#[allow(missing_docs)] // Each variant is the signal of the same name, see signal(7).
pub enum Signal {
    SIGHUP = libc::SIGHUP,
    SIGINT = libc::SIGINT,
    SIGQUIT = libc::SIGQUIT,
    SIGILL = libc::SIGILL,
    SIGTRAP = libc::SIGTRAP,
    SIGABRT = libc::SIGABRT,
    SIGBUS = libc::SIGBUS,
    SIGFPE = libc::SIGFPE,
    SIGKILL = libc::SIGKILL,
    SIGUSR1 = libc::SIGUSR1,
    SIGSEGV = libc::SIGSEGV,
    SIGUSR2 = libc::SIGUSR2,
    SIGPIPE = libc::SIGPIPE,
    SIGALRM = libc::SIGALRM,
    SIGTERM = libc::SIGTERM,
    SIGCHLD = libc::SIGCHLD,
    SIGCONT = libc::SIGCONT,
    SIGSTOP = libc::SIGSTOP,
    SIGTSTP = libc::SIGTSTP,
    SIGTTIN = libc::SIGTTIN,
    SIGTTOU = libc::SIGTTOU,
    SIGURG = libc::SIGURG,
    SIGXCPU = libc::SIGXCPU,
    SIGXFSZ = libc::SIGXFSZ,
    SIGVTALRM = libc::SIGVTALRM,
    SIGPROF = libc::SIGPROF,
    SIGWINCH = libc::SIGWINCH,
    SIGIO = libc::SIGIO,
    SIGPWR = libc::SIGPWR,
    SIGSYS = libc::SIGSYS,
}

impl Signal {
    /// Every variant, in the order of their numbers.
    pub const ALL: [Signal; 30] = [
        Self::SIGHUP,
        Self::SIGINT,
        Self::SIGQUIT,
        Self::SIGILL,
        Self::SIGTRAP,
        Self::SIGABRT,
        Self::SIGBUS,
        Self::SIGFPE,
        Self::SIGKILL,
        Self::SIGUSR1,
        Self::SIGSEGV,
        Self::SIGUSR2,
        Self::SIGPIPE,
        Self::SIGALRM,
        Self::SIGTERM,
        Self::SIGCHLD,
        Self::SIGCONT,
        Self::SIGSTOP,
        Self::SIGTSTP,
        Self::SIGTTIN,
        Self::SIGTTOU,
        Self::SIGURG,
        Self::SIGXCPU,
        Self::SIGXFSZ,
        Self::SIGVTALRM,
        Self::SIGPROF,
        Self::SIGWINCH,
        Self::SIGIO,
        Self::SIGPWR,
        Self::SIGSYS,
    ];

    /// The signal's name, `"SIGTERM"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::SIGHUP => "SIGHUP",
            Self::SIGINT => "SIGINT",
            Self::SIGQUIT => "SIGQUIT",
            Self::SIGILL => "SIGILL",
            Self::SIGTRAP => "SIGTRAP",
            Self::SIGABRT => "SIGABRT",
            Self::SIGBUS => "SIGBUS",
            Self::SIGFPE => "SIGFPE",
            Self::SIGKILL => "SIGKILL",
            Self::SIGUSR1 => "SIGUSR1",
            Self::SIGSEGV => "SIGSEGV",
            Self::SIGUSR2 => "SIGUSR2",
            Self::SIGPIPE => "SIGPIPE",
            Self::SIGALRM => "SIGALRM",
            Self::SIGTERM => "SIGTERM",
            Self::SIGCHLD => "SIGCHLD",
            Self::SIGCONT => "SIGCONT",
            Self::SIGSTOP => "SIGSTOP",
            Self::SIGTSTP => "SIGTSTP",
            Self::SIGTTIN => "SIGTTIN",
            Self::SIGTTOU => "SIGTTOU",
            Self::SIGURG => "SIGURG",
            Self::SIGXCPU => "SIGXCPU",
            Self::SIGXFSZ => "SIGXFSZ",
            Self::SIGVTALRM => "SIGVTALRM",
            Self::SIGPROF => "SIGPROF",
            Self::SIGWINCH => "SIGWINCH",
            Self::SIGIO => "SIGIO",
            Self::SIGPWR => "SIGPWR",
            Self::SIGSYS => "SIGSYS",
        }
    }

    /// The signal's number, `15` for `SIGTERM` (the same as `signal as i32`).
    pub const fn number(self) -> i32 {
        self as i32
    }

    /// The same signal as `nix` names it, for this crate's own calls.
    pub(crate) fn to_nix(self) -> nix::sys::signal::Signal {
        nix::sys::signal::Signal::try_from(self as i32).expect("every variant is a nix signal")
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A number that names no [`Signal`], or a name that is not one's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownSignal;

impl fmt::Display for UnknownSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a standard signal")
    }
}

impl std::error::Error for UnknownSignal {}

impl TryFrom<i32> for Signal {
    type Error = UnknownSignal;

    fn try_from(number: i32) -> Result<Self, UnknownSignal> {
        Self::ALL
            .into_iter()
            .find(|s| *s as i32 == number)
            .ok_or(UnknownSignal)
    }
}

impl FromStr for Signal {
    type Err = UnknownSignal;

    /// The name as `signal(7)` spells it, `"SIGTERM"`.
    fn from_str(name: &str) -> Result<Self, UnknownSignal> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == name)
            .ok_or(UnknownSignal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_has_nix_s_number_and_name() {
        for signal in Signal::ALL {
            let theirs = nix::sys::signal::Signal::try_from(signal as i32).expect("nix knows it");
            assert_eq!(theirs.as_str(), signal.as_str());
            assert_eq!(Signal::try_from(signal.number()), Ok(signal));
            assert_eq!(signal.as_str().parse(), Ok(signal));
        }
        assert!(Signal::ALL.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn unknown_numbers_and_names_are_errors() {
        assert_eq!(Signal::try_from(0), Err(UnknownSignal));
        assert_eq!(Signal::try_from(libc::SIGRTMIN()), Err(UnknownSignal));
        assert_eq!("TERM".parse::<Signal>(), Err(UnknownSignal));
    }
}
