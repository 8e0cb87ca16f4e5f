//! The cluster under faults, with real processes: a server closed and opened again, a
//! worker that lies about its servers, a server whose last worker is gone.

use std::time::Duration;

use ::cluster::{Event, Policy, Primary, RestartPolicy, WorkerId};

use super::{EVENT_TIMEOUT, expect, listening, request, runtime, settings};

/// The next user message of any worker, decoded as text.
async fn next_message(primary: &mut Primary) -> (WorkerId, String) {
    expect(primary, |e| match e {
        Event::Message { id, message } => message.decode::<String>().ok().map(|m| (id, m)),
        _ => None,
    })
    .await
}

/// One request, bounded in time: a connection left hanging fails it.
async fn bounded_request(address: std::net::SocketAddr) -> u64 {
    request_within(address, Duration::from_secs(5)).await
}

/// One request that must be answered within `bound`.
async fn request_within(address: std::net::SocketAddr, bound: Duration) -> u64 {
    tokio::time::timeout(bound, request(address))
        .await
        .expect("a request hung")
        .expect("request")
}

/// Sends `SIGSTOP` to `pid`, a worker of this process, and returns once every thread of
/// it has stopped. `kill` only queues the signal: until the thread picked to take it runs
/// (late, on a loaded machine), its other threads run on, and can take a hand-off, answer
/// it and keep the connection. The group stop's end is reported to the parent, which
/// this process is; `waitid` with `WSTOPPED` alone never reaps.
async fn freeze(pid: nix::unistd::Pid) {
    use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop");
    let stopped = tokio::task::spawn_blocking(move || waitid(Id::Pid(pid), WaitPidFlag::WSTOPPED));
    let status = tokio::time::timeout(EVENT_TIMEOUT, stopped)
        .await
        .expect("the worker did not stop")
        .expect("join");
    assert!(
        matches!(
            status,
            Ok(WaitStatus::Stopped(_, nix::sys::signal::Signal::SIGSTOP))
        ),
        "{status:?}"
    );
}

#[track_caller]
fn check_close_then_listen_again(policy: Policy) {
    runtime().block_on(async {
        // A fixed port, as a server has: a second bind of it while the first socket is
        // open is EADDRINUSE.
        let port = testkit::free_port();
        let settings = settings(2)
            .policy(policy)
            .env("CLUSTER_APP_MODE", "relisten")
            .env("CLUSTER_APP_LISTEN", format!("127.0.0.1:{port}"));
        let mut primary = Primary::start(settings).await.expect("start");
        let (_, first) = next_message(&mut primary).await;
        let (_, second) = next_message(&mut primary).await;
        assert!(first.starts_with("relisten "), "{first}");
        assert_eq!(first, format!("relisten {port}"));
        assert_eq!(first, second, "both workers serve the port again");
        let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut served = std::collections::HashSet::new();
        for _ in 0..30 {
            served.insert(bounded_request(address).await);
        }
        if policy == Policy::RoundRobin {
            assert_eq!(served.len(), 2, "round-robin uses both workers");
        }
        primary.stop().await.expect("stop");
    });
}

#[test]
fn close_then_listen_again_works_under_round_robin() {
    check_close_then_listen_again(Policy::RoundRobin);
}

#[test]
fn close_then_listen_again_works_under_shared() {
    check_close_then_listen_again(Policy::Shared);
}

#[test]
fn close_then_listen_again_works_under_reuseport() {
    check_close_then_listen_again(Policy::ReusePort);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_extra_port_of_a_dead_worker_refuses_connections_after_the_hold_time() {
    let settings = settings(1)
        .restart(RestartPolicy::new().backoff_min(Duration::from_millis(20)))
        .hold_connections(Duration::from_millis(200))
        .env("CLUSTER_APP_MODE_1", "double");
    let mut primary = Primary::start(settings).await.expect("start");
    let seen = listening(&mut primary, 2).await;
    let extra = seen[1].1;
    assert_ne!(seen[0].1, extra);
    let pid = primary.stats().await.expect("stats").workers[0].pid;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    // The replacement listens once: on the first port only.
    let [(replacement, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    assert_eq!(address, seen[0].1);
    assert_eq!(bounded_request(address).await, replacement.get());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(extra).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            _ => assert!(
                tokio::time::Instant::now() < deadline,
                "the extra port still accepts"
            ),
        }
        tokio::task::yield_now().await;
    }
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_skips_a_stopped_worker_after_a_bounded_wait() {
    let mut primary = Primary::start(settings(2)).await.expect("start");
    let seen = listening(&mut primary, 2).await;
    let stopped = seen[0].0;
    let stats = primary.stats().await.expect("stats");
    let pid = stats
        .workers
        .iter()
        .find(|w| w.id == stopped)
        .expect("alive")
        .pid;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    freeze(pid).await;
    // 1 MiB at a time: the stopped worker's socket fills within a few, the other reads on.
    let big = vec![1u8; 1 << 20];
    let skipped = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let reached = primary.broadcast(&big).await.expect("broadcast");
            if reached < 2 {
                return reached;
            }
        }
    })
    .await
    .expect("a broadcast waited on the stopped worker without end");
    assert_eq!(skipped, 1, "the running worker got it");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue");
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_handed_to_a_frozen_worker_is_served_by_another() {
    let handoff_timeout = Duration::from_millis(300);
    let settings = settings(2)
        .restart(RestartPolicy::new().backoff_min(Duration::from_millis(20)))
        .handoff_timeout(handoff_timeout);
    let mut primary = Primary::start(settings).await.expect("start");
    let seen = listening(&mut primary, 2).await;
    let (frozen, address) = seen[0];
    let stats = primary.stats().await.expect("stats");
    let pid = stats
        .workers
        .iter()
        .find(|w| w.id == frozen)
        .expect("alive")
        .pid;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    freeze(pid).await;
    // Round-robin hands some of these to the frozen worker: none may hang. One handed to
    // it waits for the hand-off timeout, then for the other worker to serve it.
    for _ in 0..6 {
        let served = request_within(address, handoff_timeout + EVENT_TIMEOUT).await;
        assert_ne!(served, frozen.get(), "served by the frozen worker");
    }
    let (hung, reason) = expect(&mut primary, |e| match e {
        Event::Misbehaved { id, reason } => Some((id, reason)),
        _ => None,
    })
    .await;
    assert_eq!(hung, frozen);
    assert!(reason.contains("hung"), "{reason}");
    primary.stop().await.expect("stop");
}
