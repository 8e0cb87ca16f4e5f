//! Integration tests of `httpd-demo`'s command-line contract: real primaries and workers,
//! driven over HTTP and with signals, synchronised on their log lines and HTTP answers,
//! never on sleeps.
//!
//! They live in `httpd-demo/tests/` and not in the workspace's `tests` crate because Cargo
//! sets `CARGO_BIN_EXE_httpd-demo` only for the integration tests of the package that
//! owns the binary. One test binary (`autotests = false`): this file and `cli/`.

#[path = "cli/deploy.rs"]
mod deploy;
#[path = "cli/http.rs"]
mod http;
#[path = "cli/keep_alive.rs"]
mod keep_alive;
#[path = "cli/server.rs"]
mod server;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::WorkerInfo;

use crate::http::{Connection, Response};
use crate::server::{Server, TIMEOUT, is_running, parent_of, signal_pid, worker_started};

#[track_caller]
fn check(server: &Server, method: &str, path: &str, status: u16) -> Response {
    let response = Connection::open(server.addr)
        .and_then(|mut connection| connection.request(method, path))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    assert_eq!(response.status, status, "{method} {path}: {response:?}");
    response
}

/// The first worker started at log line `mark` or later; it must be new.
#[track_caller]
fn started_after(server: &Server, mark: usize, old: &[WorkerInfo]) -> WorkerInfo {
    let new = worker_started(&server.log.wait_for(mark, "worker started").1);
    let reused = old.iter().any(|o| o.id == new.id || o.pid == new.pid);
    assert!(
        !reused,
        "replacement {new:?} reuses an id or pid of {old:?}"
    );
    new
}

/// Sends `GET /worker` on new connections until `worker` answers; all must succeed.
#[track_caller]
fn wait_until_serving(server: &Server, worker: WorkerInfo) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let response = http::get(server.addr, "/worker");
        if response.expect("GET /worker while replacing").worker() == worker {
            return;
        }
        assert!(Instant::now() < deadline, "{worker:?} never answered");
    }
}

#[test]
fn every_route_answers() {
    let server = Server::start(&[]);
    assert_eq!(check(&server, "GET", "/", 200).body, "hello world\n");
    check(&server, "GET", "/sleep?ms=50", 200);
    check(&server, "GET", "/nope", 404);
    check(&server, "POST", "/", 405);
    for path in ["/healthz", "/readyz"] {
        let body = check(&server, "GET", path, 200).body;
        assert!(body.contains("\"id\": "), "{path}: {body}");
    }
    let worker = check(&server, "GET", "/worker", 200).worker();
    assert!(server.workers().contains(&worker), "{worker:?}");
    assert!(is_running(worker.pid));
    assert_eq!(parent_of(worker.pid), Some(server.pid()));
}

#[test]
fn worker_lines_reach_the_primarys_log_prefixed_with_the_worker_id() {
    let server = Server::start(&[]);
    let worker = check(&server, "GET", "/worker", 200).worker();
    let (_, line) = server.log.wait_for(0, &format!("worker {} | ", worker.id));
    assert!(line.contains("worker running"), "{line}");
    assert!(line.contains(&format!("pid={}", worker.pid)), "{line}");
}

#[test]
fn a_port_in_use_ends_the_server_at_once_with_the_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port().to_string();
    let mut server = testkit::KillOnDrop::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_httpd-demo"))
            .args(["--workers", "2", "--port", &port])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn httpd-demo");
    let status = server
        .wait_timeout(std::time::Duration::from_secs(20))
        .expect("wait")
        .expect("it gave up instead of running on without a listener");
    let mut stderr = String::new();
    let pipe = server.child_mut().stderr.as_mut().expect("stderr");
    std::io::Read::read_to_string(pipe, &mut stderr).expect("read stderr");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot serve: listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(stderr.contains("in use"), "{stderr}");
}

#[test]
fn zero_workers_is_refused_at_once_with_a_message() {
    let mut server = testkit::KillOnDrop::spawn(
        std::process::Command::new(env!("CARGO_BIN_EXE_httpd-demo"))
            .args(["--workers", "0", "--port", "0"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn httpd-demo");
    let status = server
        .wait_timeout(TIMEOUT)
        .expect("wait")
        .expect("it ran on with no worker and no listener");
    let mut stderr = String::new();
    let pipe = server.child_mut().stderr.as_mut().expect("stderr");
    std::io::Read::read_to_string(pipe, &mut stderr).expect("read stderr");
    assert!(!status.success(), "{status:?} {stderr}");
    assert!(
        stderr.contains("'--workers <WORKERS>': must be at least 1"),
        "{stderr}"
    );
}

#[test]
fn crash_route_is_off_by_default() {
    let server = Server::start(&[]);
    // One connection, so every request goes to the same worker.
    let mut connection = Connection::open(server.addr).unwrap();
    let before = connection.request("GET", "/worker").unwrap().worker();
    assert_eq!(connection.request("GET", "/crash").unwrap().status, 404);
    assert_eq!(
        connection.request("GET", "/worker").unwrap().worker(),
        before
    );
    assert!(is_running(before.pid));
}

#[test]
fn allowed_crash_replaces_the_worker() {
    let server = Server::start(&["--allow-crash"]);
    let old = server.workers();
    let mut connection = Connection::open(server.addr).unwrap();
    let crashed = connection.request("GET", "/worker").unwrap().worker();
    let mark = server.log.mark();
    // The handler panics: the connection is dropped, or at least nothing succeeds.
    if let Ok(response) = connection.request("GET", "/crash") {
        assert_ne!(response.status, 200, "{response:?}");
    }
    let exited = format!("worker exited id={} ", crashed.id);
    let (_, exited) = server.log.wait_for(mark, &exited);
    assert!(!exited.contains("status=exit code 0"), "{exited}");
    let replacement = started_after(&server, mark, &old);
    wait_until_serving(&server, replacement);
    assert!(!is_running(crashed.pid));
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits() {
    let mut server = Server::start(&[]);
    let workers = server.workers();
    let mark = server.log.mark();
    let (tx, rx) = mpsc::channel();
    let addr = server.addr;
    thread::spawn(move || tx.send(http::get(addr, "/sleep?ms=1000")));
    server.log.wait_for(mark, "sleep request in flight");
    server.signal(Signal::SIGTERM);
    let response = rx.recv_timeout(TIMEOUT).expect("the request never ended");
    let response = response.expect("the request in flight failed");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert_eq!(server.wait().code(), Some(0));
    server.log.wait_for(mark, "primary exiting");
    let left: Vec<_> = workers.iter().filter(|w| is_running(w.pid)).collect();
    assert!(left.is_empty(), "workers still running: {left:?}");
}

/// A stop right after a reload forked new workers reaches them before or while they
/// listen: each exits 0 as asked (the primary grants no server to a worker it asked to
/// stop; the worker's listen says `Stopping` and it exits cleanly), none is flagged.
#[test]
fn a_stop_racing_new_workers_listen_exits_every_worker_cleanly() {
    for _ in 0..5 {
        let mut server = Server::start(&[]);
        let mark = server.log.mark();
        server.signal(Signal::SIGHUP);
        let (started, _) = server.log.wait_for(mark, "worker started");
        server.signal(Signal::SIGTERM);
        assert_eq!(server.wait().code(), Some(0));
        let (last, _) = server.log.wait_for(started, "primary exiting");
        let lines = server.log.lines_from(mark);
        let exits: Vec<&String> = lines[..=last - mark]
            .iter()
            .filter(|l| l.contains("worker exited"))
            .collect();
        assert!(!exits.is_empty(), "{lines:#?}");
        for line in exits {
            assert!(
                line.contains("exit code 0") && line.contains("asked_to_stop=true"),
                "{lines:#?}"
            );
        }
        assert!(
            !lines
                .iter()
                .any(|l| l.contains("misbehaved") || l.contains("ERROR")),
            "{lines:#?}"
        );
    }
}

#[test]
fn ctrl_c_to_the_process_group_stops_gracefully() {
    let mut server = Server::start(&[]);
    let workers = server.workers();
    let mark = server.log.mark();
    // The workers run in their own process group: only the primary gets this SIGINT,
    // and it asks them to stop instead of their dying on the spot.
    server.signal_group(Signal::SIGINT);
    assert_eq!(server.wait().code(), Some(0));
    for worker in &workers {
        let (_, line) = server
            .log
            .wait_for(mark, &format!("worker exited id={}", worker.id));
        assert!(
            line.contains("exit code 0") && line.contains("asked_to_stop=true"),
            "{line}"
        );
    }
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let server = Server::start(&[]);
    let mut connection = Connection::open(server.addr).unwrap();
    let first = connection.request("GET", "/").unwrap();
    let second = connection.request("GET", "/worker").unwrap();
    for response in [&first, &second] {
        assert_eq!(response.status, 200, "{response:?}");
        assert_eq!(response.header("connection"), None, "{response:?}");
    }
    second.worker();
}

/// Sets the flag when dropped, so a failing test still stops its load thread.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[test]
fn rolling_reload_under_load_fails_no_request() {
    let server = Server::start(&[]);
    let old: BTreeSet<u64> = server.workers().iter().map(|w| w.id).collect();
    let (stop, reloaded) = (AtomicBool::new(false), AtomicBool::new(false));
    // Each answer, marked with whether its request started after the reload completed.
    let (tx, rx) = mpsc::channel::<(bool, Result<WorkerInfo, String>)>();
    let mut answers = Vec::new();
    thread::scope(|scope| {
        let _stop_load = SetOnDrop(&stop);
        let (addr, stop, reloaded) = (server.addr, &stop, &reloaded);
        scope.spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let after = reloaded.load(Ordering::Acquire);
                let answer = http::get(addr, "/worker").map_err(|e| e.to_string());
                let _ = tx.send((after, answer.map(|r| r.worker())));
            }
        });
        let mut collect = |after: bool, n: usize| {
            let ok = |answers: &Vec<(bool, Result<_, _>)>| {
                let ok = answers.iter().filter(|(a, r)| *a == after && r.is_ok());
                ok.count()
            };
            while ok(&answers) < n {
                answers.push(rx.recv_timeout(TIMEOUT).expect("no answer to the load"));
            }
        };
        collect(false, 20);
        let mark = server.log.mark();
        server.signal(Signal::SIGHUP);
        server.log.wait_for(mark, "rolling reload complete");
        reloaded.store(true, Ordering::Release);
        collect(true, 20);
    });
    answers.extend(rx.try_iter());
    let failed: Vec<_> = answers
        .iter()
        .filter_map(|(_, r)| r.as_ref().err())
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        answers.len()
    );
    let late = answers.iter().filter(|(after, _)| *after);
    let late: BTreeSet<u64> = late.map(|(_, r)| r.as_ref().unwrap().id).collect();
    assert!(
        late.is_disjoint(&old),
        "old {old:?} answered after the reload: {late:?}"
    );
}

#[test]
fn sigkill_of_a_worker_gets_it_replaced() {
    let server = Server::start(&[]);
    let old = server.workers();
    let victim = http::get(server.addr, "/worker").unwrap().worker();
    let mark = server.log.mark();
    signal_pid(victim.pid, Signal::SIGKILL);
    let exited = format!("worker exited id={} ", victim.id);
    let (_, exited) = server.log.wait_for(mark, &exited);
    assert!(exited.contains("status=signal SIGKILL"), "{exited}");
    let replacement = started_after(&server, mark, &old);
    wait_until_serving(&server, replacement);
}

#[test]
fn sigkill_of_the_primary_leaves_no_worker() {
    let mut server = Server::start(&[]);
    let workers = server.workers();
    assert!(workers.iter().all(|w| is_running(w.pid)), "{workers:?}");
    server.signal(Signal::SIGKILL);
    assert_eq!(server.wait().code(), None);
    // Not our children: poll /proc until each is gone or a zombie (the parent-death
    // signal is asynchronous; there is nothing to block on).
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|w| is_running(w.pid)) {
        assert!(
            Instant::now() < deadline,
            "workers outlived the primary: {workers:?}"
        );
        thread::yield_now();
    }
}

#[test]
fn the_control_socket_shows_the_workers_and_reloads_them() {
    use cluster::control::{Client, Request};
    let dir = std::env::temp_dir().join(format!("httpd-demo-ctl-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let socket = dir.join("demo.sock");
    let socket_arg = socket.to_str().expect("a UTF-8 path").to_owned();
    let mut server = Server::start(&["--control", &socket_arg]);
    let client = Client::new(&socket).timeout(TIMEOUT);
    let status = client.call(&Request::Status).expect("status");
    let rows = status.status.expect("a status").workers;
    let pids: BTreeSet<u32> = rows.iter().filter_map(|r| r.pid).collect();
    let workers: BTreeSet<u32> = server.workers().iter().map(|w| w.pid).collect();
    assert_eq!(pids, workers);
    let reload = client.call(&Request::Reload).expect("reload");
    assert!(reload.ok, "{reload:?}");
    let after = client
        .call(&Request::Status)
        .expect("status")
        .status
        .expect("a status");
    let now: BTreeSet<u32> = after.workers.iter().filter_map(|r| r.pid).collect();
    assert!(
        now.is_disjoint(&workers),
        "every worker was replaced: {workers:?} -> {now:?}"
    );
    for worker in &after.workers {
        server.adopt(worker.pid.expect("a pid"));
    }
    server.signal(Signal::SIGTERM);
    assert!(server.wait().success());
    assert!(!socket.exists(), "the socket file is removed at exit");
    let _ = std::fs::remove_dir_all(&dir);
}
