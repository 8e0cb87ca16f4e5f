//! Reload and stop under keep-alive load: no request fails, and readiness turns to 503
//! the moment a stop begins. The load is testkit's keep-alive client; `wrk` runs too
//! when it is installed. A client that sent half a request head does not hold a stop.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, KillOnDrop, LineLog, LoadConfig, Sample, assert_none_failed};

use crate::http::{self, Connection};
use crate::server::{Server, TIMEOUT, WORKERS};

/// Keep-alive connections of the load, as in `wrk -c32`.
const CONNECTIONS: usize = 32;

/// Runs `action` under a keep-alive load of `GET /` on the server: 300 requests
/// before it and 300 after it; no request may fail.
#[track_caller]
fn under_load(server: &Server, action: impl FnOnce()) -> Vec<Sample> {
    let mut config = LoadConfig::new(CONNECTIONS, "/");
    config.max_duration = 4 * TIMEOUT;
    let load = KeepAliveLoad::start(server.addr, config);
    assert!(load.wait_until(TIMEOUT, |s| s.len() >= 300), "no load");
    action();
    let done = load.count() + 300;
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= done),
        "load stalled"
    );
    load.stop()
}

#[test]
fn reload_under_keep_alive_load_fails_no_request() {
    let server = Server::start(&[]);
    let samples = under_load(&server, || {
        let mark = server.log.mark();
        server.signal(Signal::SIGHUP);
        server.log.wait_for(mark, "rolling reload complete");
        // Both old workers have drained: every connection they had was closed by them.
        for _ in 0..2 {
            server.log.wait_for(mark, "worker drained, exiting");
        }
    });
    assert_none_failed(&samples);
}

#[test]
fn readiness_turns_503_when_a_stop_begins_and_the_request_is_still_answered() {
    let mut server = Server::start(&[]);
    server.log.wait_for(0, "cluster ready");
    let mut connection = Connection::open(server.addr).unwrap();
    let ready = connection.request("GET", "/readyz").unwrap();
    assert_eq!(ready.status, 200, "{ready:?}");
    assert_eq!(ready.header("connection"), None);
    let id = ready.worker_id();
    assert!(ready.body.contains("\"status\": \"ready\""), "{ready:?}");
    assert_eq!(connection.request("GET", "/healthz").unwrap().status, 200);

    let mark = server.log.mark();
    server.signal(Signal::SIGTERM);
    server.log.wait_for(mark, "cluster not ready");
    server
        .log
        .wait_for(mark, &format!("draining: no new connections id={id} "));
    // The worker drains, but this keep-alive connection was just used: its next request
    // is answered, 503 with Connection: close, instead of the connection being closed.
    let draining = connection.request("GET", "/readyz").unwrap();
    assert_eq!(draining.status, 503, "{draining:?}");
    assert_eq!(draining.header("connection"), Some("close"));
    assert_eq!(draining.worker_id(), id);
    assert!(draining.body.contains("\"status\": \"draining\""));
    assert!(connection.request("GET", "/").is_err(), "closed after it");
    assert_eq!(server.wait().code(), Some(0));
}

/// httpd-demo's `IDLE_CLOSE` (`src/serve/activity.rs`, and the README's "1 s"): how long a
/// draining worker waits on a connection that sends nothing, idle or stalled mid-head.
const IDLE_CLOSE: Duration = Duration::from_secs(1);

#[test]
fn a_half_sent_request_head_is_closed_at_a_stop_well_before_the_grace() {
    // A slow request that outlasts the idle rule, so the stop waits for it; the stop may
    // take that plus one idle period (the half-sent head's, and the exits), and the grace
    // is ten times that, so a stop held by the half-sent head cannot pass for a quick one.
    let slow = 2 * IDLE_CLOSE;
    let bound = slow + IDLE_CLOSE;
    let grace = 10 * bound;
    let mut server = Server::start(&["--grace", &grace.as_secs().to_string()]);
    let mut half = TcpStream::connect(server.addr).expect("connect");
    half.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    half.write_all(b"GET / HT").expect("half a request line");
    // Every worker has answered a connection opened after it: whichever took the
    // half-sent one (hand-offs and accepts are in order) has it open.
    let mut answered = BTreeSet::new();
    for _ in 0..200 {
        answered.insert(
            http::get(server.addr, "/worker")
                .expect("GET /worker")
                .worker()
                .pid,
        );
        if answered.len() == WORKERS {
            break;
        }
    }
    assert_eq!(answered.len(), WORKERS, "only {answered:?} answered");
    let mark = server.log.mark();
    let addr = server.addr;
    let path = format!("/sleep?ms={}", slow.as_millis());
    let slow_request = std::thread::spawn(move || http::get(addr, &path));
    server.log.wait_for(mark, "sleep request in flight");
    let stop = Instant::now();
    server.signal(Signal::SIGTERM);
    let status = server.wait();
    let took = stop.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took < bound,
        "the stop took {took:?}, over {bound:?} (grace {grace:?})"
    );
    let response = slow_request.join().expect("client thread");
    let response = response.expect("the slow request failed");
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    // Closed without an answer: there was no request to answer.
    let mut rest = Vec::new();
    let read = half.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert!(read.is_ok() || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset));
}

/// A file removed when dropped.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Prints one line when a wrk thread gets its first response, so the test knows the load
/// is on before it reloads.
const WRK_SCRIPT: &str = r#"
local seen = false
function response(status, headers, body)
  if not seen then
    seen = true
    io.write("first response\n")
    io.flush()
  end
end
"#;

#[test]
fn wrk_sees_no_socket_error_across_a_reload() {
    if Command::new("wrk").arg("--version").output().is_err() {
        eprintln!("wrk not installed (apt-get install wrk): covered by the keep-alive client");
        return;
    }
    let server = Server::start(&[]);
    let script = TempFile(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("wrk-first-{}.lua", std::process::id())),
    );
    std::fs::write(&script.0, WRK_SCRIPT).unwrap();
    let url = format!("http://{}/", server.addr);
    let mut wrk = KillOnDrop::spawn(
        Command::new("wrk")
            .args(["-t2", "-c32", "-d3s", "-s"])
            .arg(&script.0)
            .arg(&url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("starting wrk");
    let out = LineLog::of(wrk.child_mut().stdout.take().expect("piped"));
    out.collect(wrk.child_mut().stderr.take().expect("piped"));
    out.wait_for(0, "first response", TIMEOUT)
        .expect("wrk got no response");
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server.log.wait_for(mark, "rolling reload complete");
    let running = wrk.try_wait().unwrap().is_none();
    assert!(running, "wrk ended before the reload did: {}", out.tail(30));
    let status = wrk
        .wait_timeout(TIMEOUT)
        .unwrap()
        .expect("wrk did not finish");
    assert!(status.success(), "wrk: {}", out.tail(30));
    out.wait_for(0, "Transfer/sec", TIMEOUT)
        .expect("wrk's summary");
    let report = out.tail(30);
    assert!(report.contains("requests in"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
}

impl crate::http::Response {
    /// The worker id in a `/healthz` or `/readyz` body.
    #[track_caller]
    fn worker_id(&self) -> u64 {
        let after = self.body.split("\"id\": ").nth(1).expect("an id");
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().expect("a numeric id")
    }
}
