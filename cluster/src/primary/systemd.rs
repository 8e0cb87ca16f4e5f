//! systemd integration: listening sockets passed at exec (socket activation, or an
//! upgrading primary) and `sd_notify` state changes.
//!
//! # Inherited sockets
//!
//! A process started with `LISTEN_PID` set to its own pid finds `LISTEN_FDS` descriptors
//! from fd 3 on, named by `LISTEN_FDNAMES` (`sd_listen_fds(3)`). They are read once per
//! process, by [`take_inherited_sockets`] first thing in `main` (before a runtime opens
//! descriptors whose numbers a too-large `LISTEN_FDS` would cover) or else when the
//! primary starts ([`Inherited::from_env`]): each open descriptor is checked, listening
//! sockets are adopted (close-on-exec, non-blocking), TCP ones matched to the workers'
//! `listen(addr)` by address in `sockets.rs`, other listening ones kept open and unused
//! (and passed on by an upgrade); a descriptor that is not open, not a socket or not
//! listening is logged and left alone.
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
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

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

mod inherited;

pub(crate) use self::inherited::Inherited;
pub use self::inherited::take_inherited_sockets;

static UPGRADE_FD_TAKEN: AtomicBool = AtomicBool::new(false);

/// The readiness socket of a primary started by an upgrade ([`UPGRADE_FD_ENV`]).
#[derive(Debug)]
pub(crate) struct UpgradeReadiness(Option<UnixStream>);

impl UpgradeReadiness {
    /// Whether this primary was started by an upgrade.
    pub(crate) fn is_upgrade(&self) -> bool {
        self.0.is_some()
    }

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
        if let Some(mut stream) = self.0.take()
            && let Err(e) = stream.write_all(UPGRADE_READY)
        {
            tracing::warn!(error = %e, "could not tell the old primary we are ready");
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
