//! The server under test: an `httpd-demo` primary under a [`KillOnDrop`] guard (always
//! killed and reaped), its log collected line by line, and what `/proc` says about its
//! processes.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{KillOnDrop, LineLog, ProcStat, WorkerInfo};

pub(crate) use testkit::is_running;

/// How many workers every test server runs.
pub(crate) const WORKERS: usize = 2;
/// The longest any single step of a test may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(15);

/// Everything the primary and its workers wrote to standard error, as it arrives.
#[derive(Debug)]
pub(crate) struct Log(LineLog);

impl Log {
    /// The number of lines so far: where to start looking for what happens next.
    pub(crate) fn mark(&self) -> usize {
        self.0.mark()
    }

    /// Waits for the first line at index `from` or later that contains `needle`; returns
    /// its index and text. Fails with the log's tail at the deadline or the log's end.
    #[track_caller]
    pub(crate) fn wait_for(&self, from: usize, needle: &str) -> (usize, String) {
        match self.0.wait_for(from, needle, TIMEOUT) {
            Ok(line) => (line.index, line.text),
            Err(err) => panic!("{err}"),
        }
    }

    /// Every line from index `from` on.
    pub(crate) fn lines_from(&self, from: usize) -> Vec<String> {
        self.0.lines_from(from)
    }

    /// Every `worker started` line from index `from` on.
    pub(crate) fn started(&self, from: usize) -> Vec<WorkerInfo> {
        let lines = self.0.lines_from(from);
        lines
            .iter()
            .filter(|l| l.contains("worker started"))
            .map(|l| worker_started(l))
            .collect()
    }
}

/// Parses `worker started id=N pid=P`.
#[track_caller]
pub(crate) fn worker_started(line: &str) -> WorkerInfo {
    WorkerInfo::from_log_line(line).unwrap_or_else(|| panic!("no id=N pid=P in {line:?}"))
}

/// A running `httpd-demo --workers 2 --port 0 ...`. Dropping it SIGKILLs and reaps the
/// primary; its workers die with it (their parent-death signal), even when a test fails.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) log: Log,
    process: KillOnDrop,
}

impl Server {
    /// Starts the server and returns once every worker is listening.
    pub(crate) fn start(extra_args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_httpd-demo"));
        command
            .args(["--workers", &WORKERS.to_string(), "--port", "0"])
            .args(extra_args)
            .stdin(Stdio::null());
        Self::spawn(&mut command)
    }

    /// Starts `command` (an `httpd-demo` primary, or a wrapper that `exec`s one) as the
    /// leader of its own process group, so a test can signal the group as a terminal would
    /// and dropping the server kills everything it started (an upgrade's new primary
    /// too). Its stdin is the caller's to set. Returns once [`WORKERS`] workers are listening.
    pub(crate) fn spawn(command: &mut Command) -> Self {
        command
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env_remove(cluster::WORKER_ID_ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A copy of the binary that a test has just written may still be open for writing
        // in a child that another test's thread forked meanwhile, until that child's exec
        // closes it; exec fails with ETXTBSY for that long.
        let deadline = Instant::now() + TIMEOUT;
        let mut process = loop {
            match KillOnDrop::spawn_group(command) {
                Err(e)
                    if e.kind() == ErrorKind::ExecutableFileBusy && Instant::now() < deadline =>
                {
                    std::thread::yield_now();
                }
                spawned => break spawned.expect("starting httpd-demo"),
            }
        };
        let child = process.child_mut();
        let log = Log(LineLog::of(child.stderr.take().expect("piped")));
        let stdout = LineLog::of(child.stdout.take().expect("piped"));
        let line = stdout.wait_for(0, "", TIMEOUT).map(|l| l.text);
        let line = line.unwrap_or_default();
        let addr = line
            .strip_prefix("listening on http://")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| {
                panic!("first line of stdout {line:?}, want the address; log: {log:?}")
            });
        let server = Server { addr, log, process };
        let mut from = 0;
        for _ in 0..WORKERS {
            from = server.log.wait_for(from, "worker listening").0 + 1;
        }
        server
    }

    /// Kills `pid` too when the server is dropped (a process it started that is not ours).
    pub(crate) fn adopt(&mut self, pid: u32) {
        self.process.adopt(pid);
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The workers started so far, from the `worker started` log lines.
    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        self.log.started(0)
    }

    pub(crate) fn signal(&self, signal: Signal) {
        let pid = self.pid();
        self.process
            .signal(signal)
            .unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
    }

    /// Signals the primary's whole process group, as a terminal's Ctrl-C does.
    pub(crate) fn signal_group(&self, signal: Signal) {
        self.process.signal_group(signal).expect("killpg");
    }

    /// Waits for the primary to exit and reaps it.
    #[track_caller]
    pub(crate) fn wait(&mut self) -> ExitStatus {
        self.process
            .wait_timeout(TIMEOUT)
            .expect("reaping the primary")
            .expect("the primary did not exit in time")
    }
}

pub(crate) fn signal_pid(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid"));
    kill(pid, signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    ProcStat::read(pid).map(|stat| stat.ppid)
}
