//! The server under test: an `httpd-demo` primary that is always killed and reaped, its
//! log collected line by line, and what `/proc` says about its processes.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

use crate::http::WorkerInfo;

/// How many workers every test server runs.
pub(crate) const WORKERS: usize = 2;
/// The longest any single step of a test may take.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Default)]
struct Lines {
    lines: Vec<String>,
    /// Standard error reached its end: the primary and every worker closed it.
    closed: bool,
}

/// Everything the primary and its workers wrote to standard error, as it arrives.
#[derive(Debug, Default)]
pub(crate) struct Log {
    lines: Mutex<Lines>,
    changed: Condvar,
}

impl Log {
    /// The lines, also after a test thread panicked while holding them.
    fn lines(&self) -> MutexGuard<'_, Lines> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn collect(self: Arc<Self>, stderr: impl Read + Send + 'static) {
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                self.lines().lines.push(line);
                self.changed.notify_all();
            }
            self.lines().closed = true;
            self.changed.notify_all();
        });
    }

    /// The number of lines so far: where to start looking for what happens next.
    pub(crate) fn mark(&self) -> usize {
        self.lines().lines.len()
    }

    /// Waits for the first line at index `from` or later that contains `needle`; returns
    /// its index and text. Fails with the log's tail at the deadline or the log's end.
    #[track_caller]
    pub(crate) fn wait_for(&self, from: usize, needle: &str) -> (usize, String) {
        let deadline = Instant::now() + TIMEOUT;
        let mut log = self.lines();
        loop {
            let mut found = log.lines.iter().enumerate().skip(from);
            if let Some((i, line)) = found.find(|(_, l)| l.contains(needle)) {
                return (i, line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || log.closed {
                let tail = log.lines[log.lines.len().saturating_sub(40)..].join("\n");
                panic!("no log line {needle:?} after line {from}; the log ends:\n{tail}");
            }
            log = self
                .changed
                .wait_timeout(log, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Every `worker started` line from index `from` on.
    pub(crate) fn started(&self, from: usize) -> Vec<WorkerInfo> {
        let log = self.lines();
        let lines = log.lines.iter().skip(from);
        lines
            .filter(|l| l.contains("worker started"))
            .map(|l| worker_started(l))
            .collect()
    }
}

/// Parses `worker started id=N pid=P`.
#[track_caller]
pub(crate) fn worker_started(line: &str) -> WorkerInfo {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
    };
    WorkerInfo {
        id: field("id"),
        pid: u32::try_from(field("pid")).expect("a pid"),
    }
}

/// A running `httpd-demo --workers 2 --port 0 ...`. Dropping it SIGKILLs and reaps the
/// primary; its workers die with it (their parent-death signal), even when a test fails.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) log: Arc<Log>,
    child: Child,
    /// Receives once the primary has exited (it stays unreaped until `wait` or drop).
    exited: mpsc::Receiver<()>,
}

impl Server {
    /// Starts the server and returns once every worker is listening.
    pub(crate) fn start(extra_args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_httpd-demo"))
            .args(["--workers", &WORKERS.to_string(), "--port", "0"])
            .args(extra_args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env_remove(cluster::WORKER_ID_ENV)
            // Its own process group, so a test can signal the group as a terminal would.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting httpd-demo");
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
        let (exit_tx, exited) = mpsc::channel();
        // WNOWAIT: notices the exit without reaping, so the pid stays ours until reaped.
        thread::spawn(move || {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            while waitid(Id::Pid(pid), flags) == Err(Errno::EINTR) {}
            let _ = exit_tx.send(());
        });
        let log = Arc::new(Log::default());
        Arc::clone(&log).collect(stderr.expect("piped"));
        let (first_tx, first_line) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout.expect("piped")).lines();
            let _ = first_tx.send(lines.next());
            lines.for_each(drop);
        });
        let mut server = Server {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            log,
            child,
            exited,
        };
        let line = first_line.recv_timeout(TIMEOUT).ok().flatten();
        let line = line.and_then(Result::ok).unwrap_or_default();
        server.addr = line
            .strip_prefix("listening on http://")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("first line of stdout {line:?}, want the address"));
        let mut from = 0;
        for _ in 0..WORKERS {
            from = server.log.wait_for(from, "worker listening").0 + 1;
        }
        server
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The workers started so far, from the `worker started` log lines.
    pub(crate) fn workers(&self) -> Vec<WorkerInfo> {
        self.log.started(0)
    }

    pub(crate) fn signal(&self, signal: Signal) {
        signal_pid(self.pid(), signal);
    }

    /// Signals the primary's whole process group, as a terminal's Ctrl-C does.
    pub(crate) fn signal_group(&self, signal: Signal) {
        let pgid = Pid::from_raw(i32::try_from(self.pid()).expect("a pid"));
        nix::sys::signal::killpg(pgid, signal).expect("killpg");
    }

    /// Waits for the primary to exit and reaps it.
    #[track_caller]
    pub(crate) fn wait(&mut self) -> ExitStatus {
        self.exited
            .recv_timeout(TIMEOUT)
            .expect("the primary did not exit in time");
        self.child.wait().expect("reaping the primary")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Both are no-ops once `wait` has reaped the primary.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn signal_pid(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("a pid"));
    kill(pid, signal).unwrap_or_else(|e| panic!("kill -{signal} {pid}: {e}"));
}

/// A process's state letter and parent pid, from `/proc/PID/stat`; `None` once it is gone.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the state follows the last ')'.
    let mut fields = stat.rsplit_once(") ")?.1.split(' ');
    let state = fields.next()?.chars().next()?;
    let parent = fields.next()?.parse().ok()?;
    Some((state, parent))
}

/// The process exists and is neither a zombie nor dead.
pub(crate) fn is_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

pub(crate) fn parent_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|(_, parent)| parent)
}
