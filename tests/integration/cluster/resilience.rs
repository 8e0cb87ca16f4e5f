//! Where the cluster beats Node: hand-offs survive dying workers, respawn with backoff and
//! a crash-loop limit, drain deadlines, rolling reload, panics and hostile workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ::cluster::{Event, Primary, RestartPolicy, Signal, WorkerId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{expect, listening, next_exit, request, settings, worker_of};

fn restarting() -> RestartPolicy {
    RestartPolicy::new().backoff_min(Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_flight_to_a_dying_worker_goes_to_its_replacement() {
    // Worker 1 never accepts; the connection handed to it is in flight when it dies.
    // Between its death and its replacement, no worker is alive: the primary holds the
    // connection instead of refusing it.
    let settings = settings(1)
        .restart(restarting())
        .env("CLUSTER_APP_MODE_1", "stall");
    let mut primary = Primary::start(settings).await.expect("start");
    let [(id, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    let client = tokio::spawn(request(address));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = primary.stats().await.expect("stats");
        if stats.workers.iter().any(|w| w.id == id && w.in_flight == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the hand-off never went out: {stats:?}"
        );
        tokio::task::yield_now().await;
    }
    // Killed from outside: a crash, so the slot is refilled.
    let pid = nix::unistd::Pid::from_raw(stats_pid(&primary, id).await);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let served_by = client.await.expect("join").expect("the client was served");
    assert!(
        served_by > id.get(),
        "served by the replacement, not {served_by}"
    );
}

/// The pid of a live worker.
async fn stats_pid(primary: &Primary, id: WorkerId) -> i32 {
    let stats = primary.stats().await.expect("stats");
    let worker = stats.workers.iter().find(|w| w.id == id).expect("alive");
    i32::try_from(worker.pid).expect("pid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_looping_slot_backs_off_then_fails() {
    let restart = RestartPolicy::new()
        .backoff_min(Duration::from_millis(40))
        .backoff_max(Duration::from_millis(160))
        .crash_loop_limit(3, Duration::from_secs(60));
    let settings = settings(1)
        .restart(restart)
        .env("CLUSTER_APP_MODE", "exit:1");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut forks: Vec<(WorkerId, Instant)> = Vec::new();
    let mut exits = 0;
    let failed = loop {
        match expect(&mut primary, Some).await {
            Event::Fork { id, .. } => forks.push((id, Instant::now())),
            Event::Exit { .. } => exits += 1,
            Event::SlotFailed { slot, .. } => break slot,
            _ => {}
        }
    };
    assert_eq!(failed, 0);
    let ids: Vec<u64> = forks.iter().map(|(id, _)| id.get()).collect();
    assert_eq!(ids, [1, 2, 3, 4], "three restarts, each with a new id");
    assert_eq!(exits, 4);
    // Each fork follows the previous one by the worker's short life plus the backoff;
    // events are timed on receipt, so allow a little scheduling jitter.
    // The first crash is replaced at once, then the backoff starts and doubles.
    for (i, backoff) in [0u64, 40, 80].into_iter().enumerate() {
        let gap = forks[i + 1].1 - forks[i].1;
        assert!(
            gap + Duration::from_millis(10) >= Duration::from_millis(backoff),
            "restart {i} after {gap:?}, expected a backoff of {backoff} ms"
        );
    }
    let stats = primary.stats().await.expect("stats");
    assert_eq!(stats.failed_slots, [0]);
    assert!(stats.workers.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_overruns_the_drain_deadline_is_killed() {
    let settings = settings(1).drain_deadline(Duration::from_millis(300));
    let mut primary = Primary::start(settings).await.expect("start");
    let [(id, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    // A connection that never finishes keeps the worker draining.
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let mut lines = BufReader::new(stream).lines();
    lines.next_line().await.expect("read").expect("greeting");
    primary.disconnect(id).await.expect("disconnect");
    let (status, after) = next_exit(&mut primary).await;
    assert_eq!((status.signal(), after), (Some(Signal::SIGKILL), true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_reload_fails_no_request() {
    let mut primary = Primary::start(settings(2)).await.expect("start");
    let seen = listening(&mut primary, 2).await;
    let address = seen[0].1;
    let done = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let done = Arc::clone(&done);
        async move {
            let mut served = Vec::new();
            while !done.load(Ordering::SeqCst) {
                served.push(
                    request(address)
                        .await
                        .expect("no request fails during a reload"),
                );
            }
            served
        }
    });
    primary.reload().await.expect("reload");
    // Both new workers are listening; requests made now reach only them.
    let mut after = Vec::new();
    for _ in 0..4 {
        after.push(request(address).await.expect("request"));
    }
    done.store(true, Ordering::SeqCst);
    let served = load.await.expect("load");
    assert!(!served.is_empty());
    assert!(
        after.iter().all(|id| *id > 2),
        "old workers still served: {after:?}"
    );
    let stats = primary.stats().await.expect("stats");
    let listening_new = stats.workers.iter().filter(|w| w.id.get() > 2).count();
    assert_eq!(listening_new, 2);
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_worker_is_replaced_at_once_and_drains() {
    let settings = settings(1).restart(restarting());
    let mut primary = Primary::start(settings).await.expect("start");
    let [(id, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    // An in-flight connection that must survive the other connection's panic.
    let slow = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (slow_read, mut slow_write) = slow.into_split();
    let mut slow_lines = BufReader::new(slow_read).lines();
    slow_lines
        .next_line()
        .await
        .expect("read")
        .expect("greeting");

    let boom = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let (boom_read, mut boom_write) = boom.into_split();
    let mut boom_lines = BufReader::new(boom_read).lines();
    let greeting = boom_lines
        .next_line()
        .await
        .expect("read")
        .expect("greeting");
    assert_eq!(worker_of(&greeting).expect("id"), id.get());
    boom_write.write_all(b"panic\n").await.expect("write");

    let going_down = expect(&mut primary, |e| match e {
        Event::GoingDown { id, .. } => Some(id),
        _ => None,
    })
    .await;
    assert_eq!(going_down, id);
    // The replacement starts before the panicked worker has exited.
    let replacement = expect(&mut primary, |e| match e {
        Event::Fork { id, .. } => Some(id),
        Event::Exit { id, .. } => panic!("worker {id} exited before the replacement started"),
        _ => None,
    })
    .await;
    assert!(replacement > id);
    slow_write.write_all(b"still here\n").await.expect("write");
    let echo = slow_lines.next_line().await.expect("read");
    assert_eq!(echo.as_deref(), Some("echo still here"));
    let (exited, code) = expect(&mut primary, |e| match e {
        Event::Exit { id, status, .. } => Some((id, status.code())),
        _ => None,
    })
    .await;
    assert_eq!((exited, code), (id, Some(1)));
    let served_by = request(address).await.expect("request");
    assert_eq!(served_by, replacement.get());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_worker_is_killed_and_replaced_while_others_serve() {
    let settings = settings(2)
        .restart(restarting())
        .env("CLUSTER_APP_MODE_1", "hostile");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut hostile = None;
    let mut seen = Vec::new();
    while hostile.is_none() || seen.len() < 2 {
        match expect(&mut primary, Some).await {
            Event::Misbehaved { id, .. } => hostile = Some(id),
            Event::Listening { id, address, .. } => seen.push((id, address)),
            _ => {}
        }
    }
    assert_eq!(hostile.map(WorkerId::get), Some(1));
    let ids: Vec<u64> = seen.iter().map(|(id, _)| id.get()).collect();
    assert!(
        ids.contains(&2) && ids.contains(&3),
        "worker 2 and the replacement: {ids:?}"
    );
    for _ in 0..4 {
        let served_by = request(seen[0].1.inet().expect("tcp"))
            .await
            .expect("request");
        assert!(served_by == 2 || served_by == 3);
    }
    primary.stop().await.expect("stop");
}
