//! Integration tests of the `cluster` crate, with real processes: Node's test-cluster-*
//! behaviours, and the places where this crate does better than Node.
//!
//! Most tests drive a [`Primary`] in-process whose workers run the `cluster_app` helper.
//! Tests synchronise on events and on lines read from sockets, never on sleeps. Dropping
//! the `Primary` (or the test's runtime) kills and reaps every worker.

mod faults;
mod fds;
mod lifecycle;
mod process;
mod resilience;
mod worker_life;

use std::net::SocketAddr;
use std::time::Duration;

use ::cluster::{Event, Policy, Primary, RestartPolicy, Settings, WorkerId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// How long any one expected event may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings for the helper app: no restarts unless a test wants them, a short drain.
fn settings(workers: usize) -> Settings {
    Settings::new()
        .program(env!("CARGO_BIN_EXE_cluster_app"))
        .workers(workers)
        .restart(RestartPolicy::never())
        .drain_deadline(Duration::from_secs(10))
}

/// A two-thread runtime, for the data-driven `check_*` tests that are not `#[tokio::test]`.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits for the first event `pick` accepts, skipping others; fails after a timeout.
async fn expect<T>(primary: &mut Primary, mut pick: impl FnMut(Event) -> Option<T>) -> T {
    let wait = async {
        loop {
            let event = primary.next_event().await.expect("the primary stopped");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .expect("timed out waiting for an event")
}

/// Waits for the next worker exit: its status and whether it exited after a disconnect.
async fn next_exit(primary: &mut Primary) -> (child::ExitStatus, bool) {
    expect(primary, |e| match e {
        Event::Exit {
            status,
            exited_after_disconnect,
            ..
        } => Some((status, exited_after_disconnect)),
        _ => None,
    })
    .await
}

/// Waits until `count` workers reported listening; returns `(worker, address)` in order.
async fn listening(primary: &mut Primary, count: usize) -> Vec<(WorkerId, SocketAddr)> {
    let mut seen = Vec::new();
    while seen.len() < count {
        let found = expect(primary, |e| match e {
            Event::Listening { id, address, .. } => Some((id, address)),
            _ => None,
        })
        .await;
        let (id, address) = found;
        seen.push((id, address.inet().expect("a TCP address")));
    }
    seen
}

/// One request to the helper app: returns the worker id that answered.
async fn request(address: SocketAddr) -> std::io::Result<u64> {
    let stream = tokio::net::TcpStream::connect(address).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let greeting = lines.next_line().await?.unwrap_or_default();
    write.write_all(b"hi\n").await?;
    let echo = lines.next_line().await?.unwrap_or_default();
    if echo != "echo hi" {
        return Err(std::io::Error::other(format!(
            "bad echo {echo:?} after {greeting:?}"
        )));
    }
    worker_of(&greeting)
}

/// The worker id in a greeting line `worker <id> pid <pid> port <port>`.
fn worker_of(greeting: &str) -> std::io::Result<u64> {
    greeting
        .split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad greeting {greeting:?}")))
}

#[track_caller]
fn check_served_by_all(policy: Policy) {
    runtime().block_on(async {
        let mut primary = Primary::start(settings(2).policy(policy))
            .await
            .expect("start");
        let seen = listening(&mut primary, 2).await;
        assert_eq!(seen[0].1, seen[1].1, "both workers share one port");
        let mut served = std::collections::HashSet::new();
        for _ in 0..40 {
            served.insert(request(seen[0].1).await.expect("request"));
            if served.len() == 2 && policy != Policy::RoundRobin {
                break;
            }
        }
        if policy == Policy::RoundRobin {
            assert_eq!(served.len(), 2, "round-robin uses both workers");
        }
        primary.stop().await.expect("stop");
    });
}

#[test]
fn round_robin_hands_connections_to_every_worker() {
    check_served_by_all(Policy::RoundRobin);
}

#[test]
fn shared_policy_serves_connections() {
    check_served_by_all(Policy::Shared);
}

#[test]
fn reuseport_policy_serves_connections() {
    check_served_by_all(Policy::ReusePort);
}
