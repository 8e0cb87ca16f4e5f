//! The helper app run as a primary process: signals, and workers ending with their primary.

use std::time::{Duration, Instant};

use child::{SpawnOptions, Stdio};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{KillOnDrop, is_running};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};

use super::{EVENT_TIMEOUT, request};

pub(super) type StdoutLines = Lines<BufReader<child::ChildStdout>>;

fn start_primary(workers: usize) -> (child::Child, StdoutLines) {
    let options = SpawnOptions::new()
        .kill_on_drop(true)
        .stdin(Stdio::Null)
        .stderr(Stdio::Inherit)
        .env("CLUSTER_APP_DRAIN_MS", "5000");
    let mut primary = child::spawn(
        env!("CARGO_BIN_EXE_cluster_app"),
        [workers.to_string()],
        options,
    )
    .expect("spawn the primary");
    let stdout = primary.stdout.take().expect("piped stdout");
    (primary, BufReader::new(stdout).lines())
}

/// Reads lines until one starts with `prefix`; returns its words after the prefix. Adopts
/// each forked worker into `pids`, which kills them when dropped, whatever happened.
pub(super) async fn line(
    lines: &mut StdoutLines,
    prefix: &str,
    pids: &mut KillOnDrop,
) -> Vec<String> {
    let wait = async {
        loop {
            let line = lines.next_line().await.expect("read").expect("a line");
            let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
            if words.first().map(String::as_str) == Some("fork") {
                pids.adopt(words[2].parse().expect("pid"));
            }
            if words.first().map(String::as_str) == Some(prefix) {
                return words[1..].to_vec();
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| panic!("no {prefix} line"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_end_when_the_primary_is_killed() {
    let (primary, mut lines) = start_primary(2);
    let mut pids = KillOnDrop::default();
    line(&mut lines, "listening", &mut pids).await;
    line(&mut lines, "listening", &mut pids).await;
    assert_eq!(pids.adopted().len(), 2);
    primary.kill(child::Signal::SIGKILL).expect("kill");
    primary.wait().await.expect("wait");
    // Polling the process table is the only way to watch processes that are not ours.
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.adopted().iter().any(|pid| is_running(*pid)) {
        assert!(Instant::now() < deadline, "workers outlived their primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_add_remove_reload_and_stop() {
    let (mut primary, mut lines) = start_primary(2);
    let mut pids = KillOnDrop::default();
    let address = line(&mut lines, "listening", &mut pids).await[1]
        .parse()
        .expect("address");
    line(&mut lines, "listening", &mut pids).await;
    let signal = |signal| kill(Pid::from_raw(primary.pid() as i32), signal).expect("signal");

    signal(Signal::SIGTTIN);
    assert_eq!(line(&mut lines, "listening", &mut pids).await[0], "3");

    signal(Signal::SIGHUP);
    let mut new = Vec::new();
    let mut exited = Vec::new();
    while new.len() < 3 || exited.len() < 3 {
        let line = tokio::time::timeout(EVENT_TIMEOUT, lines.next_line())
            .await
            .expect("reload timed out")
            .expect("read")
            .expect("a line");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["fork", _, pid] => pids.adopt(pid.parse().expect("pid")),
            ["listening", id, _] => new.push(id.parse::<u64>().expect("id")),
            ["exit", id, .., after] => {
                assert_eq!(after, "true", "{line}");
                exited.push(id.parse::<u64>().expect("id"));
            }
            _ => {}
        }
    }
    new.sort_unstable();
    exited.sort_unstable();
    assert_eq!((new, exited), (vec![4, 5, 6], vec![1, 2, 3]));
    let served_by = request(address).await.expect("request after the reload");
    assert!(served_by >= 4);

    signal(Signal::SIGTTOU);
    let exit = line(&mut lines, "exit", &mut pids).await;
    assert_eq!(exit.last().map(String::as_str), Some("true"));

    stop_and_expect_exit_0(&mut primary, &mut lines, &mut pids).await;
    assert!(!pids.adopted().iter().any(|pid| is_running(*pid)));
}

/// A program that starts its runtime before the primary reads `LISTEN_FDS` (it does not
/// call `cluster::take_inherited_sockets`), with a count larger than the sockets passed:
/// the runtime's own descriptors (epoll, eventfd, the signal socketpair) have numbers the
/// count covers; they are not listening sockets, so the primary leaves them alone, serves
/// the passed socket and stops with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_reads_listen_fds_late_adopts_only_the_sockets_passed() {
    let passed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = passed.local_addr().expect("address");
    let options = SpawnOptions::new()
        .kill_on_drop(true)
        .stdin(Stdio::Null)
        .stderr(Stdio::Inherit)
        .stdio(3, Stdio::Fd(passed.into()))
        // One socket, counted as five: fds 4 to 7 are closed at exec, then the runtime's.
        .env("LISTEN_FDS", "5")
        .env("CLUSTER_APP_LISTEN", address.to_string());
    let wrapper = r#"export LISTEN_PID=$$; exec "$0" "$@""#;
    let args = ["-c", wrapper, env!("CARGO_BIN_EXE_cluster_app"), "1"];
    let mut primary = child::spawn("/bin/sh", args, options).expect("spawn the primary");
    let mut lines = BufReader::new(primary.stdout.take().expect("piped stdout")).lines();
    let mut pids = KillOnDrop::default();
    let listening = line(&mut lines, "listening", &mut pids).await;
    assert_eq!(
        listening[1],
        address.to_string(),
        "serves the socket passed"
    );
    request(address)
        .await
        .expect("a request on the passed socket");
    stop_and_expect_exit_0(&mut primary, &mut lines, &mut pids).await;
}

/// SIGTERM to the primary: it reports `stopped` and exits 0.
async fn stop_and_expect_exit_0(
    primary: &mut child::Child,
    lines: &mut StdoutLines,
    pids: &mut KillOnDrop,
) {
    kill(Pid::from_raw(primary.pid() as i32), Signal::SIGTERM).expect("signal");
    line(lines, "stopped", pids).await;
    let status = tokio::time::timeout(EVENT_TIMEOUT, primary.wait())
        .await
        .expect("the primary exits")
        .expect("wait");
    assert_eq!(status.code(), Some(0));
}
