//! The `cluster` command as an operator meets it on the first day: `node` and its flags
//! on the command line, a stdout nobody reads, workers that leave on their own, start-up
//! failures, bounds and flags, the primary's death, a stop racing a start, and
//! `--wait-ready`.

use std::ffi::OsStr;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, KillOnDrop, LineLog, LoadConfig, http_get};

use crate::command::{Cluster, TIMEOUT, exists, pids, run_to_end, wait_lines};
use crate::{node_or_skip, node_script};

/// The connect timeout of the `cluster` command (`CONNECT_TIMEOUT` in its `main.rs`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(Into::into).collect()
}

/// `{"pid": N}` of a request on a new connection.
fn pid_at(addr: SocketAddr) -> u32 {
    let (status, body) = http_get(addr, "/").expect("a response");
    assert_eq!(status, 200, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    u32::try_from(body["pid"].as_u64().expect("a pid")).expect("a pid")
}

/// Waits until `pid` is gone (or a zombie); false at the deadline.
fn gone_within(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while testkit::is_running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

#[test]
fn node_and_its_flags_on_the_command_line_speak_nodes_protocol() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("http_server.js");
    let script = script.to_str().expect("utf-8 path");
    let args = os(&["--", "node", "--max-old-space-size=64", script, "0"]);
    let mut cluster = Cluster::start(3, &args);
    let started = pids(&cluster.started_from(0));
    assert_eq!(started.len(), 3);
    // Round-robin hands connections to each worker in turn: one round reaches all three.
    let served: std::collections::BTreeSet<u32> = (0..3).map(|_| pid_at(cluster.addr())).collect();
    assert_eq!(served, started, "requests spread over the three workers");
    // The flag reached node: each worker runs with it.
    for pid in &started {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains("--max-old-space-size=64"), "{cmdline}");
    }
    // kill -9 of one: replaced, and the new worker serves.
    let victim = *started.first().expect("a worker");
    let mark = cluster.log.mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill -9");
    let replacement = cluster.wait_listening(mark, 1);
    let new_pid = replacement.first().expect("a replacement").pid;
    assert!(!started.contains(&new_pid));
    let reached = (0..3).any(|_| pid_at(cluster.addr()) == new_pid);
    assert!(reached, "the replacement serves");
    assert!(!cluster.log.tail(200).contains("misbehaved"));
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

#[test]
fn a_stdout_nobody_reads_never_blocks_the_primary() {
    if !node_or_skip() {
        return;
    }
    let port = testkit::free_port();
    let script = node_script("chatty.js");
    // stdout is a pipe this test does not read (yet); stderr is read.
    let (stdout_read, stdout_write) = std::io::pipe().expect("pipe");
    let mut command = Command::new(env!("CARGO_BIN_EXE_cluster"));
    command
        .args(["--workers", "2", "--grace", "5s", "--"])
        .arg(&script)
        .arg(port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(OwnedFd::from(stdout_write)))
        .stderr(Stdio::piped());
    let mut guard = KillOnDrop::spawn(&mut command).expect("start cluster");
    drop(command); // it holds our copy of the pipe's write end
    let log = LineLog::of(guard.child_mut().stderr.take().expect("stderr"));
    wait_lines(&log, 0, " is listening on ", 2);
    for worker in command_pids(&log) {
        guard.adopt(worker);
    }
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    // Each request makes a worker write ~2 KiB the primary forwards to the stalled
    // stdout: 1,000 of them are more than the pipe and the command's queue hold.
    for n in 0..1000 {
        let answered = http_get(addr, "/");
        assert!(
            matches!(answered, Ok((200, _))),
            "request {n}: {answered:?}\n{}",
            log.tail(20)
        );
    }
    // The stream moves again (read to its end), and the command stops within the grace.
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout_read }, &mut text);
        text
    });
    let stopping = Instant::now();
    guard.signal(Signal::SIGTERM).expect("SIGTERM");
    let status = guard
        .wait_timeout(Duration::from_secs(5) + TIMEOUT)
        .expect("wait")
        .expect("the command stops");
    assert!(status.success(), "{}", log.tail(20));
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped within the grace: {:?}",
        stopping.elapsed()
    );
    let text = reader.join().expect("reader");
    let notice = text.lines().find(|l| l.starts_with("cluster: dropped "));
    assert!(
        notice.is_some_and(|l| l.contains(" lines of worker output")),
        "what was dropped is said: {notice:?}"
    );
}

/// The pids of the `cluster: worker N started (pid P)` lines so far.
fn command_pids(log: &LineLog) -> Vec<u32> {
    log.lines_from(0)
        .iter()
        .filter_map(|l| l.split_once("(pid ")?.1.strip_suffix(')')?.parse().ok())
        .collect()
}

/// Workers that leave right after they listen are a crash loop (here with a small limit,
/// so the test is short): backoff, then the command ends with a message.
#[test]
fn workers_that_leave_right_after_listening_end_the_command() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("leaves.js");
    let started = Instant::now();
    for how in ["worker", "process", "exit"] {
        let (status, output) = run_to_end(&[
            OsStr::new("--workers"),
            OsStr::new("2"),
            OsStr::new("--max-restarts"),
            OsStr::new("3"),
            OsStr::new("--"),
            script.as_os_str(),
            OsStr::new(how),
        ]);
        assert_eq!(status.code(), Some(1), "{how}: {output}");
        let starts = output.matches(" started (pid ").count();
        // Two slots, each given up after its limit of 3 restarts: 8 starts at most.
        assert!(starts <= 2 * (3 + 1), "{how}: {starts} starts\n{output}");
        assert!(
            output.contains("every worker keeps crashing")
                || output.contains("every worker exited before it listened"),
            "{how}: {output}"
        );
    }
    assert!(started.elapsed() < 3 * TIMEOUT);
}

#[test]
fn a_script_that_does_not_parse_ends_the_command_at_once_with_nodes_error() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("syntax_error.js");
    let started = Instant::now();
    let (status, output) = run_to_end(&[OsStr::new("--"), OsStr::new("node"), script.as_os_str()]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("every worker exited before it listened"),
        "{output}"
    );
    assert!(output.contains("  | SyntaxError"), "{output}");
    // No crash loop: the first generation's exits decide.
    assert!(
        started.elapsed() < CONNECT_TIMEOUT,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_program_that_never_connects_is_reported_and_ends_the_command() {
    let started = Instant::now();
    let (status, output) = run_to_end(&[
        OsStr::new("-w"),
        OsStr::new("2"),
        OsStr::new("--"),
        OsStr::new("/bin/sleep"),
        OsStr::new("100"),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(
            "has not connected to the cluster channel after 5s: is /bin/sleep a Node script or \
             a program built on the cluster crate?"
        ),
        "{output}"
    );
    assert!(
        output.contains("no worker connected to the cluster channel"),
        "{output}"
    );
    // Told to stop, sleep got SIGTERM rather than the whole grace (30 s) to notice.
    assert!(output.contains("signal SIGTERM"), "{output}");
    assert!(
        started.elapsed() < CONNECT_TIMEOUT + TIMEOUT / 2,
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn an_app_that_ignores_its_listen_error_ends_the_command_like_one_that_dies_of_it() {
    if !node_or_skip() {
        return;
    }
    let held = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = held.local_addr().expect("address").port().to_string();
    for script in ["ignores_listen_error.js", "http_server.js"] {
        let script = node_script(script);
        let (status, output) =
            run_to_end(&[OsStr::new("--"), script.as_os_str(), OsStr::new(&port)]);
        assert_eq!(status.code(), Some(1), "{output}");
        let refusal = format!("cannot listen on 127.0.0.1:{port}: Address already in use");
        assert!(output.contains(&refusal), "{output}");
        assert!(
            output.contains(&format!("cannot listen: listen on 127.0.0.1:{port}")),
            "{output}"
        );
    }
    drop(held);
}

#[test]
fn worker_counts_past_the_cap_and_unknown_flags_are_refused_at_once() {
    let (status, output) = run_to_end(&[
        OsStr::new("--workers"),
        OsStr::new("100000"),
        OsStr::new("--"),
        OsStr::new("/bin/true"),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("--workers 100000 is more than the cap of 1024"),
        "{output}"
    );
    assert!(!output.contains("started"), "nothing was forked: {output}");
    let (status, output) = run_to_end(&[
        OsStr::new("--frobnicate"),
        OsStr::new("--"),
        OsStr::new("app.js"),
    ]);
    assert_eq!(status.code(), Some(2), "clap's usage error: {output}");
    assert!(
        output.contains("unexpected argument '--frobnicate'"),
        "{output}"
    );
}

/// SIGKILL of the primary: every worker goes with it at once, a program that never
/// opens the channel and a Node worker stuck in a busy loop included.
#[test]
fn every_worker_dies_with_its_primary() {
    if !node_or_skip() {
        return;
    }
    let busy = node_script("busy.js");
    let programs: [&[&OsStr]; 2] = [
        &[OsStr::new("--"), busy.as_os_str()],
        &[
            OsStr::new("--"),
            OsStr::new("/bin/sleep"),
            OsStr::new("300"),
        ],
    ];
    for program in programs {
        let mut args = vec![OsStr::new("-w"), OsStr::new("2")];
        args.extend_from_slice(program);
        let (mut guard, log) = crate::command::spawn(&args);
        let next = wait_lines(&log, 0, " started (pid ", 2);
        let workers = command_pids(&log);
        for pid in &workers {
            guard.adopt(*pid);
        }
        if program[1] == busy.as_os_str() {
            // Spinning: past its listen and the 100 ms before the loop.
            wait_lines(&log, next, " is listening on ", 2);
        }
        guard.signal(Signal::SIGKILL).expect("kill -9 the primary");
        for pid in workers {
            assert!(
                gone_within(pid, Duration::from_secs(1)),
                "worker {pid} outlived its primary by 1 s ({:?})",
                program[1]
            );
            assert!(!exists(pid) || !testkit::is_running(pid));
        }
    }
}

/// A stop right after a reload started (before the new workers come online) and a stop
/// right after the start: the workers still starting are stopped, never flagged.
#[test]
fn a_stop_racing_a_start_flags_nobody() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("http_server.js");
    for _ in 0..5 {
        let mut cluster = Cluster::start(2, &["--".as_ref(), script.as_os_str()]);
        let mark = cluster.log.mark();
        cluster.signal(Signal::SIGHUP);
        // The reload's first new worker is forked: it is not online yet.
        let line = cluster.log.wait_for(mark, " started (pid ", TIMEOUT);
        line.unwrap_or_else(|e| panic!("no new worker: {e}"));
        cluster.signal(Signal::SIGTERM);
        let status = cluster.wait_exit();
        let output = cluster.log.tail(200);
        assert!(status.success(), "{output}");
        assert!(!output.contains("misbehaved"), "{output}");
    }
    for _ in 0..5 {
        let (mut guard, log) = crate::command::spawn(&[
            OsStr::new("-w"),
            OsStr::new("2"),
            OsStr::new("--"),
            script.as_os_str(),
        ]);
        log.wait_for(0, " started (pid ", TIMEOUT)
            .expect("a worker started");
        guard.signal(Signal::SIGTERM).expect("SIGTERM");
        let status = guard
            .wait_timeout(TIMEOUT)
            .expect("wait")
            .expect("it stops");
        let output = log.tail(200);
        assert!(status.success(), "{output}");
        assert!(!output.contains("misbehaved"), "{output}");
    }
}

/// Under `--wait-ready` a reload stops an old worker only after its replacement said
/// `ready` (500 ms after it listened), and loses no request under load.
#[test]
fn wait_ready_holds_each_reload_step_until_the_new_worker_says_so() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("ready_late.js");
    let args = [
        OsStr::new("--wait-ready"),
        OsStr::new("--"),
        script.as_os_str(),
    ];
    let mut cluster = Cluster::start(2, &args);
    wait_lines(&cluster.log, 0, " is ready", 2);
    let mut config = LoadConfig::new(8, "/");
    config.max_duration = 4 * TIMEOUT;
    let load = KeepAliveLoad::start(cluster.addr(), config);
    assert!(load.wait_until(TIMEOUT, |s| s.len() >= 100), "no load");
    let mark = cluster.log.mark();
    cluster.signal(Signal::SIGHUP);
    let new = cluster.wait_listening(mark, 2);
    let mut old_exits = Vec::new();
    let mut next = mark;
    for _ in 0..2 {
        let line = cluster
            .log
            .wait_for(next, " exited ", TIMEOUT)
            .expect("an old worker exits");
        next = line.index + 1;
        old_exits.push(line.index);
    }
    // Each old worker left only after a new one said it was ready.
    let lines = cluster.log.lines_from(mark);
    let ready_at: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ends_with(" is ready"))
        .map(|(i, _)| mark + i)
        .collect();
    for (n, exit) in old_exits.iter().enumerate() {
        assert!(
            ready_at.get(n).is_some_and(|ready| ready < exit),
            "old worker {n} left before a replacement was ready:\n{}",
            lines.join("\n")
        );
    }
    let done = load.count() + 100;
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= done),
        "load stalled"
    );
    testkit::assert_none_failed(&load.stop());
    assert_eq!(new.len(), 2);
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}
