//! One suite, two kinds of worker under the same command: a plain Node `http` server
//! (`tests/node/http_server.js`, no `cluster` import) and a Rust worker built on
//! `cluster` (`examples/http_worker.rs`, which `cargo test` builds).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{LineLog, http_get};

use crate::command::{Cluster, TIMEOUT, exists, pids};
use crate::{node_or_skip, node_script};

/// The pid that answered `GET /` on a new connection.
fn pid_of_get(addr: SocketAddr) -> u32 {
    let (status, body) = http_get(addr, "/").expect("GET /");
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
    value["pid"].as_u64().expect("a pid") as u32
}

/// Which worker program the suite runs.
#[derive(Debug, Clone, Copy)]
enum Program {
    Node,
    Rust,
}

impl Program {
    /// Whether this program can run here (prints why not).
    fn available(self) -> bool {
        match self {
            Program::Node => node_or_skip(),
            Program::Rust => true,
        }
    }

    fn path(self) -> PathBuf {
        match self {
            Program::Node => node_script("http_server.js"),
            Program::Rust => crate::rust_worker(),
        }
    }

    fn cluster(self, workers: usize) -> Cluster {
        let path = self.path();
        Cluster::start(
            workers,
            &[
                "--grace".as_ref(),
                "10".as_ref(),
                "--".as_ref(),
                path.as_os_str(),
            ],
        )
    }
}

#[test]
fn node_requests_spread_and_a_killed_worker_is_replaced_within_a_second() {
    spread_and_kill(Program::Node);
}

#[test]
fn rust_requests_spread_and_a_killed_worker_is_replaced_within_a_second() {
    spread_and_kill(Program::Rust);
}

#[test]
fn node_sigterm_lets_a_slow_request_finish_and_leaves_no_process() {
    sigterm_with_a_slow_request(Program::Node);
}

#[test]
fn rust_sigterm_lets_a_slow_request_finish_and_leaves_no_process() {
    sigterm_with_a_slow_request(Program::Rust);
}

#[test]
fn node_sighup_under_a_steady_client_fails_no_request_and_replaces_every_worker() {
    sighup_under_a_steady_client(Program::Node);
}

#[test]
fn rust_sighup_under_a_steady_client_fails_no_request_and_replaces_every_worker() {
    sighup_under_a_steady_client(Program::Rust);
}

fn spread_and_kill(program: Program) {
    if !program.available() {
        return;
    }
    let mut cluster = program.cluster(3);
    let workers = cluster.started_from(0);
    assert_eq!(workers.len(), 3, "{workers:?}");
    let served: BTreeSet<u32> = (0..30).map(|_| pid_of_get(cluster.addr())).collect();
    assert_eq!(served, pids(&workers), "round-robin over every worker");

    let victim = workers[0].pid;
    let mark = cluster.log.mark();
    let killed = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill -9 a worker");
    let replacement = cluster.wait_listening(mark, 1);
    let [replacement] = replacement[..] else {
        panic!("one replacement, got {replacement:?}");
    };
    assert!(!pids(&workers).contains(&replacement.pid));
    while pid_of_get(cluster.addr()) != replacement.pid {
        assert!(killed.elapsed() < TIMEOUT, "the replacement never served");
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "replacement served after {took:?}"
    );
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(40));
}

fn sigterm_with_a_slow_request(program: Program) {
    if !program.available() {
        return;
    }
    let mut cluster = program.cluster(2);
    let workers = cluster.started_from(0);
    let addr = cluster.addr();
    let mark = cluster.log.mark();
    let slow = std::thread::spawn(move || http_get(addr, "/slow"));
    cluster
        .log
        .wait_for(mark, "slow request started", TIMEOUT)
        .expect("the slow request reached a worker");
    cluster.signal(Signal::SIGTERM);
    let (status, body) = slow.join().expect("client thread").expect("slow response");
    assert_eq!(status, 200, "{body}");
    let exit = cluster.wait_exit();
    assert!(exit.success(), "{exit:?}\n{}", cluster.log.tail(40));
    for worker in &workers {
        assert!(!exists(worker.pid), "worker {worker:?} left behind");
    }
}

/// `LISTEN_FDS` counting more descriptors than were passed (one socket at fd 3, a count of
/// 5): fds 4 to 7 are closed at exec and are the first numbers the primary's runtime
/// takes, which it once adopted as inherited sockets and closed at its stop (a panic,
/// exit 101). The command serves the passed socket and stops with exit 0.
#[test]
fn listen_fds_larger_than_the_sockets_passed_serves_and_stops_with_exit_0() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (passed, counted) = (1, 5);
    let mut wrapper = std::process::Command::new("/bin/sh");
    wrapper
        .args([
            "-c",
            r#"export LISTEN_PID=$$; exec "$0" "$@" 3<&0 0</dev/null"#,
        ])
        .arg(env!("CARGO_BIN_EXE_cluster"))
        .env("LISTEN_FDS", counted.to_string())
        .env("RUST_LOG", "info")
        .stdin(std::os::fd::OwnedFd::from(listener));
    let path = Program::Rust.path();
    let port = addr.port().to_string();
    let args = [
        "--grace".as_ref(),
        "10".as_ref(),
        "--".as_ref(),
        path.as_os_str(),
        port.as_ref(),
    ];
    let mut cluster = Cluster::start_as(2, wrapper, &args);
    let workers = cluster.started_from(0);
    assert_eq!(cluster.addr(), addr, "serves the socket it was given");
    pid_of_get(addr);
    cluster.signal(Signal::SIGTERM);
    let exit = cluster.wait_exit();
    assert!(exit.success(), "{exit:?}\n{}", cluster.log.tail(40));
    // fd 3 was passed; the rest of the count was closed at exec, reported in one line.
    testkit::assert_listen_fds_log(&cluster.log.lines_from(0), passed, counted);
    for worker in &workers {
        assert!(!exists(worker.pid), "worker {worker:?} left behind");
    }
}

/// A client that sends `GET /` on a new connection after another until stopped, and
/// records which pid answered each (or the error).
struct SteadyClient {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Result<u32, String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SteadyClient {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, results) = (Arc::clone(&stop), Arc::clone(&results));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let result = match http_get(addr, "/") {
                        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["pid"].as_u64())
                            .map(|pid| pid as u32)
                            .ok_or(body),
                        Ok((status, body)) => Err(format!("{status}: {body}")),
                        Err(e) => Err(e.to_string()),
                    };
                    results.lock().unwrap().push(result);
                }
            }
        });
        Self {
            stop,
            results,
            thread: Some(thread),
        }
    }

    fn count(&self) -> usize {
        self.results.lock().unwrap().len()
    }

    /// Waits until `done` holds for the results from `from` on; `log` says what the
    /// cluster did if it never does.
    fn wait_until(
        &self,
        from: usize,
        done: impl Fn(&[Result<u32, String>]) -> bool,
        log: &LineLog,
    ) {
        let deadline = Instant::now() + TIMEOUT;
        while !done(&self.results.lock().unwrap()[from..]) {
            if Instant::now() >= deadline {
                let results = &self.results.lock().unwrap()[from..];
                let pids: BTreeSet<_> = results.iter().filter_map(|r| r.clone().ok()).collect();
                let failed = results.iter().filter(|r| r.is_err()).count();
                panic!(
                    "the client never saw it: {} results, pids {pids:?}, {failed} failed\n{}",
                    results.len(),
                    log.tail(40)
                );
            }
            std::thread::yield_now();
        }
    }

    fn stop(mut self) -> Vec<Result<u32, String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("client thread");
        }
        std::mem::take(&mut self.results.lock().unwrap())
    }
}

impl Drop for SteadyClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn sighup_under_a_steady_client(program: Program) {
    if !program.available() {
        return;
    }
    let mut cluster = program.cluster(3);
    let old = pids(&cluster.started_from(0));
    let client = SteadyClient::start(cluster.addr());
    client.wait_until(0, |results| results.len() >= 50, &cluster.log);
    let mark = cluster.log.mark();
    cluster.signal(Signal::SIGHUP);
    let new = pids(&cluster.wait_listening(mark, 3));
    assert_eq!(new.len(), 3, "{new:?}");
    assert!(old.is_disjoint(&new), "old {old:?}, new {new:?}");
    let mut next = mark;
    for _ in 0..3 {
        let line = cluster.log.wait_for(next, "exited", TIMEOUT);
        next = line.expect("old workers exit").index + 1;
    }
    let after = client.count();
    client.wait_until(
        after,
        |results| {
            let seen: BTreeSet<u32> = results.iter().filter_map(|r| r.clone().ok()).collect();
            seen == new
        },
        &cluster.log,
    );
    let results = client.stop();
    let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(5)]
    );
    for pid in &old {
        assert!(!exists(*pid), "old worker {pid} left behind");
    }
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success());
}

/// Two `listen(0)` servers per Node worker, without a host, under both policies: two
/// ports, each served by every worker.
#[test]
fn node_two_servers_per_worker_share_two_ports_under_each_policy() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("two_servers.js");
    for policy in ["rr", "shared"] {
        let mut cluster = Cluster::start(
            2,
            &["--policy".as_ref(), policy.as_ref(), script.as_os_str()],
        );
        // 2 workers x 2 servers.
        cluster.wait_listening(0, 4);
        // stdout's `listening on` lines and stderr's come through separate writers: wait
        // for both of stdout's, whatever came first.
        let deadline = Instant::now() + TIMEOUT;
        let ports = loop {
            let lines = cluster.log.lines_from(0);
            let ports: BTreeSet<u16> = lines
                .iter()
                .filter_map(|line| line.strip_prefix("listening on "))
                .filter_map(|a| a.parse::<SocketAddr>().ok())
                .map(|a| a.port())
                .collect();
            let left = deadline.saturating_duration_since(Instant::now());
            if ports.len() >= 2 || left.is_zero() {
                break ports;
            }
            let _ = cluster.log.wait_for(lines.len(), "", left); // the next line
        };
        assert_eq!(ports.len(), 2, "{policy}: {ports:?}");
        let names: BTreeSet<String> = ports
            .iter()
            .map(|port| {
                let (status, body) =
                    http_get(SocketAddr::from(([127, 0, 0, 1], *port)), "/").expect("GET");
                assert_eq!(status, 200, "{policy}: {body}");
                body.split(' ').next().unwrap_or_default().to_owned()
            })
            .collect();
        let expected: BTreeSet<String> = ["first".into(), "second".into()].into();
        assert_eq!(names, expected, "{policy}: one port per server");
        cluster.signal(Signal::SIGTERM);
        assert!(cluster.wait_exit().success(), "{policy}");
    }
}
