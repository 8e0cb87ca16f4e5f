//! The driver's listening sockets, one entry per [`HandleKey`], and accepting on the
//! round-robin ones. What to bind and close is decided by the core; this only does it.
//!
//! The driver polls the round-robin listeners itself ([`Listeners::poll_accept`]), so
//! closing a handle closes its socket at once (a listen right after can bind the same
//! port), and accepted sockets are never registered with the reactor: each readiness
//! drains the backlog with `accept4`, and the connection only passes through here on its
//! way to a worker.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::net::bind_listener;
use crate::protocol::HandleKey;
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
    listener: AsyncFd<TcpListener>,
    /// Set after an accept error: no accept until it fires.
    paused: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Accept errors since the last one logged (one log line per pause at most).
    errors: u64,
}

#[derive(Debug, Default)]
struct Sockets {
    /// The handle's only socket (shared).
    main: Option<TcpListener>,
    /// Reuseport: one socket per slot.
    slots: HashMap<usize, TcpListener>,
    /// Round-robin: the socket the driver accepts on.
    accepting: Option<Accepting>,
}

/// Every listening socket of the primary.
#[derive(Debug)]
pub(crate) struct Listeners {
    policy: Policy,
    handles: HashMap<HandleKey, Sockets>,
    /// Connections accepted and not yet taken by the driver, in order.
    ready: VecDeque<(HandleKey, TcpStream)>,
}

/// The address a key asks for.
fn requested(key: &HandleKey) -> io::Result<SocketAddr> {
    let ip: IpAddr = key
        .address
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(SocketAddr::new(ip, key.port))
}

impl Listeners {
    pub(crate) fn new(policy: Policy) -> Self {
        Self {
            policy,
            handles: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// Binds a socket of `key` (`socket`: a reuseport slot's) at `address`, or at the
    /// key's own address. Returns the bound address or the errno.
    pub(crate) fn bind(
        &mut self,
        key: &HandleKey,
        socket: Option<usize>,
        address: Option<SocketAddr>,
        backlog: u32,
    ) -> Result<SocketAddr, i32> {
        let errno = |e: io::Error| e.raw_os_error().unwrap_or(libc::EINVAL);
        let reuse_port = self.policy == Policy::ReusePort;
        let address = match address {
            Some(address) => address,
            None => {
                let address = requested(key).map_err(errno)?;
                // The first socket of a reuseport handle on a fixed port: the port must
                // not belong to another program's group.
                if reuse_port && address.port() != 0 {
                    crate::net::check_unowned(address).map_err(errno)?;
                }
                address
            }
        };
        let listener = bind_listener(address, backlog, reuse_port).map_err(errno)?;
        let bound = listener.local_addr().map_err(errno)?;
        let sockets = self.handles.entry(key.clone()).or_default();
        match (self.policy, socket) {
            (Policy::RoundRobin, _) => {
                let listener = crate::sys::readable_listener(listener).map_err(errno)?;
                sockets.accepting = Some(Accepting {
                    listener,
                    paused: None,
                    errors: 0,
                });
            }
            (_, Some(slot)) => {
                sockets.slots.insert(slot, listener);
            }
            (_, None) => sockets.main = Some(listener),
        }
        Ok(bound)
    }

    /// A copy of a listening socket to send to a worker.
    pub(crate) fn copy(&self, key: &HandleKey, socket: Option<usize>) -> io::Result<OwnedFd> {
        let sockets = self.handles.get(key);
        let listener = match socket {
            Some(slot) => sockets.and_then(|s| s.slots.get(&slot)),
            None => sockets.and_then(|s| s.main.as_ref()),
        };
        let listener = listener.ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))?;
        Ok(listener.try_clone()?.into())
    }

    /// Closes every socket of `key`, now.
    pub(crate) fn close(&mut self, key: &HandleKey) {
        self.handles.remove(key);
        self.ready.retain(|(k, _)| k != key);
    }

    /// Whether any round-robin socket is open (so [`poll_accept`](Self::poll_accept) can
    /// ever be ready).
    pub(crate) fn accepts(&self) -> bool {
        !self.ready.is_empty() || self.handles.values().any(|s| s.accepting.is_some())
    }

    /// The next connection accepted on a round-robin handle. Each readiness of a socket
    /// drains up to [`ACCEPT_BATCH`] connections from its backlog. An accept error (out of
    /// descriptors, say) pauses that socket for [`ACCEPT_BACKOFF`] with one log line: the
    /// kernel keeps the backlog, and accepting resumes by itself once descriptors are free.
    pub(crate) fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<(HandleKey, TcpStream)> {
        if let Some(next) = self.ready.pop_front() {
            return Poll::Ready(next);
        }
        for (key, sockets) in &mut self.handles {
            let Some(accepting) = &mut sockets.accepting else {
                continue;
            };
            if let Some(paused) = &mut accepting.paused {
                if paused.as_mut().poll(cx).is_pending() {
                    continue;
                }
                accepting.paused = None;
            }
            accept_ready(key, accepting, &mut self.ready, cx);
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
    }
}

/// Accepts what one readiness of `accepting` offers, into `ready`.
fn accept_ready(
    key: &HandleKey,
    accepting: &mut Accepting,
    ready: &mut VecDeque<(HandleKey, TcpStream)>,
    cx: &mut Context<'_>,
) {
    let mut taken = 0;
    while taken < ACCEPT_BATCH {
        let Poll::Ready(Ok(mut guard)) = accepting.listener.poll_read_ready(cx) else {
            return;
        };
        match guard.try_io(|listener| listener.get_ref().accept()) {
            Ok(Ok((stream, _))) => {
                ready.push_back((key.clone(), stream));
                taken += 1;
            }
            Ok(Err(e)) => {
                // EMFILE and friends: pause instead of spinning; log once per pause.
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
