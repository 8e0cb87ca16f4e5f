//! Node's worker lifecycle where users rely on it (arguments, per-worker environment and
//! slot, a worker that disconnects itself, exits that are and are not crashes, silent
//! output, the primary going away), and the bounds on what a worker can make the primary
//! hold (servers, unread messages).

use std::time::Duration;

use ::cluster::{Event, OutputStream, Primary, RestartPolicy, WorkerId};
use ::cluster::{MAX_SERVERS_PER_WORKER, USER_QUEUE_CAPACITY};
use tokio::io::AsyncBufReadExt;

use super::{expect, listening, request, settings};

/// The next user message from any worker, decoded as text.
async fn next_message(primary: &mut Primary) -> (WorkerId, String) {
    expect(primary, |e| match e {
        Event::Message { id, message } => message.decode::<String>().ok().map(|m| (id, m)),
        _ => None,
    })
    .await
}

fn restarting() -> RestartPolicy {
    RestartPolicy::new().backoff_min(Duration::from_millis(20))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_the_primarys_arguments_by_default() {
    let mut primary = Primary::start(settings(1).env("CLUSTER_APP_MODE", "args"))
        .await
        .expect("start");
    let (_, message) = next_message(&mut primary).await;
    let ours: Vec<String> = std::env::args().skip(1).collect();
    assert_eq!(message, format!("args {}", ours.join(" ")));
    primary.stop().await.expect("stop");

    let settings = settings(1)
        .env("CLUSTER_APP_MODE", "args")
        .args(["--port", "9"]);
    let mut primary = Primary::start(settings).await.expect("start");
    assert_eq!(next_message(&mut primary).await.1, "args --port 9");
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_slot_keeps_its_environment_and_index_for_its_replacements() {
    let mut primary = Primary::start(settings(1).restart(restarting()))
        .await
        .expect("start");
    listening(&mut primary, 1).await;
    let env = [("CLUSTER_APP_MODE", "env"), ("CLUSTER_APP_X", "blue")];
    let id = primary.fork_with_env(env).await.expect("fork");
    let (from, message) = next_message(&mut primary).await;
    assert_eq!((from, message.as_str()), (id, "env blue slot 1"));
    // Killed from outside: a crash; the replacement has the slot's environment and index.
    let stats = primary.stats().await.expect("stats");
    let pid = stats
        .workers
        .iter()
        .find(|w| w.id == id)
        .expect("alive")
        .pid;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let (from, message) = next_message(&mut primary).await;
    assert!(from > id, "a replacement, not {from}");
    assert_eq!(message, "env blue slot 1");
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_disconnects_itself_is_replaced_at_once_and_is_no_crash() {
    // At most 2 crashes a minute, but 4 self-disconnects in a row are no crash at all:
    // each comes after the minimum uptime (none here), so each is recycling. (Leaving
    // sooner than the minimum uptime is a crash: the core's tests and the `cluster`
    // command's cover that.)
    let restart = restarting()
        .crash_loop_limit(2, Duration::from_secs(60))
        .min_uptime(Duration::ZERO);
    let settings = settings(1)
        .restart(restart)
        .env("CLUSTER_APP_MODE", "self-disconnect");
    let mut primary = Primary::start(settings).await.expect("start");
    let [(mut current, address)] = listening(&mut primary, 1).await[..] else {
        unreachable!()
    };
    for _ in 0..4 {
        assert_eq!(request(address).await.expect("request"), current.get());
        // The replacement starts before the worker that left has exited; it may be
        // listening before or after that exit.
        let (mut replacement, mut exit, mut ready) = (None, None, None);
        while exit.is_none() || ready.is_none() {
            match expect(&mut primary, Some).await {
                Event::Fork { id, .. } => {
                    assert!(exit.is_none(), "forked after the exit");
                    replacement = Some(id);
                }
                Event::Listening { id, .. } => ready = Some(id),
                Event::Exit {
                    id,
                    exited_after_disconnect,
                    status,
                    cause,
                } => {
                    assert_eq!(id, current);
                    assert_eq!(cause, cluster::ExitCause::Disconnect);
                    exit = Some((status.code(), exited_after_disconnect));
                }
                Event::SlotFailed { .. } => panic!("a self-disconnect counted as a crash"),
                _ => {}
            }
        }
        assert_eq!(exit, Some((Some(0), true)));
        let id = replacement.expect("forked before the exit");
        assert_eq!(ready, Some(id));
        current = id;
    }
    assert!(
        primary
            .stats()
            .await
            .expect("stats")
            .failed_slots
            .is_empty()
    );
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_returning_ok_at_once_is_a_crash_loop() {
    let restart = restarting().crash_loop_limit(2, Duration::from_secs(60));
    let settings = settings(1)
        .restart(restart)
        .env("CLUSTER_APP_MODE", "exit:0");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut exits = 0;
    let failed = loop {
        match expect(&mut primary, Some).await {
            Event::Exit {
                status,
                exited_after_disconnect,
                ..
            } => {
                assert_eq!((status.code(), exited_after_disconnect), (Some(0), false));
                exits += 1;
            }
            Event::SlotFailed { slot, .. } => break slot,
            _ => {}
        }
    };
    assert_eq!((failed, exits), (0, 3), "two restarts, then given up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_workers_output_reaches_the_primary_line_by_line() {
    let settings = settings(1).silent(true).env("CLUSTER_APP_MODE", "chatty");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut lines = Vec::new();
    while lines.len() < 2 {
        let line = expect(&mut primary, |e| match e {
            Event::Output { id, stream, line } => Some((id, stream, line)),
            _ => None,
        })
        .await;
        lines.push(line);
    }
    lines.sort_by_key(|(_, stream, _)| *stream == OutputStream::Stderr);
    let one = WorkerId::get;
    let got: Vec<_> = lines
        .iter()
        .map(|(id, s, l)| (one(*id), *s, l.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, OutputStream::Stdout, "hello stdout from 1"),
            (1, OutputStream::Stderr, "hello stderr from 1"),
        ]
    );
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_primary_is_gone_is_told_so_and_ends_by_itself() {
    // This test plays the primary: it starts a worker, reads its online report, then
    // closes the channel without a word.
    let options = child::ForkOptions::new().map_spawn_options(|o| {
        o.env(::cluster::WORKER_ID_ENV, "1")
            .env("CLUSTER_APP_MODE", "report-stop")
            .stdout(child::Stdio::Pipe)
            .kill_on_drop(true)
    });
    let mut worker =
        child::fork(env!("CARGO_BIN_EXE_cluster_app"), child::NO_ARGS, options).expect("fork");
    let mut channel = worker.take_channel().expect("channel");
    let online = channel.recv().await.expect("recv").expect("online");
    assert_eq!(online.lane(), ipc::Lane::Control);
    drop(channel);
    let stdout = worker.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(super::EVENT_TIMEOUT, lines.next_line())
        .await
        .expect("the worker reported")
        .expect("read");
    assert_eq!(line.as_deref(), Some("stop PrimaryGone"));
    let status = worker.wait().await.expect("wait");
    assert_eq!(status.code(), Some(0), "it returned from main by itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_asking_for_servers_without_end_is_killed_and_replaced_and_others_serve() {
    let settings = settings(2)
        .restart(restarting())
        .env("CLUSTER_APP_MODE_1", "flood");
    let mut primary = Primary::start(settings).await.expect("start");
    let mut flooder = None;
    let mut serving = Vec::new();
    while flooder.is_none() || serving.len() < 2 {
        match expect(&mut primary, Some).await {
            Event::Misbehaved { id, reason } => {
                assert!(
                    reason.contains(&MAX_SERVERS_PER_WORKER.to_string()),
                    "{reason}"
                );
                flooder = Some(id);
            }
            Event::Listening { id, address, .. } if id.get() != 1 => {
                serving.push(address.inet().expect("a TCP address"))
            }
            _ => {}
        }
    }
    assert_eq!(flooder.map(WorkerId::get), Some(1));
    // Worker 2 and the replacement (3) serve; the flooder's servers are gone with it.
    for _ in 0..4 {
        let served_by = request(serving[0]).await.expect("request");
        assert!(served_by == 2 || served_by == 3, "served by {served_by}");
    }
    primary.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_reads_its_messages_keeps_only_the_newest() {
    let mut primary = Primary::start(settings(1).env("CLUSTER_APP_MODE", "lazy"))
        .await
        .expect("start");
    let id = expect(&mut primary, |e| match e {
        Event::Online { id } => Some(id),
        _ => None,
    })
    .await;
    let total = 3 * USER_QUEUE_CAPACITY;
    for n in 0..total {
        primary.send(id, &format!("msg {n}")).await.expect("send");
    }
    primary.send(id, "end").await.expect("send");
    primary.disconnect(id).await.expect("disconnect");
    let (_, report) = next_message(&mut primary).await;
    let dropped = total + 1 - USER_QUEUE_CAPACITY;
    assert_eq!(
        report,
        format!("kept {USER_QUEUE_CAPACITY} dropped {dropped} first msg {dropped}")
    );
}
