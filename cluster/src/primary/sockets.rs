//! The driver's listening sockets, one entry per [`HandleKey`], and accepting on the
//! round-robin ones. What to bind and close is decided by the core; this only does it.
//!
//! The driver polls the round-robin listeners itself ([`Listeners::poll_accept`]), so
//! closing a handle closes its socket at once (a listen right after can bind the same
//! port), and accepted sockets are never registered with the reactor: each readiness
//! drains the backlog with `accept4`, and the connection only passes through here on its
//! way to a worker.
//!
//! # Inherited sockets
//!
//! A bind whose address is that of an inherited socket (systemd's `LISTEN_FDS`, or an
//! upgrading primary's: see `systemd.rs`) uses a copy of that socket instead of binding;
//! a request for port 0 takes an inherited socket on the same IP that no other handle
//! uses. Under round-robin and shared it is the handle's socket. Under reuseport, each
//! slot takes an inherited socket of that address not yet used by the handle (an upgrade
//! passes one per slot); once none is left, a slot binds a sibling that joins the group if
//! the inherited socket has `SO_REUSEPORT`, and otherwise shares the inherited socket (the
//! workers of those slots accept on one queue, as under the shared policy). Closing a
//! handle or a slot closes only the copy: the inherited socket stays open, with its port
//! and its backlog, until the primary stops.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use super::systemd::{Inherited, OWN_SOCKET_NAME};
use crate::Endpoint;
use crate::net::{UnixPath, bind_listener, bind_unix};
use crate::protocol::{AddressFamily, HandleKey};
use crate::settings::Policy;

/// How long accepting on a handle pauses after an error (EMFILE and friends) before it
/// tries again: the backlog keeps the connections meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// How many connections one readiness of a listener may accept at most, so that one busy
/// handle does not starve the driver's other work.
const ACCEPT_BATCH: usize = 64;

/// A round-robin handle's socket, accepted on by the driver.
#[derive(Debug)]
struct Accepting {
    listener: AsyncFd<OwnedFd>,
    /// Set after an accept error: no accept until it fires.
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Accept errors on this socket so far; the 1st, 2nd, 4th, 8th... are logged, so a
    /// lasting shortage logs a few lines, not one per pause.
    errors: u64,
    /// Whether the core paused accepting (too many connections wait for a worker).
    held: bool,
}

#[derive(Debug, Default)]
struct Sockets {
    /// The handle's only socket (shared).
    main: Option<OwnedFd>,
    /// Reuseport: one socket per slot.
    slots: HashMap<usize, OwnedFd>,
    /// Round-robin: the socket the driver accepts on.
    accepting: Option<Accepting>,
    /// A Unix socket's file, removed when the handle closes (as libuv does).
    unix_path: Option<UnixPath>,
}

/// Every listening socket of the primary.
#[derive(Debug)]
pub(crate) struct Listeners {
    policy: Policy,
    handles: HashMap<HandleKey, Sockets>,
    /// Connections accepted and not yet taken by the driver, in order.
    ready: VecDeque<(HandleKey, OwnedFd)>,
    /// Sockets passed at exec, open until the primary stops.
    inherited: Inherited,
    /// Which inherited socket each (handle, reuseport slot) socket is a copy of.
    lent: HashMap<(HandleKey, Option<usize>), usize>,
    /// Whether round-robin sockets are accepted on (paused for an upgrade's hand-over).
    accepting: bool,
    /// Accept errors so far, each a pause of its socket (for the stats).
    accept_pauses: u64,
}

/// How a bind is served by an inherited socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Adopted {
    /// A copy of this inherited socket.
    Copy(usize),
    /// A new `SO_REUSEPORT` socket that joins this inherited socket's group.
    Sibling(usize),
}

/// The address a key asks for.
fn requested(key: &HandleKey) -> io::Result<Endpoint> {
    if key.family == AddressFamily::Unix {
        return Ok(Endpoint::Unix(key.address.clone().into()));
    }
    let ip: IpAddr = key
        .address
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(Endpoint::Inet(SocketAddr::new(ip, key.port)))
}

impl Listeners {
    pub(crate) fn new(policy: Policy, inherited: Inherited) -> Self {
        if policy == Policy::ReusePort {
            warn_unless_requests_migrate();
        }
        Self {
            policy,
            handles: HashMap::new(),
            ready: VecDeque::new(),
            inherited,
            lent: HashMap::new(),
            accepting: true,
            accept_pauses: 0,
        }
    }

    /// Pauses or resumes accepting on the round-robin sockets; while paused, connections
    /// wait in their backlog (for another process that shares the socket, in an upgrade).
    pub(crate) fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    /// The inherited socket that serves a bind of `key` at `address`, if any (see the
    /// module docs).
    fn adopt(
        &self,
        key: &HandleKey,
        socket: Option<usize>,
        address: SocketAddr,
    ) -> Option<Adopted> {
        let lent_elsewhere =
            |index: usize| self.lent.iter().any(|((k, _), i)| *i == index && k != key);
        let candidates: Vec<usize> = (self.inherited.sockets.iter().enumerate())
            .filter(|(index, inherited)| {
                inherited.address == address
                    || (address.port() == 0
                        && inherited.address.ip() == address.ip()
                        && !lent_elsewhere(*index))
            })
            .map(|(index, _)| index)
            .collect();
        let first = *candidates.first()?;
        if self.policy != Policy::ReusePort || socket.is_none() {
            return Some(Adopted::Copy(first));
        }
        let unused = candidates
            .iter()
            .copied()
            .find(|index| !self.lent.iter().any(|((k, _), i)| k == key && i == index));
        Some(match unused {
            Some(index) => Adopted::Copy(index),
            None if self.inherited.sockets[first].reuse_port => Adopted::Sibling(first),
            None => Adopted::Copy(first),
        })
    }

    /// Copies of every listening socket, to pass to a new primary: each inherited one with
    /// its name, then those this primary bound itself.
    pub(crate) fn handover(&self) -> io::Result<Vec<(OwnedFd, String)>> {
        let mut fds = Vec::new();
        for inherited in &self.inherited.sockets {
            fds.push((
                inherited.listener.try_clone()?.into(),
                inherited.name.clone(),
            ));
        }
        for (fd, name) in &self.inherited.others {
            fds.push((fd.try_clone()?, name.clone()));
        }
        for (key, sockets) in &self.handles {
            let own = |socket: Option<usize>| !self.lent.contains_key(&(key.clone(), socket));
            if sockets.unix_path.is_some() {
                // A Unix socket is not handed over: its file belongs to this primary.
                continue;
            }
            let accepting = sockets.accepting.as_ref().map(|a| a.listener.get_ref());
            let mut listeners: Vec<&OwnedFd> = Vec::new();
            listeners.extend(
                accepting
                    .into_iter()
                    .chain(sockets.main.as_ref())
                    .filter(|_| own(None)),
            );
            let mut slots: Vec<_> = sockets
                .slots
                .iter()
                .filter(|(slot, _)| own(Some(**slot)))
                .collect();
            slots.sort_by_key(|(slot, _)| **slot);
            listeners.extend(slots.into_iter().map(|(_, listener)| listener));
            for listener in listeners {
                fds.push((listener.try_clone()?, OWN_SOCKET_NAME.to_owned()));
            }
        }
        Ok(fds)
    }

    /// Binds a socket of `key` (`socket`: a reuseport slot's) at `address`, or at the
    /// key's own address. Returns the bound address or the errno.
    pub(crate) fn bind(
        &mut self,
        key: &HandleKey,
        socket: Option<usize>,
        address: Option<Endpoint>,
        backlog: u32,
    ) -> Result<Endpoint, i32> {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EINVAL);
        let reuse_port = self.policy == Policy::ReusePort;
        let first = address.is_none();
        let address = match address {
            Some(address) => address,
            None => requested(key).map_err(errno)?,
        };
        let address = match address {
            Endpoint::Inet(address) => address,
            Endpoint::Unix(path) => {
                let (listener, file) = bind_unix(&path, backlog).map_err(errno)?;
                self.listen_on(key, socket, listener, file).map_err(errno)?;
                return Ok(Endpoint::Unix(path));
            }
        };
        let (listener, origin) = match self.adopt(key, socket, address) {
            Some(Adopted::Copy(index)) => {
                let inherited = &self.inherited.sockets[index].listener;
                (inherited.try_clone().map_err(errno)?, Some(index))
            }
            Some(Adopted::Sibling(index)) => {
                let address = self.inherited.sockets[index].address;
                (bind_listener(address, backlog, true).map_err(errno)?, None)
            }
            None => {
                // The first socket of a reuseport handle on a fixed port: the port must
                // not belong to another program's group.
                if first && reuse_port && address.port() != 0 {
                    crate::net::check_unowned(address).map_err(errno)?;
                }
                (
                    bind_listener(address, backlog, reuse_port).map_err(errno)?,
                    None,
                )
            }
        };
        // An inherited socket too: its connections then skip a setsockopt each.
        crate::net::set_nodelay(&listener);
        let bound = listener.local_addr().map_err(errno)?;
        if let Some(index) = origin {
            tracing::debug!(%key, %bound, "listening on an inherited socket");
            self.lent.insert((key.clone(), socket), index);
        }
        self.listen_on(key, socket, listener.into(), None)
            .map_err(errno)?;
        Ok(Endpoint::Inet(bound))
    }

    /// Keeps `listener` as `key`'s socket (`socket`: a reuseport slot's), accepted on by
    /// the driver under round-robin; `unix_path` is the file to remove with it.
    fn listen_on(
        &mut self,
        key: &HandleKey,
        socket: Option<usize>,
        listener: OwnedFd,
        unix_path: Option<UnixPath>,
    ) -> io::Result<()> {
        let sockets = self.handles.entry(key.clone()).or_default();
        if unix_path.is_some() {
            sockets.unix_path = unix_path;
        }
        match (self.policy, socket) {
            (Policy::RoundRobin, _) => {
                let listener = crate::sys::readable_listener(listener)?;
                sockets.accepting = Some(Accepting {
                    listener,
                    paused: None,
                    errors: 0,
                    held: false,
                });
            }
            (_, Some(slot)) => {
                sockets.slots.insert(slot, listener);
            }
            (_, None) => sockets.main = Some(listener),
        }
        Ok(())
    }

    /// A copy of a listening socket to send to a worker.
    pub(crate) fn copy(&self, key: &HandleKey, socket: Option<usize>) -> io::Result<OwnedFd> {
        let sockets = self.handles.get(key);
        let listener = match socket {
            Some(slot) => sockets.and_then(|s| s.slots.get(&slot)),
            None => sockets.and_then(|s| s.main.as_ref()),
        };
        let listener = listener.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        listener.try_clone()
    }

    /// Stops or resumes accepting on the round-robin socket of `key` alone. While stopped,
    /// new connections wait in the kernel's listen backlog.
    pub(crate) fn set_handle_accepting(&mut self, key: &HandleKey, on: bool) {
        if let Some(accepting) = self.handles.get_mut(key).and_then(|s| s.accepting.as_mut()) {
            accepting.held = !on;
        }
    }

    /// Closes every socket of `key`, now.
    pub(crate) fn close(&mut self, key: &HandleKey) {
        self.handles.remove(key);
        self.lent.retain(|(k, _), _| k != key);
        self.ready.retain(|(k, _)| k != key);
    }

    /// Whether any round-robin socket is open (so [`poll_accept`](Self::poll_accept) can
    /// ever be ready).
    pub(crate) fn accepts(&self) -> bool {
        !self.ready.is_empty()
            || (self.accepting && self.handles.values().any(|s| s.accepting.is_some()))
    }

    /// How many times accepting paused after an error (`EMFILE`, `ENFILE`, ...).
    pub(crate) fn accept_pauses(&self) -> u64 {
        self.accept_pauses
    }

    /// The next connection accepted on a round-robin handle. Each readiness of a socket
    /// drains up to [`ACCEPT_BATCH`] connections from its backlog. An accept error (out of
    /// descriptors, say) pauses that socket for [`ACCEPT_BACKOFF`] (its 1st, 2nd, 4th...
    /// error logged): the kernel keeps the backlog, and accepting resumes by itself once
    /// descriptors are free.
    pub(crate) fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(HandleKey, OwnedFd)> {
        if let Some(next) = self.ready.pop_front() {
            return Poll::Ready(next);
        }
        if !self.accepting {
            return Poll::Pending;
        }
        for (key, sockets) in &mut self.handles {
            let Some(accepting) = sockets.accepting.as_mut().filter(|a| !a.held) else {
                continue;
            };
            if let Some(paused) = &mut accepting.paused {
                if paused.as_mut().poll(cx).is_pending() {
                    continue;
                }
                accepting.paused = None;
            }
            let before = accepting.errors;
            accept_ready(key, accepting, &mut self.ready, cx);
            self.accept_pauses += accepting.errors - before;
        }
        match self.ready.pop_front() {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    /// Closes one reuseport slot's socket of `key`.
    pub(crate) fn close_slot(&mut self, key: &HandleKey, slot: usize) {
        if let Some(sockets) = self.handles.get_mut(key) {
            sockets.slots.remove(&slot);
        }
        self.lent.remove(&(key.clone(), Some(slot)));
    }
}

/// Accepts what one readiness of `accepting` offers, into `ready`.
fn accept_ready(
    key: &HandleKey,
    accepting: &mut Accepting,
    ready: &mut VecDeque<(HandleKey, OwnedFd)>,
    cx: &mut Context<'_>,
) {
    let mut taken = 0;
    while taken < ACCEPT_BATCH {
        let Poll::Ready(Ok(mut guard)) = accepting.listener.poll_read_ready(cx) else {
            return;
        };
        match guard.try_io(|listener| crate::sys::accept_nonblocking(listener.get_ref().as_fd())) {
            Ok(Ok(stream)) => {
                ready.push_back((key.clone(), stream));
                taken += 1;
            }
            Ok(Err(e)) => {
                // EMFILE and friends: pause instead of spinning; log the 1st, 2nd, 4th...
                accepting.errors += 1;
                if accepting.errors == 1 || accepting.errors.is_power_of_two() {
                    let errors = accepting.errors;
                    tracing::warn!(%key, error = %e, errors, "accept failed; pausing this server");
                }
                let mut pause = Box::pin(tokio::time::sleep(ACCEPT_BACKOFF));
                // Register the timer's waker now, so the pause ends by itself.
                let _ = pause.as_mut().poll(cx);
                accepting.paused = Some(pause);
                return;
            }
            // Drained: the guard's readiness is cleared; the next poll registers interest.
            Err(_would_block) => continue,
        }
    }
    // More may wait: come back after the driver's other work.
    cx.waker().wake_by_ref();
}

/// Under reuseport, closing a slot's socket (a worker removed, `SIGTTOU`) resets the
/// connections still in its accept queue unless the kernel migrates them to the group's
/// other sockets (`net.ipv4.tcp_migrate_req=1`, Linux 5.14+). A library does not change
/// that setting for the whole system; it says so.
fn warn_unless_requests_migrate() {
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req");
    if !migrate.is_ok_and(|value| value.trim() == "1") {
        tracing::warn!(
            "net.ipv4.tcp_migrate_req is not 1: under reuseport, removing a worker resets the \
             connections waiting in its socket's queue (set the sysctl to migrate them)"
        );
    }
}
