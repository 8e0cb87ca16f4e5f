//! The adapter's tests: Node's reference traces in and out, and what it refuses.

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

/// The reference trace (round-robin), both directions, field for field.
#[test]
fn round_robin_trace() {
    let mut w = NodeWorker::new();
    let key = HandleKey::loopback(0);
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
                key: HandleKey::loopback(index),
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

/// A hand-off whose descriptor the worker could not take (refused past Node's retries)
/// is its refusal, once; other dropped messages are not hand-offs.
#[test]
fn a_dropped_hand_off_is_a_refusal() {
    let mut w = NodeWorker::new();
    let key = HandleKey::loopback(0);
    let newconn = ToWorker::NewConn {
        key: key.clone(),
        seq: 5,
    };
    let sent = w.outgoing(&newconn);
    assert_eq!(
        w.dropped(&sent),
        Some(ToPrimary::Accepted {
            key,
            seq: 5,
            accepted: false
        })
    );
    assert_eq!(w.dropped(&sent), None, "refused once");
    let disconnect = w.outgoing(&ToWorker::Disconnect);
    assert_eq!(w.dropped(&disconnect), None);
}
