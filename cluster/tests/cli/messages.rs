//! User messages between `Primary` and an unmodified Node worker: `process.send` arrives as
//! `Event::Message` (JSON), `Primary::send` reaches `process.on('message')`.

use std::time::Duration;

use cluster::{Event, Primary, Settings};
use serde_json::{Value, json};

use crate::{node_or_skip, node_script};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn next_message(primary: &mut Primary) -> (cluster::WorkerId, Value) {
    loop {
        let event = tokio::time::timeout(TIMEOUT, primary.next_event())
            .await
            .expect("an event in time")
            .expect("events go on");
        if let Event::Message { id, message } = event {
            return (id, message.decode::<Value>().expect("a JSON message"));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_worker_talks_json_both_ways() {
    if !node_or_skip() {
        return;
    }
    let settings = Settings::new()
        .node("node")
        .program(node_script("http_server.js"))
        .args(["0"])
        .workers(1)
        .silent(true)
        .inherit_listeners(false);
    let mut primary = Primary::start(settings).await.expect("start");
    let (id, hello) = next_message(&mut primary).await;
    let pid = hello["hello"].as_u64().expect("hello with a pid");
    primary
        .send(id, &json!({"ping": [1, "two"]}))
        .await
        .expect("send");
    let (from, echo) = next_message(&mut primary).await;
    assert_eq!(from, id);
    assert_eq!(echo, json!({"echo": {"ping": [1, "two"]}, "pid": pid}));
    primary.stop().await.expect("stop");
    loop {
        match primary.next_event().await {
            Some(Event::Exit {
                id: exited,
                exited_after_disconnect,
                status,
                ..
            }) if exited == id => {
                assert!(exited_after_disconnect, "{status}");
                assert_eq!(status.code(), Some(0), "{status}");
                break;
            }
            Some(_) => {}
            None => panic!("no exit event"),
        }
    }
}
