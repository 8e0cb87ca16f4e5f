//! Node's cluster protocol as an adapter onto this crate's own ([`crate::protocol`]): the
//! `NODE_CLUSTER` internal messages an unmodified Node worker sends and expects, translated
//! to and from [`ToPrimary`] / [`ToWorker`] so that the same core supervises both kinds of
//! worker. Pure: no I/O; the driver keeps one [`NodeWorker`] per Node worker.
//!
//! ```text
//!  Node worker                                              core
//!  {act:'online'}                                      ->   Online
//!  {act:'queryServer', address, port, addressType,
//!   fd, index, backlog, seq}                           ->   QueryServer { seq, key }
//!  {errno:null|0|-98.., key, ack, data:null, sockname} <-   QueryReply { seq, result }
//!  {act:'listening', .., port: <bound>}                ->   Listening { key, address }
//!  NODE_HANDLE net.Native {act:'newconn', key, seq}    <-   NewConn { key, seq } + fd
//!  {ack, accepted}                                     ->   Accepted { key, seq, accepted }
//!  {act:'disconnect'}                                  <-   Disconnect
//!  {act:'close', key}                                  ->   Close { key }
//!  {act:'exitedAfterDisconnect'}                       ->   Disconnecting
//! ```
//!
//! Node's own `seq` of a `queryServer` is the core's `seq` (unique per worker), so a
//! reply's `ack` is the core's `seq`; likewise a hand-off's `seq` comes back as the
//! `accepted` message's `ack`. A `listen()` without a host (Node's `address: null`) asks
//! for `::`, as Node's primary binds it (dual-stack). A `listen(path)` (`addressType: -1`)
//! is a Unix socket the primary binds, served under round-robin like TCP, as Node's
//! primary does. UDP and `listen({fd})` are refused with a negative errno, which the Node
//! worker reports as a listen error.

use std::collections::HashMap;
use std::net::SocketAddr;

use ipc::InternalMessage;
use serde_json::{Value, json};

use crate::Endpoint;
use crate::protocol::{AddressFamily, Granted, HandleKey, ToPrimary, ToWorker};

/// The `cmd` of every cluster message.
pub(crate) const CLUSTER_CMD: &str = "NODE_CLUSTER";

/// How many queries one Node worker may have unanswered before it counts as misbehaving:
/// the protocol allows one query per server. Hand-offs are not counted here: the core keeps
/// at most [`HANDOFF_WINDOW`](crate::protocol::HANDOFF_WINDOW) (8) in flight per server,
/// and an `accepted` that answers none of them is malformed.
const MAX_PENDING: usize = 2 * crate::protocol::MAX_SERVERS_PER_WORKER;

/// What to do with a message from a Node worker.
#[derive(Debug, PartialEq)]
pub(crate) enum FromNode {
    /// Give it to the core.
    Message(ToPrimary),
    /// Answer the worker directly (a listen this primary cannot serve), core untouched.
    Reply(InternalMessage),
    /// Nothing for the core (an internal message of another Node subsystem).
    Ignore,
    /// The worker broke the protocol.
    Malformed(String),
}

/// What the primary knows of one Node worker's side of the protocol.
#[derive(Debug, Default)]
pub(crate) struct NodeWorker {
    /// The primary's own message counter for this worker (Node's `seq`).
    next_seq: u64,
    /// Unanswered queries: Node's `seq` -> the key asked for.
    queries: HashMap<u64, HandleKey>,
    /// Granted handles and the address each is bound to.
    granted: Vec<(HandleKey, Endpoint)>,
    /// Hand-offs sent and not yet answered: `seq` -> key.
    handoffs: HashMap<u64, HandleKey>,
}

impl NodeWorker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Translates a `NODE_CLUSTER` message from the worker.
    pub(crate) fn incoming(&mut self, message: &InternalMessage) -> FromNode {
        if message.cmd() != CLUSTER_CMD {
            return FromNode::Ignore;
        }
        let act = message.get("act").and_then(Value::as_str);
        match act {
            Some("online") => FromNode::Message(ToPrimary::Online),
            Some("queryServer") => self.query(message),
            Some("listening") => self.listening(message),
            Some("close") => {
                let Some(text) = message.get("key").and_then(Value::as_str) else {
                    return malformed("close without a key");
                };
                let Some(at) = self.granted.iter().position(|(k, _)| k.to_string() == text) else {
                    return FromNode::Ignore; // closed before it was granted, or twice
                };
                let (key, _) = self.granted.remove(at);
                FromNode::Message(ToPrimary::Close { key })
            }
            Some("exitedAfterDisconnect") => FromNode::Message(ToPrimary::Disconnecting),
            Some(_) => FromNode::Ignore,
            None => {
                let (Some(ack), Some(accepted)) = (
                    message.get("ack").and_then(Value::as_u64),
                    message.get("accepted").and_then(Value::as_bool),
                ) else {
                    return FromNode::Ignore;
                };
                match self.handoffs.remove(&ack) {
                    Some(key) => FromNode::Message(ToPrimary::Accepted {
                        key,
                        seq: ack,
                        accepted,
                    }),
                    None => malformed("accepted a connection that was not handed to it"),
                }
            }
        }
    }

    fn query(&mut self, message: &InternalMessage) -> FromNode {
        let Some(seq) = message.get("seq").and_then(Value::as_u64) else {
            return malformed("queryServer without a seq");
        };
        let key = match requested_key(message) {
            Ok(key) => key,
            Err(errno) => {
                let reply = self
                    .message()
                    .with("errno", -errno)
                    .with("key", node_key_text(message))
                    .with("ack", seq)
                    .with("data", Value::Null);
                return FromNode::Reply(reply);
            }
        };
        if self.queries.len() >= MAX_PENDING {
            return malformed("too many servers asked for at once");
        }
        // Node's primary listens with `backlog || 511`: a listen without one (the usual
        // `listen(port)`) sends none, and 0 would leave the rr socket a queue of one.
        let backlog = message
            .get("backlog")
            .and_then(Value::as_u64)
            .and_then(|b| u32::try_from(b).ok())
            .filter(|&b| b != 0)
            .unwrap_or(crate::worker::DEFAULT_BACKLOG);
        self.queries.insert(seq, key.clone());
        FromNode::Message(ToPrimary::QueryServer { seq, key, backlog })
    }

    fn listening(&mut self, message: &InternalMessage) -> FromNode {
        let Ok(asked) = requested_key(message) else {
            return FromNode::Ignore;
        };
        // `port` is now the bound port: match on everything else.
        let found = self.granted.iter().find(|(key, address)| {
            key.address == asked.address
                && key.family == asked.family
                && key.fd == asked.fd
                && key.index == asked.index
                && (key.port == asked.port || address.inet().map(|a| a.port()) == Some(asked.port))
        });
        match found {
            Some((key, address)) => FromNode::Message(ToPrimary::Listening {
                key: key.clone(),
                address: address.clone(),
                exclusive: false,
            }),
            None => FromNode::Ignore,
        }
    }

    /// A message that went to the worker with a descriptor which the worker could not
    /// take (it refused it past Node's retries: out of descriptors, say), so it never
    /// saw the message. A hand-off is its refusal: the connection goes to another worker.
    /// `None` for anything else (logged by the caller; the channel goes on).
    pub(crate) fn dropped(&mut self, message: &InternalMessage) -> Option<ToPrimary> {
        if message.get("act").and_then(Value::as_str) != Some("newconn") {
            return None;
        }
        let seq = message.get("seq").and_then(Value::as_u64)?;
        let key = self.handoffs.remove(&seq)?;
        Some(ToPrimary::Accepted {
            key,
            seq,
            accepted: false,
        })
    }

    /// Translates a message of the core for the worker. `NewConn` and a shared
    /// `QueryReply` go with their descriptor (sent as a `NODE_HANDLE` of type
    /// `net.Native`, which the channel does for a control message with a descriptor).
    pub(crate) fn outgoing(&mut self, message: &ToWorker) -> InternalMessage {
        match message {
            ToWorker::QueryReply { seq, result } => {
                let key = self.queries.remove(seq);
                let text = key.as_ref().map_or_else(String::new, HandleKey::to_string);
                let reply = self
                    .message()
                    .with("key", text)
                    .with("ack", *seq)
                    .with("data", Value::Null);
                match (result, key) {
                    (Ok((granted, address)), Some(key)) => {
                        self.granted.push((key, address.clone()));
                        match (granted, address) {
                            (Granted::RoundRobin, Endpoint::Inet(address)) => reply
                                .with("errno", Value::Null)
                                .with("sockname", sockname(address)),
                            // Node's primary sends no sockname for a pipe.
                            (Granted::RoundRobin, Endpoint::Unix(_)) => {
                                reply.with("errno", Value::Null)
                            }
                            (Granted::Socket, _) => reply.with("errno", 0),
                        }
                    }
                    (Ok(_), None) => reply.with("errno", -libc::EINVAL),
                    (Err(errno), _) => reply.with("errno", -errno.abs()),
                }
            }
            ToWorker::NewConn { key, seq } => {
                self.handoffs.insert(*seq, key.clone());
                // The hand-off's own seq: the worker answers with it as `ack`.
                InternalMessage::new(CLUSTER_CMD)
                    .expect("NODE_CLUSTER is an internal cmd")
                    .with("act", "newconn")
                    .with("key", key.to_string())
                    .with("seq", *seq)
            }
            ToWorker::Disconnect => self.message().with("act", "disconnect"),
            ToWorker::NewConns { .. } => {
                // Made only by the writer of a Rust worker's channel, after translation:
                // never for a Node worker, whose cluster code ignores an unknown act.
                debug_assert!(false, "NewConns is not Node's");
                self.message().with("act", "unsupported")
            }
        }
    }

    /// A new `NODE_CLUSTER` message with the next `seq`.
    fn message(&mut self) -> InternalMessage {
        let seq = self.next_seq;
        self.next_seq += 1;
        InternalMessage::new(CLUSTER_CMD)
            .expect("NODE_CLUSTER is an internal cmd")
            .with("seq", seq)
    }
}

/// Whether a Node worker's user message is `process.send('ready')`, PM2's word that the
/// worker is ready (see [`Settings::wait_ready`](crate::Settings::wait_ready)).
pub(crate) fn is_ready(message: &ipc::Received) -> bool {
    message.payload() == b"\"ready\""
}

fn malformed(reason: &str) -> FromNode {
    FromNode::Malformed(format!("node cluster protocol: {reason}"))
}

/// Node's `sockname` object: `{address, family, port}`.
fn sockname(address: &SocketAddr) -> Value {
    let family = match address {
        SocketAddr::V4(_) => "IPv4",
        SocketAddr::V6(_) => "IPv6",
    };
    json!({"address": address.ip().to_string(), "family": family, "port": address.port()})
}

/// The key a `queryServer` (or `listening`) asks for, or the errno to refuse it with.
fn requested_key(message: &InternalMessage) -> Result<HandleKey, i32> {
    let field = |name| message.get(name);
    if field("fd").is_some_and(|fd| !fd.is_null()) {
        return Err(libc::EINVAL); // a descriptor of the worker's, meaningless here
    }
    let address = field("address").and_then(Value::as_str);
    let (address, family) = match (field("addressType").and_then(Value::as_i64), address) {
        (Some(4), Some(address)) => (address.to_owned(), AddressFamily::V4),
        (Some(6), Some(address)) => (address.to_owned(), AddressFamily::V6),
        // No host: Node's primary binds `::` (dual-stack).
        (Some(4 | 6), None) => ("::".to_owned(), AddressFamily::V6),
        // `listen(path)`: Node sends `port: -1` and the path as given.
        (Some(-1), Some(path)) if !path.is_empty() => (path.to_owned(), AddressFamily::Unix),
        _ => return Err(libc::EAFNOSUPPORT), // udp4/udp6
    };
    let port = match family {
        AddressFamily::Unix => 0,
        AddressFamily::V4 | AddressFamily::V6 => {
            let port = field("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or(libc::EINVAL)?;
            if address.parse::<std::net::IpAddr>().is_err() {
                return Err(libc::EINVAL); // a host name: Node's worker resolves it first
            }
            port
        }
    };
    let index = field("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(0);
    Ok(HandleKey {
        address,
        port,
        family,
        fd: None,
        index,
    })
}

/// Node's own spelling of the key a query asks for, for a refusal.
fn node_key_text(message: &InternalMessage) -> String {
    let text = |name| match message.get(name) {
        None | Some(Value::Null) => match name {
            "address" => "null".to_owned(),
            _ => "undefined".to_owned(),
        },
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    format!(
        "{}:{}:{}:{}:{}",
        text("address"),
        text("port"),
        text("addressType"),
        text("fd"),
        text("index")
    )
}

#[cfg(test)]
mod tests;
