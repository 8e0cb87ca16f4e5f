//! Node's test-cluster-* behaviours: events, exit states, listen semantics, refusals.

use std::collections::HashMap;

use ::cluster::{Event, Policy, Primary, Signal};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{expect, listening, next_exit, request, runtime, settings, worker_of};

/// The events of one worker, by kind, in order.
async fn lifecycle_of(primary: &mut Primary) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    loop {
        let event = expect(primary, Some).await;
        kinds.push(match event {
            Event::Fork { .. } => "fork",
            Event::Online { .. } => "online",
            Event::Listening { .. } => "listening",
            Event::Disconnect { .. } => "disconnect",
            Event::Exit { .. } => {
                kinds.push("exit");
                return kinds;
            }
            _ => "other",
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_come_in_order_and_a_disconnected_worker_exited_after_disconnect() {
    let mut primary = Primary::start(settings(1)).await.expect("start");
    let [(id, _)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    primary.disconnect(id).await.expect("disconnect");
    let (status, after) = next_exit(&mut primary).await;
    assert_eq!((status.code(), after), (Some(0), true));

    // The whole sequence, for a fresh worker.
    let mut primary = Primary::start(settings(1)).await.expect("start");
    let first = async {
        let mut kinds = Vec::new();
        while kinds.last() != Some(&"listening") {
            let event = expect(&mut primary, Some).await;
            kinds.push(match event {
                Event::Fork { .. } => "fork",
                Event::Online { .. } => "online",
                Event::Listening { .. } => "listening",
                _ => "other",
            });
        }
        kinds
    }
    .await;
    assert_eq!(first, ["fork", "online", "listening"]);
    primary.disconnect_all().await.expect("disconnect");
    assert_eq!(lifecycle_of(&mut primary).await, ["disconnect", "exit"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exiting_with_42_reports_42() {
    let settings = settings(1).env("CLUSTER_APP_MODE", "exit:42");
    let mut primary = Primary::start(settings).await.expect("start");
    assert_eq!(
        lifecycle_of(&mut primary).await,
        ["fork", "online", "disconnect", "exit"]
    );
    let mut primary = Primary::start(super::settings(1).env("CLUSTER_APP_MODE", "exit:42"))
        .await
        .expect("start");
    let (status, after) = next_exit(&mut primary).await;
    assert_eq!((status.code(), after), (Some(42), false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_reports_its_signal_and_exited_after_disconnect_like_node() {
    // Node's worker.kill(): disconnect first, then the signal; exitedAfterDisconnect is
    // true and the worker is not replaced.
    let mut primary = Primary::start(settings(1)).await.expect("start");
    let [(id, _)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    primary.kill(id, Signal::SIGKILL).await.expect("kill");
    let (status, after) = next_exit(&mut primary).await;
    assert_eq!((status.signal(), after), (Some(Signal::SIGKILL), true));
    assert!(primary.stats().await.expect("stats").workers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_waits_for_in_flight_connections() {
    let mut primary = Primary::start(settings(1)).await.expect("start");
    let [(id, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = lines.next_line().await.expect("read").expect("greeting");
    assert_eq!(worker_of(&greeting).expect("id"), id.get());
    primary.disconnect(id).await.expect("disconnect");
    // The worker is draining: it still finishes this connection.
    write.write_all(b"late\n").await.expect("write");
    let echo = lines.next_line().await.expect("read");
    assert_eq!(echo.as_deref(), Some("echo late"));
    let (status, after) = next_exit(&mut primary).await;
    assert_eq!((status.code(), after), (Some(0), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_zero_shares_the_first_port_and_a_second_listen_gets_another() {
    let settings = settings(2).env("CLUSTER_APP_MODE", "double");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut by_index: HashMap<u32, Vec<u16>> = HashMap::new();
    for _ in 0..4 {
        let (index, port) = expect(&mut primary, |e| match e {
            Event::Listening { key, address, .. } => {
                Some((key.index(), address.inet().expect("a TCP address").port()))
            }
            _ => None,
        })
        .await;
        by_index.entry(index).or_default().push(port);
    }
    let (first, second) = (&by_index[&0], &by_index[&1]);
    assert_eq!((first.len(), second.len()), (2, 2));
    assert_eq!(
        first[0], first[1],
        "every worker's first listen(0) shares a port"
    );
    assert_eq!(second[0], second[1], "so does every worker's second");
    assert_ne!(first[0], second[0], "a second listen(0) gets another port");
}

#[track_caller]
fn check_address_in_use(policy: Policy) {
    runtime().block_on(async {
        let mut first = Primary::start(settings(1).policy(policy))
            .await
            .expect("start");
        let [(_, address)] = listening(&mut first, 1).await[..] else {
            unreachable!()
        };
        let settings = settings(1)
            .policy(policy)
            .env("CLUSTER_APP_LISTEN", address.to_string());
        let mut second = Primary::start(settings).await.expect("start");
        let message = expect(&mut second, |e| match e {
            Event::Message { message, .. } => message.decode::<String>().ok(),
            _ => None,
        })
        .await;
        assert_eq!(message, format!("listen-error {}", libc_eaddrinuse()));
        let code = expect(&mut second, |e| match e {
            Event::Exit { status, .. } => Some(status.code()),
            _ => None,
        })
        .await;
        assert_eq!(code, Some(3));
    });
}

fn libc_eaddrinuse() -> i32 {
    nix::errno::Errno::EADDRINUSE as i32
}

#[test]
fn a_second_cluster_on_the_same_port_gets_address_in_use() {
    check_address_in_use(Policy::RoundRobin);
}

#[test]
fn bind_errors_under_the_shared_policy_reach_the_worker() {
    check_address_in_use(Policy::Shared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_refused_by_one_worker_are_served_by_another() {
    let settings = settings(2).env("CLUSTER_APP_MODE_1", "refuse");
    let mut primary = Primary::start(settings).await.expect("start");
    let seen = listening(&mut primary, 2).await;
    for _ in 0..6 {
        assert_eq!(request(seen[0].1).await.expect("request"), 2);
    }
    primary.stop().await.expect("stop");
}
