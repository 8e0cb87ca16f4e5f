//! systemd integration: listening sockets passed at exec (socket activation, or an
//! upgrading primary) and `sd_notify` state changes.
//!
//! # Inherited sockets
//!
//! A process started with `LISTEN_PID` set to its own pid finds `LISTEN_FDS` descriptors
//! from fd 3 on, named by `LISTEN_FDNAMES` (`sd_listen_fds(3)`). [`Inherited::from_env`]
//! takes them once per process: each listening TCP socket is adopted (close-on-exec,
//! non-blocking) and matched to the workers' `listen(addr)` by address in
//! `sockets.rs`; anything else is kept open and unused (and passed on by an upgrade).
//! Inherited sockets belong to the primary until it stops: a handle given one uses a copy,
//! so closing the handle (a reload, a crash, an idle handle, a stop's first step) never
//! closes the socket itself, which keeps the port and the connections in its backlog.
//!
//! # Notifications
//!
//! [`Notifier`] sends `READY=1` when the cluster turns ready (every slot's worker
//! listening), `RELOADING=1` with `MONOTONIC_USEC` when a reload starts and `READY=1` when
//! it ends, `STOPPING=1`, `STATUS=` with the worker count, `WATCHDOG=1`, and `MAINPID=` when
//! an upgrade hands the service to a new primary (after which it sends nothing). Without
//! `NOTIFY_SOCKET` it does nothing.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use socket2::{Protocol, Socket, Type};

/// The variables of socket activation, read by the primary and removed for its workers.
pub(crate) const LISTEN_ENV: [&str; 3] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"];

/// The variables of `sd_notify` and the watchdog, removed for the workers: only the
/// primary talks to the service manager.
pub(crate) const NOTIFY_ENV: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

/// Names the descriptor on which a primary started by an upgrade says it is ready.
pub(crate) const UPGRADE_FD_ENV: &str = "CLUSTER_UPGRADE_FD";

/// What a new primary writes on its upgrade descriptor once it is ready.
pub(crate) const UPGRADE_READY: &[u8] = b"READY=1\n";

/// The name an upgrade gives the sockets the primary bound itself (systemd's names are
/// passed on as they came).
pub(crate) const OWN_SOCKET_NAME: &str = "cluster";

static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);
static UPGRADE_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// One inherited listening TCP socket.
#[derive(Debug)]
pub(crate) struct InheritedSocket {
    pub(crate) listener: TcpListener,
    pub(crate) address: SocketAddr,
    pub(crate) name: String,
    /// Whether it has `SO_REUSEPORT` (a systemd `ReusePort=yes` socket, or a reuseport
    /// slot of an upgrading primary): siblings may be bound next to it.
    pub(crate) reuse_port: bool,
}

/// The descriptors this process inherited.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub(crate) sockets: Vec<InheritedSocket>,
    /// Passed descriptors that are not listening TCP sockets: kept open, never used.
    pub(crate) others: Vec<(OwnedFd, String)>,
}

impl Inherited {
    /// Takes the descriptors passed with `LISTEN_FDS`, if `LISTEN_PID` is this process.
    /// Only the first call in a process finds any.
    pub(crate) fn from_env() -> Self {
        if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
            return Self::default();
        }
        let passed = match sd_notify::listen_fds_with_names() {
            Ok(passed) => passed,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring LISTEN_FDS");
                return Self::default();
            }
        };
        let mut fds = Vec::new();
        for (fd, name) in passed {
            match crate::sys::adopt_inherited(fd) {
                Ok(owned) => fds.push((owned, name)),
                Err(e) => tracing::warn!(fd, error = %e, "LISTEN_FDS names a closed descriptor"),
            }
        }
        Self::from_fds(fds)
    }

    /// Sorts passed descriptors into listening TCP sockets and the rest.
    pub(crate) fn from_fds(fds: Vec<(OwnedFd, String)>) -> Self {
        let mut inherited = Self::default();
        for (fd, name) in fds {
            let socket = Socket::from(fd);
            let address = socket.local_addr().ok().and_then(|a| a.as_socket());
            let listening = socket.is_listener().unwrap_or(false)
                && socket.r#type().ok() == Some(Type::STREAM)
                && matches!(socket.protocol(), Ok(Some(Protocol::TCP) | None));
            match address.filter(|_| listening) {
                Some(address) if socket.set_nonblocking(true).is_ok() => {
                    let reuse_port = socket.reuse_port().unwrap_or(false);
                    tracing::info!(%address, name, reuse_port, "adopted an inherited listening socket");
                    inherited.sockets.push(InheritedSocket {
                        listener: socket.into(),
                        address,
                        name,
                        reuse_port,
                    });
                }
                _ => {
                    tracing::warn!(
                        name,
                        "an inherited descriptor is not a listening TCP socket; kept unused"
                    );
                    inherited.others.push((socket.into(), name));
                }
            }
        }
        inherited
    }
}

/// The readiness socket of a primary started by an upgrade ([`UPGRADE_FD_ENV`]).
#[derive(Debug)]
pub(crate) struct UpgradeReadiness(Option<UnixStream>);

impl UpgradeReadiness {
    /// Takes the descriptor [`UPGRADE_FD_ENV`] names, once per process.
    pub(crate) fn from_env() -> Self {
        let Some(fd) = std::env::var(UPGRADE_FD_ENV)
            .ok()
            .and_then(|fd| fd.parse::<i32>().ok())
            .filter(|fd| *fd > 2)
        else {
            return Self(None);
        };
        if UPGRADE_FD_TAKEN.swap(true, Ordering::SeqCst) {
            return Self(None);
        }
        match crate::sys::adopt_inherited(fd) {
            Ok(fd) => {
                let stream = UnixStream::from(fd);
                // Close-on-exec, so no worker keeps it open.
                let cloexec = nix::fcntl::fcntl(
                    &stream,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
                );
                if let Err(e) = cloexec {
                    tracing::warn!(error = %e, "upgrade descriptor stays inheritable");
                }
                Self(Some(stream))
            }
            Err(e) => {
                tracing::warn!(fd, error = %e, "ignoring {UPGRADE_FD_ENV}");
                Self(None)
            }
        }
    }

    /// No readiness socket (taken already).
    pub(crate) fn none() -> Self {
        Self(None)
    }

    /// Tells the primary that started this one that it is ready (once).
    pub(crate) fn ready(&mut self) {
        if let Some(mut stream) = self.0.take() {
            if let Err(e) = stream.write_all(UPGRADE_READY) {
                tracing::warn!(error = %e, "could not tell the old primary we are ready");
            }
        }
    }
}

/// Sends the service manager the primary's state changes (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    handed_over: bool,
}

impl Notifier {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.handed_over {
            return;
        }
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!(error = %e, "sd_notify failed");
        }
    }

    /// `READY=1` with the worker count.
    pub(crate) fn ready(&self, workers: usize) {
        let status = format!("ready: {workers} workers");
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
    }

    /// The worker count, while not ready.
    pub(crate) fn not_ready(&self, workers: usize) {
        let status = format!("not ready: {workers} workers");
        self.send(&[NotifyState::Status(&status)]);
    }

    /// `RELOADING=1` with `MONOTONIC_USEC`, as `Type=notify-reload` expects.
    pub(crate) fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
        match NotifyState::monotonic_usec_now() {
            Ok(now) => states.push(now),
            Err(e) => tracing::warn!(error = %e, "no monotonic clock for MONOTONIC_USEC"),
        }
        self.send(&states);
    }

    pub(crate) fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }

    pub(crate) fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// `MAINPID=pid`: the new primary of an upgrade is the service now. Nothing more is
    /// sent, so this primary's stop is not taken for the service's.
    pub(crate) fn hand_over(&mut self, pid: u32) {
        let status = format!("upgraded: primary {pid}");
        self.send(&[NotifyState::MainPid(pid), NotifyState::Status(&status)]);
        self.handed_over = true;
    }
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, if it is for this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .map(|timeout| timeout / 2)
        .filter(|interval| !interval.is_zero())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_tcp_sockets_are_adopted_and_the_rest_kept() {
        let plain = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 8, false).unwrap();
        let grouped = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 8, true).unwrap();
        let (plain_addr, grouped_addr) =
            (plain.local_addr().unwrap(), grouped.local_addr().unwrap());
        let (pair, _other) = UnixStream::pair().unwrap();
        let inherited = Inherited::from_fds(vec![
            (plain.into(), "web".into()),
            (pair.into(), "control".into()),
            (grouped.into(), "grouped".into()),
        ]);
        let adopted: Vec<_> = inherited
            .sockets
            .iter()
            .map(|s| (s.address, s.name.as_str(), s.reuse_port))
            .collect();
        assert_eq!(
            adopted,
            [(plain_addr, "web", false), (grouped_addr, "grouped", true)]
        );
        assert_eq!(inherited.others.len(), 1);
        assert_eq!(inherited.others[0].1, "control");
    }

    #[test]
    fn a_bound_socket_that_does_not_listen_is_not_adopted() {
        let socket = Socket::new(socket2::Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let inherited = Inherited::from_fds(vec![(socket.into(), "idle".into())]);
        assert!(inherited.sockets.is_empty());
        assert_eq!(inherited.others.len(), 1);
    }
}
