//! A worker's [`Listener`]: accepting on a socket, or under round-robin taking hand-offs
//! from its queue (`handoff_queue.rs`, held in the session's server table).

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::server_table::Popped;
use super::session::Session;
use crate::protocol::{HandleKey, ToPrimary};

#[derive(Debug)]
pub(crate) enum Kind {
    /// Round-robin: hand-offs wait in the server table; this wakes the listener.
    RoundRobin(Arc<Notify>),
    Socket(TcpListener),
}

/// The first pause after an accept fails for lack of resources; it doubles up to
/// [`MAX_ACCEPT_PAUSE`] and resets on the next success.
const ACCEPT_PAUSE: Duration = Duration::from_millis(10);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Whether an accept error passes by itself (descriptors or memory run out, or the
/// client gave up): wait and try again rather than fail the listener.
fn passes(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::ECONNABORTED)
    )
}

/// A listening server in a worker: yields accepted connections whatever the policy.
#[derive(Debug)]
pub struct Listener {
    key: HandleKey,
    address: SocketAddr,
    kind: Option<Kind>,
    session: Arc<Session>,
    /// Accept errors in a row that pass by themselves, for the pause and the log.
    shortages: u32,
}

impl Listener {
    pub(crate) fn new(
        key: HandleKey,
        address: SocketAddr,
        kind: Kind,
        session: Arc<Session>,
    ) -> Self {
        Self {
            key,
            address,
            kind: Some(kind),
            session,
            shortages: 0,
        }
    }

    /// The bound address (with the real port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }

    /// The primary's key for this listener's handle.
    pub fn key(&self) -> &HandleKey {
        &self.key
    }

    /// The next connection, or `Ok(None)` once the worker is stopping (and forever after).
    /// Under round-robin, taking a connection is what tells the primary it was accepted;
    /// once the worker stops, the connections already handed to it are still returned
    /// (they are its to serve: under a stop or an upgrade's hand-over its primary has no
    /// other worker to give them to), then `Ok(None)`; dropping the listener with some
    /// left hands them back to the primary for another worker.
    ///
    /// Out of descriptors or memory (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`), it does not
    /// fail and does not spin: it pauses (10 ms doubling to 1 s, one log line each time the
    /// count of errors doubles) while the kernel keeps the backlog, and goes on once
    /// resources are free. Other errors are returned.
    pub async fn accept(&mut self) -> io::Result<Option<TcpStream>> {
        let session = Arc::clone(&self.session);
        loop {
            match &self.kind {
                None => return Ok(None),
                Some(Kind::Socket(listener)) => {
                    let stop = session.stop_token();
                    if stop.is_cancelled() {
                        self.close();
                        return Ok(None);
                    }
                    // Accept first: a ready connection is taken without polling the stop
                    // token (no random branch order, no lock in the token per accept).
                    let accepted = tokio::select! {
                        biased;
                        accepted = listener.accept() => accepted,
                        () = stop.cancelled() => continue,
                    };
                    match accepted {
                        Ok((stream, _)) => {
                            self.shortages = 0;
                            return Ok(Some(stream));
                        }
                        Err(e) if passes(&e) => self.pause(&e, stop).await,
                        Err(e) => return Err(e),
                    }
                }
                Some(Kind::RoundRobin(arrived)) => {
                    // Waits from before the look: a hand-off or a stop after it wakes us.
                    let notified = arrived.notified();
                    let popped = session.table().pop_handoff(&self.key);
                    match popped {
                        Popped::Connection(seq, fd) => return self.take(seq, fd).map(Some),
                        Popped::Empty => notified.await,
                        Popped::Closed => {
                            drop(notified);
                            self.close();
                            return Ok(None);
                        }
                    }
                }
            }
        }
    }

    /// Takes a handed-off connection, and tells the primary whether it was accepted.
    fn take(&self, seq: u64, fd: OwnedFd) -> io::Result<TcpStream> {
        let stream = std::net::TcpStream::from(fd);
        let accepted = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        self.session.send_control(ToPrimary::Accepted {
            key: self.key.clone(),
            seq,
            accepted: accepted.is_ok(),
        });
        accepted
    }

    /// Waits out a shortage (see [`accept`](Listener::accept)), or until the worker stops.
    async fn pause(&mut self, error: &io::Error, stop: &tokio_util::sync::CancellationToken) {
        self.shortages = self.shortages.saturating_add(1);
        if self.shortages.is_power_of_two() {
            tracing::warn!(key = %self.key, %error, errors = self.shortages, "accept failed; pausing");
        }
        let pause = ACCEPT_PAUSE
            .saturating_mul(1 << (self.shortages - 1).min(7))
            .min(MAX_ACCEPT_PAUSE);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => {}
        }
    }

    /// While `refusing`, connections the primary hands to this listener are refused and
    /// go to another worker (Node refuses when `maxConnections` is reached). No effect on
    /// the shared and reuseport policies, where the kernel picks the acceptor.
    pub fn set_refusing(&self, refusing: bool) {
        if let Some(Kind::RoundRobin(_)) = &self.kind {
            let held = self.session.table().set_refusing(&self.key, refusing);
            self.session.refuse(&self.key, held);
        }
    }

    /// Stops listening: its index is free again, hand-offs not yet accepted go to other
    /// workers. Whether the worker is stopping, if the listener was still open.
    fn close(&mut self) -> Option<bool> {
        self.kind.take()?;
        Some(self.session.close(&self.key))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.close() == Some(false) {
            self.session.send_control(ToPrimary::Close {
                key: self.key.clone(),
            });
        }
    }
}
