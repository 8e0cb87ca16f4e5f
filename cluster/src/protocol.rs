//! The cluster protocol (crate-private): the messages a primary and its workers exchange on the `ipc`
//! control lane ([`ipc::Lane::Control`]), and the names they share.
//!
//! ```text
//!  worker                                   primary
//!    | -- Online --------------------------->  |
//!    | -- QueryServer { seq, address, .. } ->  |   binds or finds the handle
//!    | <- QueryReply { seq, Ok(..) | errno } - |   (+ a listening fd: shared, reuseport)
//!    | -- Listening { key, address } ------->  |
//!    | <- NewConn { key, seq } + fd ---------  |   round-robin only
//!    | <- NewConns { key, seqs } + fds ------  |   (several at once, one frame)
//!    | -- Accepted { seq, accepted } ------->  |
//!    | <- Disconnect ------------------------  |
//!    | -- Close { key } -------------------->  |   a server closed by the application
//!    | -- GoingDown { reason } ------------->  |   the worker panicked and is draining
//!    | -- Disconnecting -------------------->  |   the worker stops by itself
//!    | -- Ready ---------------------------->  |   ready to serve (`wait_ready`)
//! ```
//!
//! User messages travel on the user lane and are never decoded here.

use std::fmt;

/// How many servers (`listen` calls not closed) one worker may hold; a worker that asks
/// for more is treated as misbehaving: killed and replaced.
pub const MAX_SERVERS_PER_WORKER: usize = 128;

/// How many round-robin hand-offs one worker may have unanswered per server. Node has
/// one; with 8, hand-offs queued together go out as one frame (`NewConns`) and the
/// worker's replies as one write: httpd-demo rr took 25.4-28.2k new connections/s against
/// 22.0-25.0k with 4 (alternated rounds), and 16 measured no better. Workers take turns,
/// and one with half this many or more in flight beyond the least busy is passed over
/// (`scheduler.rs`): a stalled worker does not gather its whole window of connections
/// that another worker could have taken.
pub(crate) const HANDOFF_WINDOW: usize = 8;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::Endpoint;

/// A worker's id: unique within one primary, never reused (a replacement gets a new one).
/// Node's `worker.id` / `NODE_UNIQUE_ID`; ids start at 1. Only the primary makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkerId(pub(crate) u64);

impl WorkerId {
    /// The number, as in Node's `worker.id`.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The address family of a handle, as Node's `addressType`: `4`, `6`, or `-1` for a Unix
/// socket's path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AddressFamily {
    /// IPv4 (`4`).
    V4,
    /// IPv6 (`6`).
    V6,
    /// A Unix stream socket (`-1`): the key's `address` is its path.
    Unix,
}

impl AddressFamily {
    /// The family of `address`.
    pub fn of(address: &SocketAddr) -> Self {
        match address {
            SocketAddr::V4(_) => Self::V4,
            SocketAddr::V6(_) => Self::V6,
        }
    }
}

/// Which server a worker asked for: what identifies a listening handle in the primary
/// (Node's handle key), as [`Event::Listening`](crate::Event::Listening),
/// [`Event::ListenFailed`](crate::Event::ListenFailed) and
/// [`SlotFailure::Listen`](crate::SlotFailure::Listen) report it.
///
/// Read it with [`address`](Self::address), [`port`](Self::port),
/// [`family`](Self::family) and [`index`](Self::index); its fields are private, so Node's
/// encoding may change without changing this API. `Display` writes Node's spelling of the
/// key (`127.0.0.1:0:4:undefined:0`), for logs: do not parse it.
///
/// The port is the one asked for (0 for any), not the one bound (that is the
/// [`Endpoint`](crate::Endpoint) of `Event::Listening`). The index counts how many times
/// the worker already listened on the same address and port, so the first `listen(0)` of
/// every worker shares one handle (one port) and a second `listen(0)` in the same worker
/// gets another.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HandleKey {
    /// The address asked for, as text (`127.0.0.1`, `::`), or a Unix socket's path.
    pub(crate) address: String,
    /// The port asked for (0 for a Unix socket, which Node's key spells `-1`).
    pub(crate) port: u16,
    /// The address family.
    pub(crate) family: AddressFamily,
    /// An existing descriptor to listen on; always `None` from this crate's workers.
    pub(crate) fd: Option<i32>,
    /// How many earlier listens of the same worker share the other fields.
    pub(crate) index: u32,
}

impl HandleKey {
    /// The address asked for, as text (`127.0.0.1`, `::`), or a Unix socket's path.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The port asked for: 0 for any port (and for a Unix socket).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address family: IPv4, IPv6 or a Unix socket.
    pub fn family(&self) -> AddressFamily {
        self.family
    }

    /// How many earlier listens of the same worker asked for the same server (0 for the
    /// first): every worker's first `listen(0)` shares one port, its second another.
    pub fn index(&self) -> u32 {
        self.index
    }
}

#[cfg(test)]
impl HandleKey {
    /// The key of a worker's `index`th `listen(0, '127.0.0.1')`, for tests.
    pub(crate) fn loopback(index: u32) -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 0,
            family: AddressFamily::V4,
            fd: None,
            index,
        }
    }
}

impl fmt::Display for HandleKey {
    /// Node's spelling, `127.0.0.1:0:4:undefined:0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.family {
            AddressFamily::V4 => write!(f, "{}:{}:4:", self.address, self.port)?,
            AddressFamily::V6 => write!(f, "{}:{}:6:", self.address, self.port)?,
            AddressFamily::Unix => write!(f, "{}:-1:-1:", self.address)?,
        }
        match self.fd {
            Some(fd) => write!(f, "{fd}")?,
            None => f.write_str("undefined")?,
        }
        write!(f, ":{}", self.index)
    }
}

/// Worker to primary, on the control lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToPrimary {
    /// The worker is up and talking.
    Online,
    /// Asks for a listening handle.
    QueryServer {
        /// Matches the reply.
        seq: u64,
        /// The handle asked for.
        key: HandleKey,
        /// The listen backlog.
        backlog: u32,
    },
    /// The worker's server is listening on `address`.
    Listening {
        /// The handle.
        key: HandleKey,
        /// The bound address.
        address: Endpoint,
        /// Bound by the worker itself (`exclusive`), not granted by the primary.
        exclusive: bool,
    },
    /// The worker's answer to a [`ToWorker::NewConn`].
    Accepted {
        /// The handle.
        key: HandleKey,
        /// The hand-off's sequence number.
        seq: u64,
        /// Whether the worker took the connection.
        accepted: bool,
    },
    /// The application closed its server on `key`.
    Close {
        /// The handle.
        key: HandleKey,
    },
    /// The worker panicked: it stops accepting and drains; replace it now.
    GoingDown {
        /// The panic message.
        reason: String,
    },
    /// The application called [`crate::Worker::disconnect`]: it stops accepting, drains
    /// and exits; replace it now (not a crash, after the minimum uptime).
    Disconnecting,
    /// The application called [`crate::Worker::ready`] (Node's `process.send('ready')`).
    Ready,
}

/// What the primary gives back for a successful [`ToPrimary::QueryServer`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum Granted {
    /// Round-robin: the primary accepts and sends connections with `NewConn`.
    RoundRobin,
    /// A listening socket is attached; the worker accepts on it (shared and reuseport).
    Socket,
}

/// Primary to worker, on the control lane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// The answer to a `QueryServer`: the bound address, or a positive errno.
    QueryReply {
        /// The request's sequence number.
        seq: u64,
        /// Success and how connections arrive, or the `bind`/`listen` errno.
        result: Result<(Granted, Endpoint), i32>,
    },
    /// A connection for the handle `key`; its descriptor is attached.
    NewConn {
        /// The handle.
        key: HandleKey,
        /// Echoed in the worker's `Accepted`.
        seq: u64,
    },
    /// Stop accepting, finish in-flight work and exit.
    Disconnect,
    /// Several connections for the handle `key` in one frame, one descriptor per `seq`
    /// attached in order: what as many `NewConn`s say, in one `sendmsg`. The core never
    /// makes it; the driver's writer joins the hand-offs queued together for a worker.
    NewConns {
        /// The handle.
        key: HandleKey,
        /// Echoed one by one in the worker's `Accepted`s.
        seqs: Vec<u64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_key(address: &str, port: u16, fd: Option<i32>, index: u32, expected: &str) {
        let family = if address.contains(':') {
            AddressFamily::V6
        } else {
            AddressFamily::V4
        };
        let key = HandleKey {
            address: address.into(),
            port,
            family,
            fd,
            index,
        };
        assert_eq!(key.to_string(), expected);
    }

    #[test]
    fn keys_are_spelled_like_node() {
        check_key("127.0.0.1", 0, None, 0, "127.0.0.1:0:4:undefined:0");
        check_key("::", 8080, None, 1, ":::8080:6:undefined:1");
        check_key("0.0.0.0", 80, Some(7), 2, "0.0.0.0:80:4:7:2");
        let unix = HandleKey {
            address: "/tmp/app.sock".into(),
            port: 0,
            family: AddressFamily::Unix,
            fd: None,
            index: 0,
        };
        assert_eq!(unix.to_string(), "/tmp/app.sock:-1:-1:undefined:0");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn messages_round_trip_through_a_channel() {
        use std::os::fd::AsFd;
        let key = HandleKey {
            address: "127.0.0.1".into(),
            port: 0,
            family: AddressFamily::V4,
            fd: None,
            index: 0,
        };
        let (mut a, mut b) = ipc::Channel::pair().expect("pair");
        let messages = [
            ToPrimary::Online,
            ToPrimary::QueryServer {
                seq: 1,
                key: key.clone(),
                backlog: 511,
            },
            ToPrimary::Accepted {
                key: key.clone(),
                seq: 9,
                accepted: false,
            },
            ToPrimary::GoingDown {
                reason: "boom".into(),
            },
        ];
        for message in messages {
            a.send_control(&message, Vec::new()).await.expect("send");
            let received = b.recv().await.expect("recv").expect("message");
            assert_eq!(received.lane(), ipc::Lane::Control);
            assert_eq!(received.decode::<ToPrimary>().expect("decode"), message);
        }
        let reply = ToWorker::QueryReply {
            seq: 1,
            result: Err(libc::EADDRINUSE),
        };
        a.send_control(&reply, Vec::new()).await.expect("send");
        let received = b.recv().await.expect("recv").expect("message");
        assert_eq!(received.decode::<ToWorker>().expect("decode"), reply);
        // Several hand-offs in one frame: their descriptors arrive with it, in order.
        let (first, second) = (
            std::io::pipe().expect("pipe"),
            std::io::pipe().expect("pipe"),
        );
        let conns = ToWorker::NewConns {
            key,
            seqs: vec![3, 4],
        };
        let fds = [first.1.as_fd(), second.1.as_fd()];
        (a.sender().send_borrowed(ipc::Lane::Control, &conns, &fds))
            .await
            .expect("send");
        let mut received = b.recv().await.expect("recv").expect("message");
        assert_eq!(received.decode::<ToWorker>().expect("decode"), conns);
        let got = received.take_fds();
        assert_eq!(got.len(), 2);
        for (fd, (mut reader, _)) in got.into_iter().zip([first, second]) {
            use std::io::{Read, Write};
            std::fs::File::from(fd).write_all(b"x").expect("write");
            let mut byte = [0u8; 1];
            reader
                .read_exact(&mut byte)
                .expect("each pipe gets its own byte");
        }
    }
}
