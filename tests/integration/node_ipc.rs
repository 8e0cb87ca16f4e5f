//! Node's own IPC protocol against real Node 20 processes: a Rust parent with a Node child
//! (`tests/node/peer.js`), and a Node parent (`tests/node/drive_rust.js`) with a Rust child
//! (`node_peer`). Skipped, with a message, when `node` is not installed.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

use child::{Child, ForkOptions, Format, HandleType};
use serde_json::{Value, json};

fn node_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("node")
        .join(name)
}

/// Whether Node is there; says why a test is skipped when it is not.
fn have_node() -> bool {
    let ok = testkit::node_available();
    if !ok {
        eprintln!(
            "skipped: node is not installed ({})",
            testkit::NODE_INSTALL_HINT
        );
    }
    ok
}

/// Forks `node tests/node/peer.js` with a JSON channel, as Node's `fork` does.
fn node_peer() -> Child {
    node_peer_with(ipc::Config::new())
}

/// [`node_peer`] with this side's channel limits.
fn node_peer_with(config: ipc::Config) -> Child {
    let options = ForkOptions::new()
        .serialization(Format::Json)
        .exec_path("node")
        .map_spawn_options(|o| o.kill_on_drop(true).channel_config(config));
    child::fork(node_script("peer.js"), child::NO_ARGS, options).expect("fork node")
}

async fn next(child: &mut Child) -> (Value, Vec<OwnedFd>) {
    let mut msg = child.recv().await.expect("recv").expect("a message");
    let value = msg.decode().expect("json");
    (value, msg.take_fds())
}

#[tokio::test]
async fn a_node_child_echoes_nested_unicode_newlines_and_a_mebibyte() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let big = "é\n\"".repeat(350_000);
    for m in [
        json!({"op": "echo", "nested": {"a": [1, {"b": null, "c": true}]}, "s": "☃ \u{2028}\nline"}),
        json!({"op": "echo", "big": big}),
    ] {
        peer.send(&m).await.unwrap();
        assert_eq!(next(&mut peer).await.0, m);
    }
    peer.disconnect().unwrap();
    assert!(
        peer.wait().await.unwrap().success(),
        "node exits once disconnected"
    );
}

/// How deep `value` nests arrays.
fn array_depth(mut value: &Value) -> usize {
    let mut depth = 0;
    while let Some(inner) = value.as_array().and_then(|a| a.first()) {
        depth += 1;
        value = inner;
    }
    depth
}

#[tokio::test]
async fn lone_surrogates_and_a_thousand_levels_pass_between_node_and_rust() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    peer.send(&json!({"op": "odd", "depth": 1000}))
        .await
        .unwrap();
    let (odd, _) = next(&mut peer).await;
    assert_eq!(odd["lone"], "a\u{fffd}b");
    assert_eq!(odd["pair"], "\u{1f600}");
    assert_eq!(odd["low"], "\u{fffd}");
    assert_eq!(array_depth(&odd["deep"]), 1000);
    // Back to Node, which counts the levels, and round again.
    let deep = odd["deep"].clone();
    peer.send(&json!({"op": "depth", "deep": deep}))
        .await
        .unwrap();
    assert_eq!(
        next(&mut peer).await.0,
        json!({"op": "depth", "depth": 1000})
    );
    peer.send(&json!({"op": "echo", "deep": deep, "lone": odd["lone"]}))
        .await
        .unwrap();
    let (echoed, _) = next(&mut peer).await;
    assert_eq!(array_depth(&echoed["deep"]), 1000);
    assert_eq!(echoed["lone"], "a\u{fffd}b");
    peer.disconnect().unwrap();
    assert!(peer.wait().await.unwrap().success());
}

#[tokio::test]
async fn ten_thousand_messages_each_way_with_a_node_child() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let mut channel = peer.take_channel().unwrap();
    let tx = channel.sender();
    for i in 0..10_000u64 {
        tx.feed(ipc::Lane::User, &json!({"op": "echo", "i": i}), Vec::new())
            .await
            .unwrap();
    }
    tx.flush().await.unwrap();
    let mut sum = 0;
    for _ in 0..10_000 {
        let msg = channel.recv().await.unwrap().unwrap();
        sum += msg.decode::<Value>().unwrap()["i"].as_u64().unwrap();
    }
    assert_eq!(sum, 9_999 * 10_000 / 2);
    channel
        .send(&json!({"op": "burst", "n": 10_000}))
        .await
        .unwrap();
    let mut got = 0;
    loop {
        let m: Value = channel.recv().await.unwrap().unwrap().decode().unwrap();
        if m["op"] == "burst-done" {
            assert_eq!(m["sum"].as_u64(), Some(got));
            break;
        }
        got += m["i"].as_u64().unwrap();
    }
    drop(channel);
    assert!(peer.wait().await.unwrap().success());
}

#[tokio::test]
async fn a_listening_socket_passed_to_node_serves_a_connection() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    peer.send_with_fds(&json!({"op": "listen"}), vec![listener.into()])
        .await
        .unwrap();
    assert_eq!(next(&mut peer).await.0["op"], "listening");
    let mut client = TcpStream::connect(addr).unwrap();
    client.write_all(b"ping").unwrap();
    let mut text = String::new();
    client.read_to_string(&mut text).unwrap();
    assert_eq!(text, "pong:ping");
}

#[tokio::test]
async fn a_connected_socket_passed_to_node_is_written_to() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut theirs, _) = listener.accept().unwrap();
    peer.send_with_fds(&json!({"op": "socket"}), vec![ours.into()])
        .await
        .unwrap();
    assert_eq!(next(&mut peer).await.0["op"], "wrote");
    let mut text = String::new();
    theirs.read_to_string(&mut text).unwrap();
    assert_eq!(text, "hello from node\n");
}

#[tokio::test]
async fn a_hundred_handles_each_way_with_a_node_child() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // All 100 are queued behind the first one's ACK, which recv reads.
    for i in 0..100 {
        let fd = OwnedFd::from(listener.try_clone().unwrap());
        peer.send_with_fds(&json!({"op": "count", "i": i}), vec![fd])
            .await
            .unwrap();
    }
    for i in 0..100 {
        let (m, _) = next(&mut peer).await;
        assert_eq!(m, json!({"op": "counted", "i": i, "handles": i + 1}));
    }
    peer.send(&json!({"op": "give", "n": 100})).await.unwrap();
    let mut last = None;
    for i in 0..100 {
        let mut msg = peer.recv().await.unwrap().unwrap();
        assert_eq!(msg.handle_type(), Some(HandleType::NetServer));
        assert_eq!(msg.decode::<Value>().unwrap()["i"], i);
        last = msg.take_fds().pop();
        assert!(last.is_some(), "message {i} came with its handle");
    }
    let (done, _) = next(&mut peer).await;
    assert_eq!(done["op"], "given-done");
    // The last copy is Node's listening socket.
    let listener = TcpListener::from(last.unwrap());
    assert_eq!(
        u64::from(listener.local_addr().unwrap().port()),
        done["port"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn handles_sent_eight_at_a_time_reach_node_each_with_its_message() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer_with(ipc::Config::new().handles_in_flight(8));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // Handles go out without waiting for each ACK; plain messages between them keep
    // their place in the stream.
    for i in 0..100 {
        let fd = OwnedFd::from(listener.try_clone().unwrap());
        peer.send_with_fds(&json!({"op": "count", "i": i}), vec![fd])
            .await
            .unwrap();
        if i % 10 == 0 {
            peer.send(&json!({"op": "echo", "after": i})).await.unwrap();
        }
    }
    for i in 0..100 {
        let (m, _) = next(&mut peer).await;
        assert_eq!(m, json!({"op": "counted", "i": i, "handles": i + 1}));
        if i % 10 == 0 {
            assert_eq!(next(&mut peer).await.0, json!({"op": "echo", "after": i}));
        }
    }
}

#[tokio::test]
async fn node_disconnecting_or_crashing_ends_the_stream_cleanly() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    peer.send(&json!({"op": "disconnect"})).await.unwrap();
    assert!(peer.recv().await.unwrap().is_none());
    assert!(peer.wait().await.unwrap().success());

    let mut peer = node_peer();
    peer.send(&json!({"op": "crash"})).await.unwrap();
    // Some items may get out before the exit; then the end of the stream, never a hang.
    while let Ok(Some(msg)) = peer.recv().await {
        assert_eq!(msg.decode::<Value>().unwrap()["op"], "item");
    }
    assert_eq!(peer.wait().await.unwrap().code(), Some(7));
}

#[tokio::test]
async fn a_parent_that_only_sends_after_a_handle_never_blocks() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // The common job-queue shape: a handle, then only sends, never a recv. Node's ACK must
    // be read by the sender itself, or send 1025 waits for it forever.
    let sends = async {
        peer.send_with_fds(&json!({"op": "count", "i": 0}), vec![listener.into()])
            .await
            .unwrap();
        for i in 0..10_000 {
            peer.send(&json!({"op": "sink", "i": i})).await.unwrap();
        }
        peer.send(&json!({"op": "sunk"})).await.unwrap();
    };
    tokio::time::timeout(std::time::Duration::from_secs(60), sends)
        .await
        .expect("no send blocks");
    // What Node said meanwhile was kept, in order.
    assert_eq!(
        next(&mut peer).await.0,
        json!({"op": "counted", "i": 0, "handles": 1})
    );
    assert_eq!(next(&mut peer).await.0, json!({"op": "sunk", "n": 10_000}));
}

#[tokio::test]
async fn sending_to_a_dead_node_child_fails_at_once() {
    if !have_node() {
        return;
    }
    let mut peer = node_peer();
    let mut channel = peer.take_channel().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    channel
        .send_with_fds(&json!({"op": "count", "i": 0}), vec![listener.into()])
        .await
        .unwrap();
    // Held behind the handle until its ACK, which nobody receives: `send` reads it.
    channel.send(&json!({"op": "crash"})).await.unwrap();
    let exited = tokio::time::timeout(std::time::Duration::from_secs(20), peer.wait())
        .await
        .expect("node got the message sent after the handle, and exited");
    assert_eq!(exited.unwrap().code(), Some(7));
    let send = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        channel.send(&json!({"op": "sink"})),
    )
    .await
    .expect("a send to a dead child does not wait");
    assert!(matches!(send, Err(ipc::Error::Closed)), "{send:?}");
}

/// Runs one scenario of `tests/node/drive_rust.js` against the `node_peer` binary.
#[track_caller]
fn check_node_parent(scenario: &str) {
    if !have_node() {
        return;
    }
    let mut cmd = std::process::Command::new("node");
    cmd.arg(node_script("drive_rust.js"))
        .args([env!("CARGO_BIN_EXE_node_peer"), scenario])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = testkit::KillOnDrop::spawn(&mut cmd)
        .expect("spawn node")
        .wait_with_output()
        .expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("ok {scenario}")),
        "{scenario}: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn node_parent_rust_child_echo() {
    check_node_parent("echo");
}

#[test]
fn node_parent_rust_child_ten_thousand_each_way() {
    check_node_parent("many");
}

#[test]
fn node_parent_passes_a_listening_socket_the_rust_child_accepts_on() {
    check_node_parent("listen");
}

#[test]
fn node_parent_passes_a_connected_socket() {
    check_node_parent("socket");
}

#[test]
fn node_parent_and_rust_child_pass_a_hundred_handles_each_way() {
    check_node_parent("handles");
}

#[test]
fn the_rust_child_disconnects_and_node_sees_it() {
    check_node_parent("disconnect");
}

#[test]
fn the_rust_child_crashes_mid_stream() {
    check_node_parent("crash");
}

#[test]
fn node_spawn_with_an_ipc_slot_reaches_the_rust_child() {
    check_node_parent("spawn");
}
