//! Deploying: systemd socket activation and notifications, reloads that run the binary
//! on disk (and survive a missing or broken one), and the upgrade of the primary itself
//! (`SIGUSR2`) under keep-alive load, stopped half-way, or failed by a new binary that
//! leaves a process behind.
//!
//! The harness passes a listening socket the systemd way: the test's listener is the
//! wrapper shell's stdin, which moves it to fd 3, sets `LISTEN_PID=$$` (`LISTEN_FDS=1`
//! comes with the environment), and `exec`s httpd-demo (same pid), so no descriptor leaks
//! into other tests' children and `LISTEN_PID` names the primary.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, LoadConfig, TempDir};

use crate::http;
use crate::server::{Server, TIMEOUT, WORKERS, is_running};

/// Hands `LISTEN_PID=$$` and the socket on stdin (as fd 3) to the program in `$0`.
const ACTIVATE: &str = r#"export LISTEN_PID=$$
exec "$0" "$@" 3<&0 0</dev/null"#;

/// A fresh directory under Cargo's target tmp dir (copies of the binary run from it, and
/// `/tmp` may be `noexec`), removed at the end.
fn target_tmp(what: &str) -> TempDir {
    TempDir::new_in(Path::new(env!("CARGO_TARGET_TMPDIR")), what)
}

/// Installs a copy of httpd-demo at `path`, replacing whatever is there the way a package
/// manager or `cargo build` does: a new file renamed over the old one. The copy has a
/// new mtime, hence a new build id.
fn install_copy(path: &Path) {
    let staged = path.with_extension("new");
    std::fs::copy(env!("CARGO_BIN_EXE_httpd-demo"), &staged).expect("copying httpd-demo");
    let file = std::fs::File::options()
        .write(true)
        .open(&staged)
        .expect("open");
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(1);
    file.set_modified(later).expect("setting the mtime");
    drop(file);
    std::fs::rename(&staged, path).expect("installing the copy");
}

/// `GET /worker` on new connections until every one of the [`WORKERS`] workers has
/// answered at least once; returns who answered and with which build.
#[track_caller]
fn serving(server: &Server) -> BTreeSet<(u64, u32, String)> {
    let mut seen = BTreeSet::new();
    let mut pids = BTreeSet::new();
    for _ in 0..200 {
        let response = http::get(server.addr, "/worker").expect("GET /worker");
        let worker = response.worker();
        pids.insert(worker.pid);
        seen.insert((worker.id, worker.pid, response.build()));
        if pids.len() == WORKERS {
            return seen;
        }
    }
    panic!("only {seen:?} answered 200 requests");
}

fn builds(seen: &BTreeSet<(u64, u32, String)>) -> BTreeSet<&str> {
    seen.iter().map(|(_, _, b)| b.as_str()).collect()
}

/// httpd-demo started by the activation wrapper with a listener of the test's at fd 3,
/// `LISTEN_FDS=1` and `LISTEN_FDNAMES=web` unless `env` says otherwise.
fn activated(policy: &str, listener: TcpListener, env: &[(&str, &str)]) -> Server {
    let port = listener.local_addr().expect("addr").port().to_string();
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", ACTIVATE, env!("CARGO_BIN_EXE_httpd-demo")])
        .args(["--workers", &WORKERS.to_string(), "--port", &port])
        .args(["--policy", policy])
        .envs([("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "web")])
        .envs(env.iter().copied())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)));
    Server::spawn(&mut command)
}

#[track_caller]
fn check_activation(policy: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = activated(policy, listener, &[]);
    assert_eq!(server.addr, addr, "serves the socket it was given");
    server
        .log
        .wait_for(0, "adopted an inherited listening socket");
    let before = serving(&server);
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server.log.wait_for(mark, "rolling reload complete");
    // Complete means every old worker was asked to stop; under a shared socket the kernel
    // may still give one a connection before its drain starts (it answers with
    // `Connection: close`). Once they have exited, only new workers serve.
    for (id, _, _) in &before {
        server
            .log
            .wait_for(mark, &format!("worker exited id={id} "));
    }
    let after = serving(&server);
    assert!(before.is_disjoint(&after), "{before:?} then {after:?}");
    // The inherited socket was never closed: no bind of the primary's own.
    assert!(
        !server
            .log
            .lines_from(0)
            .iter()
            .any(|l| l.contains("listen refused")),
        "a listen was refused"
    );
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_survives_a_reload_round_robin() {
    check_activation("rr");
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_survives_a_reload_shared() {
    check_activation("shared");
}

#[test]
fn a_socket_passed_by_systemd_is_served_and_survives_a_reload_reuseport() {
    check_activation("reuseport");
}

/// `LISTEN_FDS` counting more descriptors than were passed: fds 4 to 7 are closed at exec
/// and are the first numbers the primary's runtime takes (its epoll, eventfd and signal
/// socketpair), which it once adopted as inherited sockets and closed at its stop.
#[test]
fn listen_fds_larger_than_the_sockets_passed_serves_and_stops_with_exit_0() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let passed = 1;
    let counted = passed + 4;
    let names = vec!["web"; counted].join(":");
    let env = [
        ("LISTEN_FDS", counted.to_string()),
        ("LISTEN_FDNAMES", names),
    ];
    let env = env.each_ref().map(|(k, v)| (*k, v.as_str()));
    let mut server = activated("rr", listener, &env);
    assert_eq!(server.addr, addr, "serves the socket it was given");
    let response = http::get(server.addr, "/").expect("GET /");
    assert_eq!(response.status, 200, "{response:?}");
    let mark = server.log.mark();
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait().code(), Some(0), "{:?}", server.log);
    server.log.wait_for(mark, "primary exiting");
    // fd 3 was passed; the rest of the count was closed at exec, reported in one line.
    testkit::assert_listen_fds_log(&server.log.lines_from(0), passed, counted);
}

#[test]
fn listen_pid_of_another_process_is_ignored_with_a_warning() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let passed = listener.local_addr().expect("addr");
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", r#"exec "$0" "$@" 3<&0 0</dev/null"#])
        .arg(env!("CARGO_BIN_EXE_httpd-demo"))
        .args(["--workers", &WORKERS.to_string(), "--port", "0"])
        .envs([("LISTEN_PID", "1"), ("LISTEN_FDS", "1")])
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(listener)));
    let server = Server::spawn(&mut command);
    assert_ne!(server.addr, passed, "binds a socket of its own");
    let (_, line) = server.log.wait_for(0, "ignoring LISTEN_FDS");
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("LISTEN_PID is 1, not this process"), "{line}");
}

/// The next datagram containing `needle`, skipping watchdog pings and status updates;
/// any other state on the way is an error.
#[track_caller]
fn expect_state(socket: &UnixDatagram, needle: &str) -> String {
    let mut buf = [0; 4096];
    loop {
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"));
        let message = String::from_utf8_lossy(&buf[..n]).into_owned();
        if message.contains(needle) {
            return message;
        }
        let skipped = message
            .lines()
            .all(|l| l == "WATCHDOG=1" || l.starts_with("STATUS="));
        assert!(skipped, "{message:?} while waiting for {needle:?}");
    }
}

#[test]
fn notify_socket_gets_ready_reloading_ready_stopping_and_the_watchdog() {
    let dir = target_tmp("notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("binding the notify socket");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let notify = path.to_str().expect("utf-8 path");
    // Half of 400 ms: a ping every 200 ms.
    let env = [("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "400000")];
    let mut server = activated("rr", listener, &env);
    let ready = expect_state(&socket, "READY=1");
    assert!(
        ready.contains(&format!("STATUS=ready: {WORKERS} workers")),
        "{ready:?}"
    );
    expect_state(&socket, "WATCHDOG=1");
    server.signal(Signal::SIGHUP);
    let reloading = expect_state(&socket, "RELOADING=1");
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading:?}");
    expect_state(&socket, "READY=1");
    server.signal(Signal::SIGTERM);
    expect_state(&socket, "STOPPING=1");
    assert_eq!(server.wait().code(), Some(0));
}

/// httpd-demo run from a copy at a path of the test's, so the test can replace the file.
fn from_copy(dir: &TempDir, extra_args: &[&str]) -> (Server, PathBuf) {
    let binary = dir.path().join("httpd-demo");
    install_copy(&binary);
    let mut command = Command::new(&binary);
    command
        .args(["--workers", &WORKERS.to_string(), "--port", "0"])
        .args(extra_args)
        .stdin(Stdio::null());
    (Server::spawn(&mut command), binary)
}

#[test]
fn a_reload_starts_workers_from_the_replaced_binary() {
    let dir = target_tmp("replaced");
    let (server, binary) = from_copy(&dir, &[]);
    let before = serving(&server);
    assert_eq!(builds(&before).len(), 1, "{before:?}");
    install_copy(&binary);
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server.log.wait_for(mark, "rolling reload complete");
    let after = serving(&server);
    assert_eq!(builds(&after).len(), 1, "{after:?}");
    assert_ne!(
        builds(&before),
        builds(&after),
        "the new workers run the new file"
    );
}

#[track_caller]
fn check_failed_reload(server: &Server, why: &str) {
    let before = serving(server);
    let mark = server.log.mark();
    server.signal(Signal::SIGHUP);
    server.log.wait_for(mark, "rolling reload complete");
    let mut from = mark;
    for _ in 0..WORKERS {
        let failed = "reload failed for a slot; the old worker keeps serving";
        from = server.log.wait_for(from, failed).0 + 1;
    }
    assert_eq!(serving(server), before, "{why}: the old workers serve on");
    for (_, pid, _) in &before {
        assert!(is_running(*pid));
    }
}

#[test]
fn a_reload_with_a_missing_or_broken_binary_keeps_the_old_workers_serving() {
    let dir = target_tmp("broken");
    let (server, binary) = from_copy(&dir, &["--reload-timeout", "1"]);
    std::fs::remove_file(&binary).expect("deleting the binary");
    check_failed_reload(&server, "deleted binary");
    std::fs::write(&binary, "#!/bin/sh\nexit 3\n").expect("a broken binary");
    let mut permissions = std::fs::metadata(&binary).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&binary, permissions).expect("chmod");
    check_failed_reload(&server, "broken binary");
}

#[test]
fn sigusr2_upgrades_the_primary_under_keep_alive_load_failing_no_request() {
    let dir = target_tmp("upgrade");
    let (mut server, binary) = from_copy(&dir, &[]);
    let old_primary = server.pid();
    let before = serving(&server);
    let mut config = LoadConfig::new(16, "/");
    config.max_duration = 4 * TIMEOUT;
    let load = KeepAliveLoad::start(server.addr, config);
    assert!(load.wait_until(TIMEOUT, |s| s.len() >= 300), "no load");
    install_copy(&binary);
    let mark = server.log.mark();
    server.signal(Signal::SIGUSR2);
    let started = server.log.wait_for(mark, "upgrade: new primary started").1;
    let new_primary: u32 = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid= in {started:?}"));
    server.adopt(new_primary);
    server
        .log
        .wait_for(mark, "the new primary is ready; stopping this one");
    assert_eq!(server.wait().code(), Some(0), "the old primary exits 0");
    let done = load.count() + 300;
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= done),
        "load stalled"
    );
    testkit::assert_none_failed(&load.stop());
    assert_ne!(new_primary, old_primary);
    assert!(is_running(new_primary));
    let after = serving(&server);
    let old_pids: BTreeSet<u32> = before.iter().map(|(_, pid, _)| *pid).collect();
    assert!(
        after.iter().all(|(_, pid, _)| !old_pids.contains(pid)),
        "{before:?} {after:?}"
    );
    assert_ne!(
        builds(&before),
        builds(&after),
        "the new primary's workers run the new file"
    );
    // The new primary stops as any other.
    let mark = server.log.mark();
    crate::server::signal_pid(new_primary, Signal::SIGTERM);
    server.log.wait_for(mark, "primary exiting");
}

/// Installs an executable shell script at `path`, renamed over whatever is there.
fn install_script(path: &Path, script: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, script).expect("writing a script");
    let mut permissions = std::fs::metadata(&staged).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&staged, permissions).expect("chmod");
    std::fs::rename(&staged, path).expect("installing the script");
}

/// The number after `key=` in a log line.
#[track_caller]
fn pid_in(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Once the primary has exited: none of `pids` runs and nothing listens on `addr`.
/// Processes that are not our children are killed asynchronously, so `/proc` is polled
/// until they are gone (there is nothing to block on).
#[track_caller]
fn assert_all_gone(addr: std::net::SocketAddr, pids: &[u32]) {
    let deadline = Instant::now() + TIMEOUT;
    while pids.iter().any(|pid| is_running(*pid)) {
        let left: Vec<_> = pids.iter().filter(|pid| is_running(**pid)).collect();
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::yield_now();
    }
    match std::net::TcpStream::connect(addr) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => panic!("{addr} still accepts connections: {other:?}"),
    }
}

/// How a test stops the primary.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// `kill -SIG PID`, as systemd's `KillMode=mixed` does.
    Primary(Signal),
    /// `kill -SIG -PGID`, as a terminal's Ctrl-C does.
    Group(Signal),
}

/// Stops the primary while its upgrade waits on a new primary that cannot be ready: the
/// binary on disk is a script that says `gate: waiting pid=$$` and blocks opening a FIFO
/// nobody writes before it `exec`s httpd-demo. The stop must end both primaries and leave
/// no listener.
#[track_caller]
fn check_stop_during_upgrade(stop: Stop) {
    let dir = target_tmp("stop-upgrade");
    let (mut server, binary) = from_copy(&dir, &[]);
    let workers = server.workers();
    let real = dir.path().join("httpd-demo-real");
    install_copy(&real);
    let gate = dir.path().join("gate");
    nix::unistd::mkfifo(&gate, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let script = format!(
        "#!/bin/sh\necho \"gate: waiting pid=$$\" >&2\nread _ < '{}'\nexec '{}' \"$@\"\n",
        gate.display(),
        real.display()
    );
    install_script(&binary, &script);
    let mark = server.log.mark();
    server.signal(Signal::SIGUSR2);
    let new_primary = pid_in(&server.log.wait_for(mark, "gate: waiting").1, "pid");
    server.adopt(new_primary);
    match stop {
        Stop::Primary(signal) => server.signal(signal),
        Stop::Group(signal) => server.signal_group(signal),
    }
    assert_eq!(server.wait().code(), Some(0), "the old primary exits 0");
    let mut pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    pids.push(new_primary);
    assert_all_gone(server.addr, &pids);
    server.log.wait_for(mark, "the upgrade was abandoned");
}

#[test]
fn sigterm_during_an_upgrade_stops_the_new_primary_too() {
    check_stop_during_upgrade(Stop::Primary(Signal::SIGTERM));
}

#[test]
fn sigint_during_an_upgrade_stops_the_new_primary_too() {
    check_stop_during_upgrade(Stop::Primary(Signal::SIGINT));
}

#[test]
fn ctrl_c_during_an_upgrade_stops_the_new_primary_too() {
    check_stop_during_upgrade(Stop::Group(Signal::SIGINT));
}

#[test]
fn an_upgrade_to_a_binary_that_exits_leaving_a_child_fails_at_once_and_leaves_nothing() {
    let upgrade_timeout = Duration::from_secs(10);
    let dir = target_tmp("upgrade-leak");
    let timeout = upgrade_timeout.as_secs().to_string();
    let (mut server, binary) = from_copy(&dir, &["--reload-timeout", &timeout]);
    let before = serving(&server);
    let workers = server.workers();
    // It exits at once; the background `sleep` inherits the listening socket and the
    // readiness socket (its own stdio goes nowhere, so the test's log pipe can end).
    let script = "#!/bin/sh\nsleep 300 </dev/null >/dev/null 2>&1 &\n\
                  echo \"left pid=$! behind\" >&2\nexit 1\n";
    install_script(&binary, script);
    let mark = server.log.mark();
    let started = Instant::now();
    server.signal(Signal::SIGUSR2);
    let new_primary = pid_in(
        &server.log.wait_for(mark, "upgrade: new primary started").1,
        "pid",
    );
    server.adopt(new_primary);
    let left = pid_in(&server.log.wait_for(mark, "left pid=").1, "pid");
    server.adopt(left);
    let (_, failed) = server.log.wait_for(mark, "upgrade failed");
    let took = started.elapsed();
    assert!(
        took < upgrade_timeout / 5,
        "the upgrade failed after {took:?} (timeout {upgrade_timeout:?}): {failed}"
    );
    assert!(failed.contains("exit code 1"), "{failed}");
    assert_eq!(serving(&server), before, "the old primary serves on");
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait().code(), Some(0));
    let mut pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    pids.extend([new_primary, left]);
    assert_all_gone(server.addr, &pids);
}
