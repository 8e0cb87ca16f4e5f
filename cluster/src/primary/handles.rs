//! The primary's listening handles, one per [`HandleKey`], in the three policies.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::supervisor::Internal;
use crate::net::bind_listener;
use crate::protocol::{Granted, HandleKey, WorkerId};
use crate::scheduler::RoundRobinHandle;
use crate::settings::Policy;

/// A round-robin handle: the primary's accepting socket and its scheduler.
#[derive(Debug)]
pub(crate) struct RoundRobin {
    pub(crate) rr: RoundRobinHandle<std::net::TcpStream, WorkerId>,
    accept: JoinHandle<()>,
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        // The task owns the listening socket: aborting it closes the port.
        self.accept.abort();
    }
}

#[derive(Debug)]
pub(crate) enum Kind {
    RoundRobin(RoundRobin),
    /// One socket, a copy in every worker.
    Shared(std::net::TcpListener),
    /// One `SO_REUSEPORT` socket per slot, kept across the slot's restarts.
    ReusePort(HashMap<usize, std::net::TcpListener>),
}

/// One listening handle.
#[derive(Debug)]
pub(crate) struct Handle {
    pub(crate) address: SocketAddr,
    backlog: u32,
    /// Workers that listen on it (under round-robin, the scheduler has its own list).
    workers: HashSet<WorkerId>,
    pub(crate) kind: Kind,
}

/// The address a key asks for.
fn requested(key: &HandleKey) -> io::Result<SocketAddr> {
    let ip: IpAddr = key
        .address
        .parse()
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(SocketAddr::new(ip, key.port))
}

impl Handle {
    /// Binds a new handle for `key` under `policy`.
    pub(crate) fn open(
        policy: Policy,
        key: &HandleKey,
        backlog: u32,
        slot: usize,
        hold: Duration,
        internal: &mpsc::Sender<Internal>,
    ) -> io::Result<Handle> {
        let address = requested(key)?;
        let (kind, address) = match policy {
            Policy::RoundRobin => {
                let socket = bind_listener(address, backlog, false)?;
                let address = socket.local_addr()?;
                let listener = tokio::net::TcpListener::from_std(socket)?;
                let accept = tokio::spawn(accept_loop(key.clone(), listener, internal.clone()));
                let rr = RoundRobinHandle::new(hold);
                (Kind::RoundRobin(RoundRobin { rr, accept }), address)
            }
            Policy::Shared => {
                let socket = bind_listener(address, backlog, false)?;
                let address = socket.local_addr()?;
                (Kind::Shared(socket), address)
            }
            Policy::ReusePort => {
                let socket = bind_listener(address, backlog, true)?;
                let address = socket.local_addr()?;
                (Kind::ReusePort(HashMap::from([(slot, socket)])), address)
            }
        };
        Ok(Handle {
            address,
            backlog,
            workers: HashSet::new(),
            kind,
        })
    }

    /// Lets `worker` (of `slot`) listen: what to reply, with a socket for it if any.
    pub(crate) fn grant(
        &mut self,
        worker: WorkerId,
        slot: usize,
    ) -> io::Result<(Granted, Option<OwnedFd>)> {
        let granted = match &mut self.kind {
            Kind::RoundRobin(rr) => {
                rr.rr.add_worker(worker);
                (Granted::RoundRobin, None)
            }
            Kind::Shared(socket) => (Granted::Socket, Some(socket.try_clone()?.into())),
            Kind::ReusePort(sockets) => {
                let socket = match sockets.get(&slot) {
                    Some(socket) => socket.try_clone()?,
                    None => {
                        let socket = bind_listener(self.address, self.backlog, true)?;
                        let copy = socket.try_clone()?;
                        sockets.insert(slot, socket);
                        copy
                    }
                };
                (Granted::Socket, Some(socket.into()))
            }
        };
        self.workers.insert(worker);
        Ok(granted)
    }

    /// No new connections for `worker`, which is stopping; in-flight hand-offs stay.
    pub(crate) fn retire_worker(&mut self, worker: WorkerId) {
        if let Kind::RoundRobin(rr) = &mut self.kind {
            rr.rr.retire_worker(worker);
        }
    }

    /// `worker` is gone (or closed its server): its in-flight hand-off is queued again.
    pub(crate) fn remove_worker(&mut self, worker: WorkerId) {
        self.workers.remove(&worker);
        if let Kind::RoundRobin(rr) = &mut self.kind {
            rr.rr.remove_worker(worker);
        }
    }

    /// Whether no worker listens on it any more.
    pub(crate) fn is_unused(&self) -> bool {
        self.workers.is_empty()
    }

    /// Closes the socket of a slot that no longer exists (reuseport).
    pub(crate) fn drop_slot(&mut self, slot: usize) {
        if let Kind::ReusePort(sockets) = &mut self.kind {
            sockets.remove(&slot);
        }
    }

    /// The round-robin scheduler, if this is a round-robin handle.
    pub(crate) fn round_robin(
        &mut self,
    ) -> Option<&mut RoundRobinHandle<std::net::TcpStream, WorkerId>> {
        match &mut self.kind {
            Kind::RoundRobin(rr) => Some(&mut rr.rr),
            _ => None,
        }
    }
}

async fn accept_loop(
    key: HandleKey,
    listener: tokio::net::TcpListener,
    internal: mpsc::Sender<Internal>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let Ok(stream) = stream.into_std() else {
                    continue;
                };
                if internal
                    .send(Internal::Connection(key.clone(), stream))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(%key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
