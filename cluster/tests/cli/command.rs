//! The `cluster` command as a process: a guard that starts it and reads its output, and
//! the tests of how it fails.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use cluster::Endpoint;
use nix::sys::signal::Signal;
use testkit::{KillOnDrop, LineLog};

use crate::{node_or_skip, node_script};

/// How long any one step may take before a test fails.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(20);

/// A running `cluster` command; dropping it kills the primary and every worker it
/// reported.
pub(crate) struct Cluster {
    pub(crate) guard: KillOnDrop,
    /// Its stdout and stderr, interleaved.
    pub(crate) log: LineLog,
    /// The first address it printed.
    pub(crate) endpoint: Endpoint,
}

/// A worker as the command reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Started {
    pub(crate) id: u64,
    pub(crate) pid: u32,
}

impl Cluster {
    /// Runs `cluster ARGS` and waits until `workers` workers listen.
    pub(crate) fn start<S: AsRef<OsStr>>(workers: usize, args: &[S]) -> Cluster {
        Self::start_as(workers, Command::new(env!("CARGO_BIN_EXE_cluster")), args)
    }

    /// Runs `command` (the `cluster` command, or a wrapper that `exec`s it with the
    /// arguments it is given) with `--workers N ARGS` and waits until `workers` workers
    /// listen.
    pub(crate) fn start_as<S: AsRef<OsStr>>(
        workers: usize,
        mut command: Command,
        args: &[S],
    ) -> Cluster {
        let count = workers.to_string();
        command.args(["--workers", &count]);
        command.args(args);
        let (guard, log) = spawn_command(&mut command);
        let line = log
            .wait_for(0, "listening on ", TIMEOUT)
            .unwrap_or_else(|e| panic!("cluster never listened: {e}"));
        let endpoint = line
            .text
            .rsplit(' ')
            .next()
            .and_then(|a| a.parse::<Endpoint>().ok())
            .unwrap_or_else(|| panic!("no address in {:?}", line.text));
        let mut cluster = Cluster {
            guard,
            log,
            endpoint,
        };
        cluster.wait_listening(0, workers);
        cluster
    }

    /// Waits for `count` "worker N is listening" lines from line `from` on; adopts every
    /// worker started so far (so the guard kills them too) and returns them.
    pub(crate) fn wait_listening(&mut self, from: usize, count: usize) -> Vec<Started> {
        wait_lines(&self.log, from, " is listening on ", count);
        let started = self.started_from(from);
        for worker in &started {
            if !self.guard.adopted().contains(&worker.pid) {
                self.guard.adopt(worker.pid);
            }
        }
        started
    }

    /// The workers started from line `from` on.
    pub(crate) fn started_from(&self, from: usize) -> Vec<Started> {
        self.log
            .lines_from(from)
            .iter()
            .filter_map(|line| parse_started(line))
            .collect()
    }

    /// The first TCP address it printed.
    pub(crate) fn addr(&self) -> SocketAddr {
        (self.endpoint.inet()).unwrap_or_else(|| panic!("{} is not TCP", self.endpoint))
    }

    pub(crate) fn signal(&self, signal: Signal) {
        self.guard.signal(signal).expect("signal the primary");
    }

    /// Waits for the primary to exit.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        self.guard
            .wait_timeout(TIMEOUT)
            .expect("wait for cluster")
            .unwrap_or_else(|| panic!("cluster did not exit:\n{}", self.log.tail(40)))
    }
}

/// Waits for `count` lines that contain `needle`, from line `from` on; returns the index
/// just past the last of them.
pub(crate) fn wait_lines(log: &LineLog, from: usize, needle: &str, count: usize) -> usize {
    let mut next = from;
    for _ in 0..count {
        let line = log.wait_for(next, needle, TIMEOUT);
        next = line
            .unwrap_or_else(|e| panic!("no line {needle:?}: {e}"))
            .index
            + 1;
    }
    next
}

/// `cluster: worker ID started (pid PID)`.
fn parse_started(line: &str) -> Option<Started> {
    let rest = line.strip_prefix("cluster: worker ")?;
    let (id, rest) = rest.split_once(" started (pid ")?;
    let pid = rest.strip_suffix(')')?;
    Some(Started {
        id: id.parse().ok()?,
        pid: pid.parse().ok()?,
    })
}

/// The distinct pids among `workers`.
pub(crate) fn pids(workers: &[Started]) -> BTreeSet<u32> {
    workers.iter().map(|w| w.pid).collect()
}

/// Whether `pid` still exists (even as a zombie).
pub(crate) fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `cluster ARGS` under a guard, with its stdout and stderr collected.
pub(crate) fn spawn(args: &[&OsStr]) -> (KillOnDrop, LineLog) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cluster"));
    command.args(args).stdin(Stdio::null());
    spawn_command(&mut command)
}

/// Starts `command` under a guard, with its stdout and stderr collected (its stdin is
/// the caller's to set).
fn spawn_command(command: &mut Command) -> (KillOnDrop, LineLog) {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = KillOnDrop::spawn(command).expect("start cluster");
    let log = LineLog::new();
    log.collect(guard.child_mut().stdout.take().expect("stdout"));
    log.collect(guard.child_mut().stderr.take().expect("stderr"));
    (guard, log)
}

/// Runs `cluster ARGS` to its end and returns its status and everything it wrote.
pub(crate) fn run_to_end(args: &[&OsStr]) -> (ExitStatus, String) {
    let (mut guard, log) = spawn(args);
    let status = guard
        .wait_timeout(TIMEOUT)
        .expect("wait for cluster")
        .unwrap_or_else(|| panic!("cluster did not give up:\n{}", log.tail(40)));
    // The pipes close when the primary and its workers are gone: then every line is in.
    assert!(
        log.wait_closed(Duration::from_secs(10)),
        "the output did not end:\n{}",
        log.tail(40)
    );
    (status, log.tail(200))
}

#[test]
fn a_program_that_cannot_start_is_a_clear_error() {
    let (status, output) = run_to_end(&[OsStr::new("--"), OsStr::new("/nonexistent/program")]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("cannot start /nonexistent/program"),
        "{output}"
    );
    let (status, output) = run_to_end(&[OsStr::new("/nonexistent/app.js")]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("cannot start /nonexistent/app.js: no such file"),
        "{output}"
    );
}

#[test]
fn a_node_program_that_exits_at_once_ends_the_command_with_its_stderr() {
    if !node_or_skip() {
        return;
    }
    let script = node_script("crash.js");
    let (status, output) = run_to_end(&[
        OsStr::new("--workers"),
        OsStr::new("2"),
        OsStr::new("--max-restarts"),
        OsStr::new("2"),
        OsStr::new("--"),
        script.as_os_str(),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("every worker exited before it listened (worker "),
        "{output}"
    );
    assert!(
        output.contains("stderr:\n  | crashing on purpose"),
        "{output}"
    );
}
