//! The Node programs people run, unmodified, under the `cluster` command: a server on a
//! Unix socket path (round-robin and shared), an Express-style app from a plain script,
//! and an ES module (`.mjs`).

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::path::Path;

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, LoadConfig, TempDir, http_exchange};

use crate::command::{Cluster, TIMEOUT, pids};
use crate::{node_or_skip, node_script};

/// A request on a new connection to the Unix socket at `path`: status and JSON body.
fn unix_request(path: &Path, target: &str) -> (u16, serde_json::Value) {
    let stream = UnixStream::connect(path).expect("connect to the socket");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    stream.set_write_timeout(Some(TIMEOUT)).expect("timeout");
    let (status, body) = http_exchange(stream, "GET", target, None).expect("a response");
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

/// A request on a new TCP connection to the command's address: status and JSON body.
fn tcp_request(
    cluster: &Cluster,
    method: &str,
    target: &str,
    json: Option<&str>,
) -> (u16, serde_json::Value) {
    let stream = std::net::TcpStream::connect(cluster.addr()).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let (status, body) = http_exchange(stream, method, target, json).expect("a response");
    (status, serde_json::from_str(&body).expect("a JSON body"))
}

fn pid(body: &serde_json::Value) -> u32 {
    let pid = body["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {body}"));
    u32::try_from(pid).expect("a pid")
}

fn serves_on_a_unix_path(policy: &str) {
    if !node_or_skip() {
        return;
    }
    let dir = TempDir::new(policy);
    let socket = dir.path().join("app.sock");
    let script = node_script("unix_server.js");
    let mut cluster = Cluster::start(
        2,
        &[
            "--policy".as_ref(),
            policy.as_ref(),
            "--".as_ref(),
            script.as_os_str(),
            socket.as_os_str(),
        ],
    );
    assert_eq!(cluster.endpoint.unix_path(), Some(socket.as_path()));
    let workers = pids(&cluster.started_from(0));
    assert_eq!(workers.len(), 2);
    // Both workers reported listening on the path (Cluster::start waits for that).
    // Round-robin alternates between them; under shared the kernel picks whichever
    // worker accepts first, which may be the same one every time.
    let served: BTreeSet<u32> = (0..20)
        .map(|_| {
            let (status, body) = unix_request(&socket, "/");
            assert_eq!(status, 200, "{body}");
            pid(&body)
        })
        .collect();
    assert!(served.is_subset(&workers), "{served:?} of {workers:?}");
    if policy == "rr" {
        assert_eq!(served, workers, "round-robin spreads over both workers");
    }
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
    assert!(
        !socket.exists(),
        "the primary removes the socket file it bound"
    );
}

#[test]
fn a_unix_path_listen_under_round_robin() {
    serves_on_a_unix_path("rr");
}

#[test]
fn a_unix_path_listen_under_shared() {
    serves_on_a_unix_path("shared");
}

#[test]
fn an_express_style_app_runs_as_is() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("express_style.js");
    let cluster = Cluster::start(2, &["--".as_ref(), script.as_os_str()]);
    let workers = pids(&cluster.started_from(0));
    let mut served = BTreeSet::new();
    for n in 0..6 {
        let (status, body) = tcp_request(&cluster, "GET", &format!("/users/{n}"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], n.to_string(), "{body}");
        served.insert(pid(&body));
    }
    assert_eq!(served, workers, "round-robin spreads the app's requests");
    let (status, body) = tcp_request(&cluster, "POST", "/echo", Some(r#"{"a":[1,2]}"#));
    assert_eq!(
        (status, &body["echo"]),
        (200, &serde_json::json!({"a": [1, 2]}))
    );
    let (status, body) = tcp_request(&cluster, "GET", "/boom", None);
    assert_eq!((status, &body["error"]), (500, &serde_json::json!("boom")));
    let (status, body) = tcp_request(&cluster, "GET", "/nowhere", None);
    assert_eq!(
        (status, &body["error"]),
        (404, &serde_json::json!("not found"))
    );
}

#[test]
fn an_es_module_runs_under_node() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("server.mjs");
    let mut cluster = Cluster::start(2, &["--".as_ref(), script.as_os_str()]);
    let workers = pids(&cluster.started_from(0));
    let served: BTreeSet<u32> = (0..4)
        .map(|_| {
            let (status, body) = tcp_request(&cluster, "GET", "/", None);
            assert_eq!((status, &body["module"]), (200, &serde_json::json!("esm")));
            pid(&body)
        })
        .collect();
    assert_eq!(served, workers);
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

#[test]
fn a_rolling_reload_under_keep_alive_load_fails_no_request() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("http_server.js");
    let mut cluster = Cluster::start(2, &["--".as_ref(), script.as_os_str()]);
    let old = pids(&cluster.started_from(0));
    let mut config = LoadConfig::new(16, "/");
    config.max_duration = 4 * TIMEOUT;
    let load = KeepAliveLoad::start(cluster.addr(), config);
    assert!(load.wait_until(TIMEOUT, |s| s.len() >= 300), "no load");
    // Two reloads: each old worker's idle keep-alive connections would be dropped by
    // Node's own close(); the drain answers their next request with Connection: close.
    for _ in 0..2 {
        let mark = cluster.log.mark();
        cluster.signal(Signal::SIGHUP);
        cluster.wait_listening(mark, 2);
        let mut next = mark;
        for _ in 0..2 {
            let line = cluster.log.wait_for(next, " exited ", TIMEOUT);
            next = line.expect("the old workers exit").index + 1;
        }
    }
    let done = load.count() + 300;
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= done),
        "load stalled"
    );
    testkit::assert_none_failed(&load.stop());
    let now = pids(&cluster.started_from(0));
    assert!(now.len() >= 6 && old.is_subset(&now), "{now:?}");
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

/// The primary's peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// A Node worker that floods the primary with handle lines whose answers it never reads
/// is killed as misbehaving and replaced, and the primary's memory stays bounded.
fn a_worker_that_never_reads_its_acknowledgements_is_replaced(policy: &str) {
    if !node_or_skip() {
        return;
    }
    let script = node_script("nack_flood.js");
    let mut cluster = Cluster::start(
        1,
        &[
            "--policy".as_ref(),
            policy.as_ref(),
            "--".as_ref(),
            script.as_os_str(),
        ],
    );
    // It floods as soon as it listens: by now it may already be gone.
    let hostile = cluster.started_from(0)[0];
    assert_eq!(hostile.id, 1, "{}", cluster.log.tail(20));
    cluster
        .log
        .wait_for(0, "floods its primary", TIMEOUT)
        .expect("the first worker floods");
    let misbehaved = cluster
        .log
        .wait_for(
            0,
            "misbehaved: broken channel: the peer does not read its acknowledgements",
            TIMEOUT,
        )
        .unwrap_or_else(|e| {
            panic!(
                "the flooding worker was not stopped: {e}\n{}",
                cluster.log.tail(20)
            )
        });
    assert!(
        misbehaved.text.contains("worker 1 misbehaved"),
        "{}",
        misbehaved.text
    );
    let [replacement] = cluster.wait_listening(misbehaved.index + 1, 1)[..] else {
        panic!("one replacement: {}", cluster.log.tail(20));
    };
    assert_ne!(replacement.pid, hostile.pid);
    let (status, body) = tcp_request(&cluster, "GET", "/", None);
    assert_eq!((status, pid(&body)), (200, replacement.pid), "{body}");
    let peak = peak_rss_kib(cluster.guard.pid());
    assert!(peak < 64 * 1024, "the primary peaked at {peak} KiB");
    eprintln!("{policy}: primary peak RSS {peak} KiB");
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(40));
}

#[test]
fn a_node_worker_flooding_unread_nacks_is_replaced_round_robin() {
    a_worker_that_never_reads_its_acknowledgements_is_replaced("rr");
}

#[test]
fn a_node_worker_flooding_unread_nacks_is_replaced_shared() {
    a_worker_that_never_reads_its_acknowledgements_is_replaced("shared");
}

/// A Node worker out of descriptors cannot take the connections handed to it: Node
/// refuses each `NODE_HANDLE` (NACK) until the sender gives up. That is the worker's
/// refusal of that connection, which goes to another worker: no request fails and the
/// worker is not killed (found by `cargo xtask chaos --seed 7`, node/rr).
#[test]
fn a_worker_out_of_descriptors_refuses_hand_offs_and_the_others_serve_them() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("http_server.js");
    let mut cluster = Cluster::start(
        2,
        &["--no-control".as_ref(), "--".as_ref(), script.as_os_str()],
    );
    let workers = cluster.started_from(0);
    let starved = workers[0].pid;
    let open = std::fs::read_dir(format!("/proc/{starved}/fd"))
        .expect("its descriptors")
        .count();
    // No descriptor to spare: every handle it is sent is refused.
    let limit = format!("--nofile={open}:{open}");
    let status = std::process::Command::new("prlimit")
        .args(["--pid", &starved.to_string(), &limit])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let mark = cluster.log.mark();
    let mut served = BTreeSet::new();
    for _ in 0..40 {
        let (status, body) = tcp_request(&cluster, "GET", "/", None);
        assert_eq!(status, 200);
        served.insert(pid(&body));
    }
    assert!(
        !served.contains(&starved),
        "the starved worker served: {served:?}"
    );
    assert!(
        cluster
            .log
            .lines_from(mark)
            .iter()
            .any(|l| l.contains("could not take a connection")),
        "the starved worker was handed connections and refused them:\n{}",
        cluster.log.tail(30)
    );
    let lines = cluster.log.lines_from(mark);
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("misbehaved") || l.contains(" exited ")),
        "no worker was killed:\n{}",
        lines.join("\n")
    );
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success());
}
