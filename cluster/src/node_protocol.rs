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

/// How many hand-offs and queries one worker may have unanswered; the protocol allows one
/// hand-off in flight per server and one query per server, so more is misbehaving.
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
mod tests {
    use super::*;

    fn node(line: &str) -> InternalMessage {
        InternalMessage::from_value(serde_json::from_str(line).expect("json")).expect("internal")
    }

    fn json_of(message: &InternalMessage) -> Value {
        message.clone().into_value()
    }

    #[track_caller]
    fn check_in(worker: &mut NodeWorker, line: &str, expected: FromNode) {
        assert_eq!(worker.incoming(&node(line)), expected);
    }

    #[track_caller]
    fn check_out(worker: &mut NodeWorker, message: ToWorker, expected: &str) {
        let expected: Value = serde_json::from_str(expected).expect("json");
        assert_eq!(json_of(&worker.outgoing(&message)), expected);
    }

    fn loopback_key(index: u32) -> HandleKey {
        HandleKey {
            address: "127.0.0.1".into(),
            port: 0,
            family: AddressFamily::V4,
            fd: None,
            index,
        }
    }

    /// The reference trace (round-robin), both directions, field for field.
    #[test]
    fn round_robin_trace() {
        let mut w = NodeWorker::new();
        let key = loopback_key(0);
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#,
            FromNode::Message(ToPrimary::Online),
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"data":null,"address":"127.0.0.1","port":0,"addressType":4,"flags":0,"backlog":0,"seq":1}"#,
            FromNode::Message(ToPrimary::QueryServer {
                seq: 1,
                key: key.clone(),
                backlog: crate::worker::DEFAULT_BACKLOG,
            }),
        );
        let bound: Endpoint = "127.0.0.1:43399".parse().unwrap();
        check_out(
            &mut w,
            ToWorker::QueryReply {
                seq: 1,
                result: Ok((Granted::RoundRobin, bound.clone())),
            },
            r#"{"cmd":"NODE_CLUSTER","errno":null,"key":"127.0.0.1:0:4:undefined:0","ack":1,"data":null,"sockname":{"address":"127.0.0.1","family":"IPv4","port":43399},"seq":0}"#,
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"data":null,"address":"127.0.0.1","port":43399,"addressType":4,"flags":0,"backlog":0,"seq":2}"#,
            FromNode::Message(ToPrimary::Listening {
                key: key.clone(),
                address: bound,
                exclusive: false,
            }),
        );
        check_out(
            &mut w,
            ToWorker::NewConn {
                key: key.clone(),
                seq: 1,
            },
            r#"{"cmd":"NODE_CLUSTER","act":"newconn","key":"127.0.0.1:0:4:undefined:0","seq":1}"#,
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","ack":1,"accepted":true,"seq":3}"#,
            FromNode::Message(ToPrimary::Accepted {
                key: key.clone(),
                seq: 1,
                accepted: true,
            }),
        );
        check_out(
            &mut w,
            ToWorker::Disconnect,
            r#"{"cmd":"NODE_CLUSTER","act":"disconnect","seq":1}"#,
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"close","key":"127.0.0.1:0:4:undefined:0","seq":4}"#,
            FromNode::Message(ToPrimary::Close { key }),
        );
    }

    #[test]
    fn shared_handles_answer_errno_zero() {
        let mut w = NodeWorker::new();
        w.incoming(&node(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"127.0.0.1","port":8080,"addressType":4,"seq":3}"#,
        ));
        let bound = "127.0.0.1:8080".parse().unwrap();
        check_out(
            &mut w,
            ToWorker::QueryReply {
                seq: 3,
                result: Ok((Granted::Socket, bound)),
            },
            r#"{"cmd":"NODE_CLUSTER","errno":0,"key":"127.0.0.1:8080:4:undefined:0","ack":3,"data":null,"seq":0}"#,
        );
    }

    #[test]
    fn errors_are_negative_errnos() {
        let mut w = NodeWorker::new();
        w.incoming(&node(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"127.0.0.1","port":80,"addressType":4,"seq":1}"#,
        ));
        check_out(
            &mut w,
            ToWorker::QueryReply {
                seq: 1,
                result: Err(libc::EADDRINUSE),
            },
            r#"{"cmd":"NODE_CLUSTER","errno":-98,"key":"127.0.0.1:80:4:undefined:0","ack":1,"data":null,"seq":0}"#,
        );
        // A refused key is forgotten: its `listening` is not believed.
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"address":"127.0.0.1","port":80,"addressType":4,"seq":2}"#,
            FromNode::Ignore,
        );
    }

    #[test]
    fn listen_without_a_host_asks_for_the_dual_stack_address() {
        let mut w = NodeWorker::new();
        let key = HandleKey {
            address: "::".into(),
            port: 0,
            family: AddressFamily::V6,
            fd: None,
            index: 1,
        };
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":1,"address":null,"port":0,"addressType":4,"backlog":64,"seq":5}"#,
            FromNode::Message(ToPrimary::QueryServer {
                seq: 5,
                key: key.clone(),
                backlog: 64,
            }),
        );
        let bound: Endpoint = "[::]:40000".parse().unwrap();
        let reply = w.outgoing(&ToWorker::QueryReply {
            seq: 5,
            result: Ok((Granted::RoundRobin, bound.clone())),
        });
        assert_eq!(reply.get("key"), Some(&json!(":::0:6:undefined:1")));
        assert_eq!(
            reply.get("sockname"),
            Some(&json!({"address": "::", "family": "IPv6", "port": 40000}))
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"listening","index":1,"address":null,"port":40000,"addressType":4,"seq":6}"#,
            FromNode::Message(ToPrimary::Listening {
                key,
                address: bound,
                exclusive: false,
            }),
        );
    }

    #[test]
    fn a_unix_path_is_a_handle_like_any_other() {
        let mut w = NodeWorker::new();
        let key = HandleKey {
            address: "/tmp/s.sock".into(),
            port: 0,
            family: AddressFamily::Unix,
            fd: None,
            index: 0,
        };
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"/tmp/s.sock","port":-1,"addressType":-1,"backlog":511,"seq":1}"#,
            FromNode::Message(ToPrimary::QueryServer {
                seq: 1,
                key: key.clone(),
                backlog: 511,
            }),
        );
        let bound = Endpoint::Unix("/tmp/s.sock".into());
        // Node's primary sends no sockname for a pipe.
        check_out(
            &mut w,
            ToWorker::QueryReply {
                seq: 1,
                result: Ok((Granted::RoundRobin, bound.clone())),
            },
            r#"{"cmd":"NODE_CLUSTER","errno":null,"key":"/tmp/s.sock:-1:-1:undefined:0","ack":1,"data":null,"seq":0}"#,
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"listening","index":0,"address":"/tmp/s.sock","port":-1,"addressType":-1,"seq":2}"#,
            FromNode::Message(ToPrimary::Listening {
                key,
                address: bound,
                exclusive: false,
            }),
        );
    }

    #[test]
    fn udp_and_descriptors_are_refused_without_the_core() {
        let mut w = NodeWorker::new();
        let FromNode::Reply(reply) = w.incoming(&node(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":"0.0.0.0","port":53,"addressType":"udp4","seq":2}"#,
        )) else {
            panic!("a direct reply");
        };
        assert_eq!(
            json_of(&reply),
            json!({"cmd":"NODE_CLUSTER","errno":-libc::EAFNOSUPPORT,"key":"0.0.0.0:53:udp4:undefined:0","ack":2,"data":null,"seq":0})
        );
        let FromNode::Reply(reply) = w.incoming(&node(
            r#"{"cmd":"NODE_CLUSTER","act":"queryServer","index":0,"address":null,"port":0,"addressType":4,"fd":7,"seq":3}"#,
        )) else {
            panic!("a direct reply");
        };
        assert_eq!(reply.get("errno"), Some(&json!(-libc::EINVAL)));
    }

    #[test]
    fn what_is_not_for_the_core() {
        let mut w = NodeWorker::new();
        check_in(&mut w, r#"{"cmd":"NODE_DEBUG_THING"}"#, FromNode::Ignore);
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"somethingNew","seq":0}"#,
            FromNode::Ignore,
        );
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"exitedAfterDisconnect","seq":1}"#,
            FromNode::Message(ToPrimary::Disconnecting),
        );
        assert!(matches!(
            w.incoming(&node(
                r#"{"cmd":"NODE_CLUSTER","ack":9,"accepted":true,"seq":2}"#
            )),
            FromNode::Malformed(_)
        ));
        // A close of a key never granted is nothing.
        check_in(
            &mut w,
            r#"{"cmd":"NODE_CLUSTER","act":"close","key":"x","seq":3}"#,
            FromNode::Ignore,
        );
    }

    #[test]
    fn second_listen_of_a_worker_gets_its_own_key() {
        let mut w = NodeWorker::new();
        for (seq, index) in [(1, 0), (2, 1)] {
            let line = format!(
                r#"{{"cmd":"NODE_CLUSTER","act":"queryServer","index":{index},"address":"127.0.0.1","port":0,"addressType":4,"seq":{seq}}}"#
            );
            check_in(
                &mut w,
                &line,
                FromNode::Message(ToPrimary::QueryServer {
                    seq,
                    key: loopback_key(index),
                    backlog: crate::worker::DEFAULT_BACKLOG,
                }),
            );
        }
        let reply = w.outgoing(&ToWorker::QueryReply {
            seq: 2,
            result: Ok((Granted::RoundRobin, "127.0.0.1:2000".parse().unwrap())),
        });
        assert_eq!(reply.get("key"), Some(&json!("127.0.0.1:0:4:undefined:1")));
    }
}
