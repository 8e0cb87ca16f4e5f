//! The driver's listening sockets, one entry per [`HandleKey`], and the round-robin
//! accept loops. What to bind and close is decided by the core; this only does it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::net::bind_listener;
use crate::protocol::HandleKey;
use crate::settings::Policy;

/// A connection accepted on a round-robin handle, for the driver.
pub(crate) type Accepted = (HandleKey, TcpStream);

/// How long an accept loop pauses after an error (EMFILE and friends) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Default)]
struct Sockets {
    /// The handle's only socket (shared), or `None` under round-robin (the accept loop
    /// owns it) and reuseport.
    main: Option<TcpListener>,
    /// Reuseport: one socket per slot.
    slots: HashMap<usize, TcpListener>,
    /// Round-robin: the task accepting on the handle's socket.
    accept: Option<JoinHandle<()>>,
}

impl Drop for Sockets {
    fn drop(&mut self) {
        // The accept task owns the round-robin socket: aborting it closes the port.
        if let Some(accept) = &self.accept {
            accept.abort();
        }
    }
}

/// Every listening socket of the primary.
#[derive(Debug)]
pub(crate) struct Listeners {
    policy: Policy,
    handles: HashMap<HandleKey, Sockets>,
    accepted: mpsc::Sender<Accepted>,
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
    /// Round-robin accept loops send their connections to `accepted`.
    pub(crate) fn new(policy: Policy, accepted: mpsc::Sender<Accepted>) -> Self {
        Self {
            policy,
            handles: HashMap::new(),
            accepted,
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
                let listener = tokio::net::TcpListener::from_std(listener).map_err(errno)?;
                let task = accept_loop(key.clone(), listener, self.accepted.clone());
                sockets.accept = Some(tokio::spawn(task));
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

    /// Closes every socket of `key`.
    pub(crate) fn close(&mut self, key: &HandleKey) {
        self.handles.remove(key);
    }

    /// Closes one reuseport slot's socket of `key`.
    pub(crate) fn close_slot(&mut self, key: &HandleKey, slot: usize) {
        if let Some(sockets) = self.handles.get_mut(key) {
            sockets.slots.remove(&slot);
        }
    }
}

async fn accept_loop(
    key: HandleKey,
    listener: tokio::net::TcpListener,
    accepted: mpsc::Sender<Accepted>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                if accepted.send((key.clone(), stream)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%key, error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}
