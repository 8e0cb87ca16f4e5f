//! The errors of the `cluster` crate.

use std::io;
use std::net::SocketAddr;

use crate::WorkerId;

/// An error of the primary's API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A worker process could not be started.
    #[error("failed to fork a worker")]
    Fork(#[source] child::Error),
    /// Signalling a worker failed.
    #[error("failed to signal a worker")]
    Kill(#[source] child::Error),
    /// No worker has this id (it never existed or has exited).
    #[error("no worker with id {0}")]
    UnknownWorker(WorkerId),
    /// The primary has stopped; nothing more can be done with it.
    #[error("the primary has stopped")]
    Stopped,
    /// A channel to a worker failed.
    #[error("channel to worker failed")]
    Ipc(#[from] ipc::Error),
    /// This process is a worker, or is not a worker, and the call needs the other role.
    #[error("this process is not a cluster {0}")]
    WrongRole(&'static str),
    /// The worker environment is unusable (missing channel, malformed id).
    #[error("invalid worker environment: {0}")]
    Environment(String),
    /// Installing a signal handler failed.
    #[error("failed to install a signal handler")]
    Signal(#[source] io::Error),
    /// Another running primary answers on the control socket's path.
    #[error("control socket {}: a running primary answers on it", path.display())]
    ControlInUse {
        /// The path.
        path: std::path::PathBuf,
    },
    /// The control socket could not be created
    /// ([`Settings::control_socket`](crate::Settings::control_socket)).
    #[error("control socket {}: {reason}", path.display())]
    Control {
        /// Where it was to be.
        path: std::path::PathBuf,
        /// Why it could not be.
        reason: String,
    },
    /// The metrics endpoint's address ([`Settings::metrics`](crate::Settings::metrics))
    /// could not be bound: in use, not local to this machine, or privileged.
    #[error("cannot serve metrics on {address}")]
    Metrics {
        /// The address asked for.
        address: SocketAddr,
        /// Why `bind` or `listen` failed.
        #[source]
        source: io::Error,
    },
}

/// Why a worker's [`listen`](crate::Worker::listen) failed: Node's `EADDRINUSE`,
/// `EACCES` and friends, wherever the bind happened (in the primary or the worker).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenError {
    /// The address is already in use (`EADDRINUSE`).
    #[error("listen {address}: address in use")]
    AddrInUse {
        /// The address asked for.
        address: SocketAddr,
    },
    /// Binding needs privileges this process lacks (`EACCES`, `EPERM`).
    #[error("listen {address}: permission denied")]
    PermissionDenied {
        /// The address asked for.
        address: SocketAddr,
    },
    /// The address is not local to this machine (`EADDRNOTAVAIL`).
    #[error("listen {address}: address not available")]
    AddrNotAvailable {
        /// The address asked for.
        address: SocketAddr,
    },
    /// Another system error.
    #[error("listen {address}: system error")]
    Os {
        /// The address asked for.
        address: SocketAddr,
        /// The error, with its errno.
        #[source]
        source: io::Error,
    },
    /// The worker is stopping and opens no new servers.
    #[error("listen {address}: the worker is stopping")]
    Stopping {
        /// The address asked for.
        address: SocketAddr,
    },
    /// The channel to the primary failed or closed before the reply came.
    #[error("listen {address}: the primary did not answer")]
    NoReply {
        /// The address asked for.
        address: SocketAddr,
    },
}

impl ListenError {
    /// The error for `errno` from `bind`/`listen` on `address`.
    pub(crate) fn from_errno(address: SocketAddr, errno: i32) -> Self {
        match errno {
            libc::EADDRINUSE => Self::AddrInUse { address },
            libc::EACCES | libc::EPERM => Self::PermissionDenied { address },
            libc::EADDRNOTAVAIL => Self::AddrNotAvailable { address },
            _ => Self::Os {
                address,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }

    /// The error for a failed local `bind`/`listen` on `address`.
    pub(crate) fn from_io(address: SocketAddr, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(errno) => Self::from_errno(address, errno),
            None => Self::Os {
                address,
                source: err,
            },
        }
    }

    /// The errno Node would report (`EADDRINUSE`, ...), if this is a system error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Self::AddrInUse { .. } => Some(libc::EADDRINUSE),
            Self::PermissionDenied { .. } => Some(libc::EACCES),
            Self::AddrNotAvailable { .. } => Some(libc::EADDRNOTAVAIL),
            Self::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(errno: i32, message: &str) {
        let address: SocketAddr = "127.0.0.1:80".parse().expect("address");
        let err = ListenError::from_errno(address, errno);
        assert_eq!(err.to_string(), message);
        if errno != libc::EPERM {
            assert_eq!(err.raw_os_error(), Some(errno));
        }
    }

    #[test]
    fn errno_maps_like_node() {
        check(libc::EADDRINUSE, "listen 127.0.0.1:80: address in use");
        check(libc::EACCES, "listen 127.0.0.1:80: permission denied");
        check(libc::EPERM, "listen 127.0.0.1:80: permission denied");
        check(
            libc::EADDRNOTAVAIL,
            "listen 127.0.0.1:80: address not available",
        );
        check(libc::EMFILE, "listen 127.0.0.1:80: system error");
    }
}
