//! Seeing and steering a running `cluster` command through its control socket:
//! `cluster status` (table and `--json`), `reload` (0 when every slot was replaced, 1
//! naming the slot when the new code is broken), `scale`, `stop`, the socket's owner-only
//! access (a client of another uid is refused), its removal at exit and the replacement
//! of a stale one, `--max-memory-restart` under load and `--stop-delay`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, LoadConfig, TempDir, http_get};

use crate::command::{Cluster, TIMEOUT, exists, pids, run_to_end};
use crate::{node_or_skip, node_script};

/// A directory only this user may enter (what the control socket's directory check asks
/// for), removed at the end.
fn private_dir(name: &str) -> TempDir {
    let dir = TempDir::new(&format!("ctl-{name}"));
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    dir
}

fn socket_in(dir: &TempDir) -> PathBuf {
    dir.path().join("ctl.sock")
}

/// Runs `cluster ARGS` as a client (a subcommand) to its end.
fn client(args: &[&OsStr]) -> Output {
    client_as(Command::new(env!("CARGO_BIN_EXE_cluster")), args)
}

fn client_as(mut command: Command, args: &[&OsStr]) -> Output {
    let mut guard = testkit::KillOnDrop::spawn(
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("run the client");
    guard.wait_with_output().expect("the client's output")
}

/// `cluster status --json --control SOCKET`, parsed.
fn status(socket: &Path) -> serde_json::Value {
    let out = client(&[
        "status".as_ref(),
        "--json".as_ref(),
        "--control".as_ref(),
        socket.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// The pids in a status.
fn status_pids(status: &serde_json::Value) -> BTreeSet<u32> {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter_map(|w| w["pid"].as_u64())
        .map(|p| u32::try_from(p).expect("pid"))
        .collect()
}

fn start_node(workers: usize, dir: &TempDir, script: &Path, extra: &[&OsStr]) -> Cluster {
    let socket = socket_in(dir);
    let mut args: Vec<&OsStr> = vec!["--control".as_ref(), socket.as_os_str()];
    args.extend_from_slice(extra);
    args.extend(["--".as_ref(), script.as_os_str()]);
    Cluster::start(workers, &args)
}

#[test]
fn status_shows_every_worker_and_a_killed_ones_replacement_with_its_cause() {
    if !node_or_skip() {
        return;
    }
    let dir = private_dir("status");
    let script = node_script("http_server.js");
    let mut cluster = start_node(3, &dir, &script, &[]);
    let started = pids(&cluster.started_from(0));
    let socket = socket_in(&dir);

    let out = client(&["status".as_ref(), "--control".as_ref(), socket.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).expect("utf-8");
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(rows.len(), 3, "{table}");
    for pid in &started {
        assert_eq!(
            rows.iter().filter(|r| r.contains(&pid.to_string())).count(),
            1,
            "{table}"
        );
    }
    let json = status(&socket);
    assert_eq!(status_pids(&json), started);
    assert_eq!(json["pid"].as_u64(), Some(u64::from(cluster.guard.pid())));
    assert_eq!(json["policy"], "rr");
    assert_eq!(json["ready"], true);

    // kill -9 one worker: its row shows the replacement, 1 restart, cause signal.
    let victim = *started.iter().next().expect("a worker");
    let mark = cluster.log.mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill -9");
    let replacement = cluster.wait_listening(mark, 1);
    let json = status(&socket);
    let now = status_pids(&json);
    assert!(!now.contains(&victim), "{json}");
    assert!(now.contains(&replacement[0].pid), "{json}");
    assert_eq!(now.len(), 3);
    let row = json["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(replacement[0].pid)))
        .expect("the replacement's row");
    assert_eq!(row["restarts"], 1, "{row}");
    let last_exit = row["last_exit"].as_str().expect("a last exit");
    assert!(
        last_exit.contains("signal") && last_exit.contains("SIGKILL"),
        "{last_exit}"
    );
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success());
    assert!(!socket.exists(), "the socket file is removed at exit");
}

#[test]
fn reload_exits_0_once_every_worker_changed_and_1_naming_the_slot_when_the_new_code_is_broken() {
    if !node_or_skip() {
        return;
    }
    let dir = private_dir("reload");
    let script = dir.path().join("app.js");
    std::fs::copy(node_script("http_server.js"), &script).expect("copy the app");
    let cluster = start_node(2, &dir, &script, &[]);
    let socket = socket_in(&dir);
    let before = status_pids(&status(&socket));

    let out = client(&["reload".as_ref(), "--control".as_ref(), socket.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = status_pids(&status(&socket));
    assert_eq!(after.len(), 2);
    assert!(
        before.is_disjoint(&after),
        "every pid changed: {before:?} -> {after:?}"
    );

    // Broken code: the reload fails, names each slot and why, and the old workers serve.
    let mut broken = std::fs::read_to_string(&script).expect("read the app");
    broken.push_str("\nthis is ( not javascript\n");
    std::fs::write(&script, broken).expect("break the app");
    let out = client(&["reload".as_ref(), "--control".as_ref(), socket.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for slot in ["slot 0", "slot 1"] {
        assert!(said.contains(slot), "{said}");
    }
    assert!(said.contains("crashing"), "{said}");
    let json = status(&socket);
    assert_eq!(
        status_pids(&json),
        after,
        "the old workers keep their slots: {json:#}"
    );
    assert_eq!(
        json["last_reload"]["failed"].as_array().map(Vec::len),
        Some(2),
        "{json}"
    );
    let (code, body) = http_get(cluster.addr(), "/").expect("the old workers serve");
    assert_eq!(code, 200);
    let pid: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(after.contains(&u32::try_from(pid["pid"].as_u64().expect("pid")).expect("pid")));
}

#[test]
fn scale_and_stop_wait_for_their_result() {
    if !node_or_skip() {
        return;
    }
    let dir = private_dir("scale");
    let script = node_script("http_server.js");
    let mut cluster = start_node(3, &dir, &script, &[]);
    let socket = socket_in(&dir);
    let ctl = |args: &[&str]| {
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.extend(["--control".as_ref(), socket.as_os_str()]);
        client(&all)
    };
    let out = ctl(&["scale", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status_pids(&status(&socket)).len(), 1);
    let mark = cluster.log.mark();
    let out = ctl(&["scale", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = status(&socket);
    assert_eq!(status_pids(&json).len(), 2);
    assert!(
        json["workers"]
            .as_array()
            .expect("rows")
            .iter()
            .all(|w| w["state"] == "listening")
    );
    let added = cluster.wait_listening(mark, 1);
    assert!(status_pids(&json).contains(&added[0].pid));
    let out = ctl(&["scale", "0"]);
    assert_eq!(out.status.code(), Some(1), "0 workers is refused");

    let out = ctl(&["stop", "--grace", "5s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "stopped");
    // Answered once every worker exited: the primary ends on its own, cleanly.
    assert!(cluster.wait_exit().success());
    for worker in cluster.started_from(0) {
        assert!(
            !exists(worker.pid),
            "worker {} outlived the stop",
            worker.pid
        );
    }
    assert!(!socket.exists());
}

#[test]
fn the_socket_is_owner_only_a_stale_one_is_replaced_and_a_live_one_is_an_error() {
    let dir = private_dir("socket");
    let socket = socket_in(&dir);
    let worker = crate::rust_worker();
    let args = |extra: &[&OsStr]| -> Vec<std::ffi::OsString> {
        let mut all: Vec<std::ffi::OsString> =
            vec!["--control".into(), socket.clone().into_os_string()];
        all.extend(extra.iter().map(|a| a.to_os_string()));
        all.extend(["--".into(), worker.clone().into_os_string()]);
        all
    };
    let mut first = Cluster::start(1, &args(&[]));
    let mode = std::fs::metadata(&socket)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only: {mode:o}");

    // Another cluster on the same path while this one answers: a clear error.
    let second: Vec<std::ffi::OsString> =
        [&["--workers".into(), "1".into()][..], &args(&[])].concat();
    let second: Vec<&OsStr> = second.iter().map(|a| a.as_os_str()).collect();
    let (code, output) = run_to_end(&second);
    assert_eq!(code.code(), Some(1), "{output}");
    assert!(
        output.contains("a running primary answers on it"),
        "{output}"
    );

    // Killed outright, the primary leaves its socket file; the next one replaces it.
    first
        .guard
        .signal(Signal::SIGKILL)
        .expect("kill -9 the primary");
    first.wait_exit();
    assert!(socket.exists(), "a killed primary cannot remove its socket");
    drop(first);
    let mut again = Cluster::start(1, &args(&[]));
    let json = status(&socket);
    assert_eq!(json["pid"].as_u64(), Some(u64::from(again.guard.pid())));
    again.signal(Signal::SIGTERM);
    assert!(again.wait_exit().success());
    assert!(!socket.exists());
}

#[test]
fn a_client_of_another_user_is_refused() {
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let dir = private_dir("uid");
    let socket = socket_in(&dir);
    let worker = crate::rust_worker();
    let _cluster = Cluster::start(
        1,
        &[
            "--control".as_ref(),
            socket.as_os_str(),
            "--".as_ref(),
            worker.as_os_str(),
        ],
    );
    // A copy of the client that `nobody` may run (the build directory may be closed).
    let open = private_dir("uid-client");
    std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let exe = open.path().join("cluster");
    std::fs::copy(env!("CARGO_BIN_EXE_cluster"), &exe).expect("copy the client");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let nobody = 65534;
    let as_nobody = || {
        let mut command = Command::new(&exe);
        // From root, std also drops the supplementary groups.
        command.uid(nobody).gid(nobody);
        client_as(
            command,
            &["status".as_ref(), "--control".as_ref(), socket.as_os_str()],
        )
    };
    // The file system keeps it out first: the directory and the socket are the owner's.
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("permission denied"), "{said}");
    // With the file system opened, the primary itself refuses the peer's uid.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let out = as_nobody();
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("refused: uid {nobody}")), "{said}");
    assert!(
        out.stdout.is_empty(),
        "nothing of the status leaks: {:?}",
        out.stdout
    );
}

#[test]
fn a_worker_above_the_memory_limit_is_replaced_with_no_failed_request() {
    if !node_or_skip() {
        return;
    }
    let dir = private_dir("memory");
    let script = node_script("grows.js");
    let mut cluster = start_node(
        2,
        &dir,
        &script,
        &["--max-memory-restart".as_ref(), "64M".as_ref()],
    );
    let before = pids(&cluster.started_from(0));
    let mut config = LoadConfig::new(8, "/");
    config.max_duration = 4 * TIMEOUT;
    let load = KeepAliveLoad::start(cluster.addr(), config);
    assert!(load.wait_until(TIMEOUT, |s| s.len() >= 200), "no load");
    let mark = cluster.log.mark();
    let (code, body) = http_get(cluster.addr(), "/grow").expect("grow");
    assert_eq!(code, 200);
    let grown: serde_json::Value = serde_json::from_str(&body).expect("json");
    let grown = u32::try_from(grown["pid"].as_u64().expect("pid")).expect("pid");
    assert!(before.contains(&grown));
    // Sampled each second, replaced after two samples above the limit: a successor
    // listens, then the grown worker drains and exits with the cause.
    let line = cluster
        .log
        .wait_for(mark, "replaced: memory limit", TIMEOUT)
        .unwrap_or_else(|e| panic!("not replaced: {e}\n{}", cluster.log.tail(30)));
    let successors = cluster.wait_listening(mark, 1);
    assert!(!before.contains(&successors[0].pid));
    assert!(line.text.contains(" exited "), "{}", line.text);
    assert!(
        !exists(grown),
        "the grown worker is gone once its exit is reported"
    );
    let served_after = load.count();
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= served_after + 200),
        "the load stalled"
    );
    let samples = load.stop();
    testkit::assert_none_failed(&samples);
    let json = status(&socket_in(&dir));
    let now = status_pids(&json);
    assert!(!now.contains(&grown), "{json}");
    let row = json["workers"]
        .as_array()
        .expect("rows")
        .iter()
        .find(|w| w["pid"].as_u64() == Some(u64::from(successors[0].pid)))
        .expect("the successor's row");
    assert!(
        row["last_exit"]
            .as_str()
            .is_some_and(|e| e.starts_with("memory limit")),
        "{row}"
    );
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success());
}

#[test]
fn a_stop_delay_turns_the_cluster_unready_at_once_and_serves_until_it_has_passed() {
    if !node_or_skip() {
        return;
    }
    let dir = private_dir("delay");
    let script = node_script("http_server.js");
    let mut cluster = start_node(2, &dir, &script, &["--stop-delay".as_ref(), "2s".as_ref()]);
    let socket = socket_in(&dir);
    assert_eq!(status(&socket)["ready"], true);
    cluster.signal(Signal::SIGTERM);
    // Not ready (a balancer's check sees it), still serving, then gone.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let json = loop {
        let json = status(&socket);
        if json["stopping"] == true {
            break json;
        }
        assert!(std::time::Instant::now() < deadline, "the stop never began");
    };
    assert_eq!(json["ready"], false);
    assert_eq!(
        status_pids(&json).len(),
        2,
        "every worker serves on during the delay"
    );
    assert!(
        json["workers"]
            .as_array()
            .expect("rows")
            .iter()
            .all(|w| w["state"] == "listening")
    );
    let (code, _) = http_get(cluster.addr(), "/").expect("served during the delay");
    assert_eq!(code, 200);
    assert!(cluster.wait_exit().success());
}

/// The primary raises its soft descriptor limit to the hard one at start, as Node does
/// (and so an upgrade's new primary gets back what the old one may have been lowered to).
#[test]
fn the_primary_raises_its_soft_descriptor_limit_to_the_hard_one() {
    let worker = crate::rust_worker();
    let mut command = Command::new("prlimit");
    command
        .args(["--nofile=64:4096", "--"])
        .arg(env!("CARGO_BIN_EXE_cluster"));
    let mut cluster = crate::command::Cluster::start_as(
        1,
        command,
        &["--no-control".as_ref(), "--".as_ref(), worker.as_os_str()],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", cluster.guard.pid()))
        .expect("the primary's limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a descriptor limit");
    let numbers: Vec<&str> = open_files.split_whitespace().skip(3).take(2).collect();
    assert_eq!(numbers, ["4096", "4096"], "{open_files}");
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success());
}
