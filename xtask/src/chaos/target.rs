//! A target of `cargo xtask chaos` while it runs: `httpd-demo` under one policy, or the
//! `cluster` command running the Node app, started with `--log-format json` under a
//! `testkit::KillOnDrop` group guard.
//!
//! Its standard error is read by a thread of its own: every line goes to
//! `<target>/chaos/<name>.log`, and the primary's JSON event lines (at most
//! [`MAX_EVENTS`]) are kept for the checker and to follow the cluster: which primary is
//! current (a `SIGUSR2` upgrade starts a new one, which logs `primary-start`), which
//! workers it has. Every process seen (primaries, workers) is registered with its start
//! time in [`super::Registry`], so that it is killed on every path (Ctrl-C included) and
//! found if it is left over, never confusing it with a process that reused its pid.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;
use serde::Deserialize;
use testkit::KillOnDrop;

use super::Registry;
use super::schedule::FaultKind;

/// At most this many event lines are kept per target (a 10-minute run logs a few
/// thousand); the rest are counted.
pub(crate) const MAX_EVENTS: usize = 200_000;
/// How long a target may take to start, or to stop once asked.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Workers per target.
pub(crate) const WORKERS: usize = 3;

/// The program a target runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Program {
    HttpdDemo,
    Node,
}

/// One target: a program and a policy.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) program: Program,
    pub(crate) policy: &'static str,
}

impl Spec {
    pub(crate) fn name(&self) -> String {
        match self.program {
            Program::HttpdDemo => format!("httpd-demo/{}", self.policy),
            Program::Node => format!("node/{}", self.policy),
        }
    }

    /// The faults that apply: `SIGUSR2` is httpd-demo's alone.
    pub(crate) fn kinds(&self) -> Vec<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .filter(|k| *k != FaultKind::Upgrade || self.program == Program::HttpdDemo)
            .collect()
    }
}

/// One line of the primary's JSON event log, as the checker reads it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct LogEvent {
    /// Milliseconds since the Unix epoch.
    pub(crate) ts_ms: u64,
    /// The primary that wrote it.
    pub(crate) primary: u32,
    pub(crate) event: String,
    #[serde(default)]
    pub(crate) id: Option<u64>,
    #[serde(default)]
    pub(crate) pid: Option<u32>,
    #[serde(default)]
    pub(crate) status: Option<String>,
}

#[derive(Debug, Default)]
struct Events {
    events: Vec<LogEvent>,
    dropped: u64,
}

/// A running target.
pub(crate) struct Target {
    pub(crate) spec: Spec,
    pub(crate) addr: SocketAddr,
    /// The first primary (our child).
    first: Mutex<KillOnDrop>,
    first_pid: u32,
    events: Arc<Mutex<Events>>,
    registry: Arc<Registry>,
    readers: Vec<thread::JoinHandle<()>>,
}

/// The binaries the targets run.
#[derive(Debug, Clone)]
pub(crate) struct Binaries {
    pub(crate) httpd_demo: PathBuf,
    pub(crate) cluster: PathBuf,
    pub(crate) node_app: PathBuf,
}

impl Target {
    /// Starts `spec` on a free port and waits until its workers all listen and it answers.
    pub(crate) fn start(
        spec: &Spec,
        binaries: &Binaries,
        out_dir: &Path,
        registry: &Arc<Registry>,
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?
            .port();
        let workers = WORKERS.to_string();
        let mut command = match spec.program {
            Program::HttpdDemo => {
                let mut c = Command::new(&binaries.httpd_demo);
                c.args(["--workers", &workers, "--policy", spec.policy])
                    .args(["--port", &port.to_string(), "--log-format", "json"]);
                c
            }
            Program::Node => {
                let mut c = Command::new(&binaries.cluster);
                c.args(["--workers", &workers, "--policy", spec.policy])
                    .args(["--log-format", "json", "--"])
                    .arg(&binaries.node_app)
                    .arg(port.to_string());
                c
            }
        };
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut first = KillOnDrop::spawn_group(&mut command)
            .with_context(|| format!("starting {}", spec.name()))?;
        registry.add(first.pid());
        let file_name = spec.name().replace('/', "-");
        let events = Arc::new(Mutex::new(Events::default()));
        let child = first.child_mut();
        let stdout = child.stdout.take().context("piped stdout")?;
        let stderr = child.stderr.take().context("piped stderr")?;
        let readers = vec![
            read_lines(
                stdout,
                out_dir.join(format!("{file_name}.stdout.log")),
                None,
                registry,
            ),
            read_lines(
                stderr,
                out_dir.join(format!("{file_name}.stderr.log")),
                Some(Arc::clone(&events)),
                registry,
            ),
        ];
        let target = Self {
            spec: spec.clone(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            first_pid: first.pid(),
            first: Mutex::new(first),
            events,
            registry: Arc::clone(registry),
            readers,
        };
        target.wait_serving()?;
        Ok(target)
    }

    /// Waits until the first primary's workers all listen and `GET /` answers 200.
    fn wait_serving(&self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        let primary = self.first_pid;
        loop {
            let listening = self
                .events()
                .iter()
                .filter(|e| e.primary == primary && e.event == "listening")
                .count();
            if listening >= WORKERS && matches!(testkit::http_get(self.addr, "/"), Ok((200, _))) {
                return Ok(());
            }
            if !testkit::is_running(primary) {
                bail!(
                    "{} exited while starting; see target/chaos/*.log",
                    self.spec.name()
                );
            }
            if Instant::now() > deadline {
                bail!("{} not serving within {TIMEOUT:?}", self.spec.name());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A copy of the event lines so far.
    pub(crate) fn events(&self) -> Vec<LogEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .events
            .clone()
    }

    /// Event lines dropped past [`MAX_EVENTS`].
    pub(crate) fn dropped_events(&self) -> u64 {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dropped
    }

    /// The current primary: the newest that logged `primary-start` and still runs, else
    /// the first.
    pub(crate) fn primary(&self) -> u32 {
        let events = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        events
            .events
            .iter()
            .rev()
            .filter(|e| e.event == "primary-start")
            .map(|e| e.primary)
            .find(|&pid| self.registry.is_ours_and_running(pid))
            .unwrap_or(self.first_pid)
    }

    /// Every primary of the run that still runs.
    pub(crate) fn primaries(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .events()
            .iter()
            .filter(|e| e.event == "primary-start")
            .map(|e| e.primary)
            .chain([self.first_pid])
            .filter(|&pid| self.registry.is_ours_and_running(pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The current primary's live workers (forked, not exited), in id order.
    pub(crate) fn workers(&self) -> Vec<u32> {
        let primary = self.primary();
        let mut live: BTreeMap<u64, u32> = BTreeMap::new();
        for e in self.events().iter().filter(|e| e.primary == primary) {
            match (e.event.as_str(), e.id, e.pid) {
                ("fork", Some(id), Some(pid)) => {
                    live.insert(id, pid);
                }
                ("exit", Some(id), _) => {
                    live.remove(&id);
                }
                _ => {}
            }
        }
        live.into_values()
            .filter(|&pid| self.registry.is_ours_and_running(pid))
            .collect()
    }

    /// Reaps what exited among our children: the first primary, and the primaries and
    /// workers this process inherited as the subreaper (a new primary once the old one
    /// is gone). Returns whether the first primary has exited.
    pub(crate) fn reap(&self) -> bool {
        let first = self.first_pid;
        for pid in self.registry.pids() {
            if pid != first
                && let Ok(raw) = i32::try_from(pid)
            {
                let _ = waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG));
            }
        }
        let mut first = self.first.lock().unwrap_or_else(PoisonError::into_inner);
        matches!(first.try_wait(), Ok(Some(_)))
    }

    /// Stops the target as an operator does (`SIGTERM` to every primary) and waits until
    /// every process of the run is gone or [`TIMEOUT`] passed; reaps what is ours.
    pub(crate) fn stop(&mut self) -> Result<Duration> {
        let started = Instant::now();
        for pid in self.primaries() {
            self.registry.signal(pid, Signal::SIGTERM);
        }
        let deadline = started + TIMEOUT;
        loop {
            let first_gone = self.reap();
            if first_gone && self.registry.running().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} still running {TIMEOUT:?} after SIGTERM: {:?}",
                    self.spec.name(),
                    self.registry.running()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(started.elapsed())
    }

    /// Waits for the log readers to see the end of the output (after [`Target::stop`]).
    pub(crate) fn finish_logs(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        for reader in self.readers.drain(..) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.registry.kill_all();
        let _ = self.reap();
    }
}

/// Reads `stream` line by line into `file`; JSON event lines also into `events`, whose
/// forks and primary starts are registered.
fn read_lines(
    stream: impl Read + Send + 'static,
    file: PathBuf,
    events: Option<Arc<Mutex<Events>>>,
    registry: &Arc<Registry>,
) -> thread::JoinHandle<()> {
    let registry = Arc::clone(registry);
    thread::spawn(move || {
        let mut out = std::fs::File::create(&file)
            .ok()
            .map(std::io::BufWriter::new);
        let mut lines = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match lines.by_ref().take(64 * 1024).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(out) = out.as_mut() {
                let _ = out.write_all(&line);
            }
            let Some(events) = events.as_ref() else {
                continue;
            };
            if !line.starts_with(b"{") {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<LogEvent>(&line) else {
                continue;
            };
            if let Some(pid) = event.pid.filter(|_| event.event == "fork") {
                registry.add(pid);
            }
            if event.event == "primary-start" {
                registry.add(event.primary);
            }
            let mut events = events.lock().unwrap_or_else(PoisonError::into_inner);
            if events.events.len() < MAX_EVENTS {
                events.events.push(event);
            } else {
                events.dropped += 1;
            }
        }
        if let Some(mut out) = out {
            let _ = out.flush();
        }
    })
}
