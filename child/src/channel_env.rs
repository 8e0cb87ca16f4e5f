//! The environment variables through which a parent configures a forked child, and their
//! parsing: a leaf module shared by the launcher (which sets them) and the child side of
//! `fork` (which reads them).

use std::ffi::{OsStr, OsString};

use crate::signal::Signal;

/// The variable that holds the child's channel fd (the `ipc` crate's name).
pub(crate) const CHANNEL_FD_ENV: &str = ipc::CHANNEL_FD_ENV;

/// Node's variables for a JSON channel: its fd and its serialization.
pub(crate) const NODE_CHANNEL_FD_ENV: &str = ipc::NODE_CHANNEL_FD_ENV;
pub(crate) const NODE_SERIALIZATION_ENV: &str = ipc::NODE_CHANNEL_SERIALIZATION_MODE_ENV;

/// The variable that asks a forked child for a parent-death signal: `"<signo>:<ppid>"`.
pub(crate) const PARENT_DEATH_ENV: &str = "CHILD_PARENT_DEATH_SIGNAL";

/// What [`PARENT_DEATH_ENV`] carries: the signal to receive and the parent it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ParentDeath {
    pub(crate) signal: Signal,
    pub(crate) parent: i32,
}

impl ParentDeath {
    /// The variable's value, `"<signo>:<ppid>"`.
    pub(crate) fn to_value(self) -> OsString {
        format!("{}:{}", self.signal as i32, self.parent).into()
    }

    /// Parses a value written by [`ParentDeath::to_value`]; `None` if it is malformed.
    pub(crate) fn parse(value: &OsStr) -> Option<Self> {
        let (signal, parent) = value.to_str()?.split_once(':')?;
        let signal = Signal::try_from(signal.parse::<i32>().ok()?).ok()?;
        Some(Self {
            signal,
            parent: parent.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_death_value_round_trips() {
        for (signal, parent) in [(Signal::SIGKILL, 1234), (Signal::SIGTERM, 1)] {
            let value = ParentDeath { signal, parent };
            assert_eq!(ParentDeath::parse(&value.to_value()), Some(value));
        }
        assert_eq!(
            ParentDeath::parse(OsStr::new("9:1234")),
            Some(ParentDeath {
                signal: Signal::SIGKILL,
                parent: 1234
            })
        );
        for malformed in ["9", "999:1", "x:1", "9:x", ""] {
            assert_eq!(
                ParentDeath::parse(OsStr::new(malformed)),
                None,
                "{malformed}"
            );
        }
    }
}
