//! `cargo xtask demo`: builds `httpd-demo`, runs it on a free loopback port and walks
//! through what the cluster does, failing if any step does not hold.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use testkit::{KillOnDrop, LineLog, WorkerInfo, is_running};

use crate::http::Client;

mod upgrade;

const WORKERS: usize = 3;
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the whole walk-through.
pub(crate) fn run() -> Result<()> {
    let out = Printer::new();
    out.title("Building httpd-demo (release)");
    let binary = build_release()?;
    let started = Instant::now();

    let mut server = Server::start(&binary)?;
    out.title(&format!(
        "httpd-demo: primary pid {} serving http://{} with {WORKERS} workers (round-robin)",
        server.pid(),
        server.addr
    ));
    let client = Client::new(&server.addr);
    let mut seen_pids: BTreeSet<u32> = BTreeSet::new();

    // 1. Spread.
    out.step(
        1,
        "20 requests, each on a new connection, and the worker that answered",
    );
    let mut spread: BTreeMap<u64, (u32, usize)> = BTreeMap::new();
    for _ in 0..20 {
        let w = client.worker()?;
        seen_pids.insert(w.pid);
        spread.entry(w.id).or_insert((w.pid, 0)).1 += 1;
    }
    out.table(
        &["worker id", "pid", "requests"],
        spread
            .iter()
            .map(|(id, (pid, n))| vec![id.to_string(), pid.to_string(), n.to_string()]),
    );
    ensure!(
        spread.len() == WORKERS,
        "expected all {WORKERS} workers to answer, got {}",
        spread.len()
    );
    out.ok(&format!(
        "round-robin spread the requests over all {WORKERS} workers"
    ));
    server.print_log(&out);

    // 2. Crash and respawn.
    out.step(2, "GET /crash: the worker panics, the primary replaces it");
    let before: BTreeSet<u64> = spread.keys().copied().collect();
    let crash = client.get("/crash");
    out.info(&format!(
        "/crash answered: {}",
        match &crash {
            Ok((status, _)) => format!("status {status}"),
            Err(err) => format!("no response ({err})"),
        }
    ));
    let deadline = Instant::now() + STEP_TIMEOUT;
    let mut answered = 0;
    let replacement = loop {
        ensure!(
            Instant::now() < deadline,
            "no replacement worker answered within {STEP_TIMEOUT:?}"
        );
        let w = client
            .worker()
            .context("service interrupted after the crash")?;
        answered += 1;
        seen_pids.insert(w.pid);
        if !before.contains(&w.id) {
            break w;
        }
    };
    out.ok(&format!(
        "replacement worker id {} pid {} is serving; all {answered} requests meanwhile succeeded",
        replacement.id, replacement.pid
    ));
    server.print_log(&out);

    // 3. Rolling reload under load.
    out.step(
        3,
        "SIGHUP: rolling reload while a client keeps sending requests",
    );
    let load = Load::start(client.clone());
    load.wait_for_requests(20)?;
    let old_ids = load.ids_so_far();
    let mark = server.log_mark();
    server.signal(Signal::SIGHUP)?;
    server.wait_for_log(mark, "rolling reload complete")?;
    let new_ids = load.wait_for_new_workers(&old_ids, WORKERS)?;
    let report = load.stop();
    seen_pids.extend(report.pids.iter().copied());
    out.table(
        &["", "count"],
        [
            vec![
                "requests sent".into(),
                report.ok.saturating_add(report.failed).to_string(),
            ],
            vec!["succeeded".into(), report.ok.to_string()],
            vec!["failed".into(), report.failed.to_string()],
        ],
    );
    ensure!(
        report.failed == 0,
        "{} requests failed during the reload",
        report.failed
    );
    out.ok(&format!(
        "every worker replaced (new ids {}), zero failed requests",
        new_ids
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    server.print_log(&out);

    // 4. Graceful stop with a request in flight.
    out.step(4, "SIGTERM while GET /sleep?ms=1500 is in flight");
    let (tx, rx) = mpsc::channel();
    let sleeper = client.clone();
    let mark = server.log_mark();
    thread::spawn(move || {
        let _ = tx.send(sleeper.get_with_headers("/sleep?ms=1500"));
    });
    server.wait_for_log(mark, "sleep request in flight")?;
    server.signal(Signal::SIGTERM)?;
    let (status, headers, body) = rx
        .recv_timeout(STEP_TIMEOUT)
        .context("the in-flight request never finished")??;
    ensure!(status == 200, "in-flight request got status {status}");
    out.ok(&format!(
        "in-flight request answered {status} {:?} with Connection: {}",
        body.trim(),
        headers
            .get("connection")
            .map(String::as_str)
            .unwrap_or("(none)")
    ));
    let code = server.wait(STEP_TIMEOUT)?;
    ensure!(code == Some(0), "primary exited with {code:?}, expected 0");
    out.ok("primary exited with code 0");
    server.print_log(&out);

    // 5. Deploy a new build under load: SIGHUP onto it, then SIGUSR2 for the primary.
    out.step(
        5,
        "a new binary under keep-alive load: SIGHUP reloads onto it, SIGUSR2 upgrades the primary",
    );
    seen_pids.extend(upgrade::run(&out, &binary)?);

    // 6. Nothing left behind.
    out.step(6, "no process of the demo is left");
    seen_pids.insert(server.pid());
    // A process that has closed its output may still be on its way out (its descriptors
    // close before it becomes a zombie), and one whose parent exited is not ours to wait
    // for: each gets until the step's deadline to be gone.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let alive = loop {
        let alive: Vec<u32> = seen_pids
            .iter()
            .copied()
            .filter(|p| is_running(*p))
            .collect();
        if alive.is_empty() || std::time::Instant::now() >= deadline {
            break alive;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    ensure!(alive.is_empty(), "processes still alive: {alive:?}");
    out.ok(&format!(
        "all {} processes (primary and every worker seen) are gone",
        seen_pids.len()
    ));
    out.title(&format!(
        "Demo passed in {:.1} s after the build",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

pub(crate) fn build_release() -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = crate::workspace_root();
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["build", "--release", "--quiet", "-p", "httpd-demo"])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build of httpd-demo failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("release/httpd-demo"))
}

/// The running server: its process (killed and reaped on every path), address and log.
struct Server {
    process: KillOnDrop,
    addr: String,
    log: LineLog,
    /// How many log lines were printed already.
    printed: usize,
}

impl Server {
    fn start(binary: &PathBuf) -> Result<Self> {
        let mut process = KillOnDrop::spawn(
            Command::new(binary)
                .args([
                    "--workers",
                    &WORKERS.to_string(),
                    "--port",
                    "0",
                    "--grace",
                    "5",
                ])
                .arg("--allow-crash")
                .env("RUST_LOG", "info")
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .with_context(|| format!("starting {}", binary.display()))?;
        let child = process.child_mut();
        let log = LineLog::of(child.stderr.take().expect("piped"));
        let stdout = LineLog::of(child.stdout.take().expect("piped"));
        let line = stdout
            .wait_for(0, "", STEP_TIMEOUT)
            .context("httpd-demo did not report its address")?
            .text;
        let addr = line
            .strip_prefix("listening on http://")
            .with_context(|| format!("unexpected first line from httpd-demo: {line:?}"))?
            .trim()
            .to_owned();
        Ok(Server {
            process,
            addr,
            log,
            printed: 0,
        })
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        self.process
            .signal(signal)
            .context("signalling the primary")
    }

    /// Waits for the primary to exit; returns its exit code.
    fn wait(&mut self, timeout: Duration) -> Result<Option<i32>> {
        match self.process.wait_timeout(timeout)? {
            Some(status) => Ok(status.code()),
            None => {
                // Not reaped yet, so the pid is still ours.
                let _ = self.signal(Signal::SIGKILL);
                bail!("primary did not exit within {timeout:?}")
            }
        }
    }

    fn print_log(&mut self, out: &Printer) {
        let lines = self.log.lines_from(self.printed);
        self.printed += lines.len();
        out.log(&lines);
    }

    /// How many log lines there are so far: a mark for [`Server::wait_for_log`].
    fn log_mark(&self) -> usize {
        self.log.mark()
    }

    /// Waits until a log line after `mark` contains `needle`.
    fn wait_for_log(&self, mark: usize, needle: &str) -> Result<()> {
        self.log
            .wait_for(mark, needle, STEP_TIMEOUT)
            .with_context(|| format!("the server never logged {needle:?}"))?;
        Ok(())
    }
}

/// A client thread that sends `GET /worker` in a loop and counts the results.
struct Load {
    stop: Arc<AtomicBool>,
    state: Arc<(Mutex<LoadReport>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

#[derive(Debug, Default, Clone)]
struct LoadReport {
    ok: usize,
    failed: usize,
    /// Worker ids in the order they answered.
    ids: Vec<u64>,
    pids: BTreeSet<u32>,
}

impl Load {
    fn start(client: Client) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state: Arc<(Mutex<LoadReport>, Condvar)> = Arc::default();
        let thread = thread::spawn({
            let (stop, state) = (Arc::clone(&stop), Arc::clone(&state));
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let result = client.worker();
                    let mut s = state.0.lock().expect("load");
                    match result {
                        Ok(WorkerInfo { id, pid }) => {
                            s.ok += 1;
                            s.ids.push(id);
                            s.pids.insert(pid);
                        }
                        Err(_) => s.failed += 1,
                    }
                    state.1.notify_all();
                }
            }
        });
        Load {
            stop,
            state,
            thread: Some(thread),
        }
    }

    /// Waits, woken by each answer, until `done` returns a value for the report so far.
    fn wait_until<T>(
        &self,
        what: &str,
        mut done: impl FnMut(&LoadReport) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let mut report = self.state.0.lock().expect("load");
        loop {
            if let Some(value) = done(&report) {
                return Ok(value);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(!left.is_zero(), "{what} within {STEP_TIMEOUT:?}");
            report = self.state.1.wait_timeout(report, left).expect("load").0;
        }
    }

    fn wait_for_requests(&self, n: usize) -> Result<()> {
        self.wait_until("the load generator got no answers", |r| {
            (r.ok >= n).then_some(())
        })
    }

    fn ids_so_far(&self) -> BTreeSet<u64> {
        self.state
            .0
            .lock()
            .expect("load")
            .ids
            .iter()
            .copied()
            .collect()
    }

    /// Waits until `count` workers that were not in `old` have answered and the last
    /// 50 answers all came from new workers.
    fn wait_for_new_workers(&self, old: &BTreeSet<u64>, count: usize) -> Result<Vec<u64>> {
        self.wait_until("reload did not replace every worker", |r| {
            let tail_is_new =
                r.ids.len() >= 50 && r.ids[r.ids.len() - 50..].iter().all(|id| !old.contains(id));
            let new: BTreeSet<u64> = r
                .ids
                .iter()
                .copied()
                .filter(|id| !old.contains(id))
                .collect();
            (tail_is_new && new.len() >= count).then(|| new.into_iter().collect())
        })
    }

    fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        std::mem::take(&mut *self.state.0.lock().expect("load"))
    }
}

/// Prints the walk-through, with colours only on a terminal.
struct Printer {
    colour: bool,
}

impl Printer {
    fn new() -> Self {
        Self {
            colour: std::io::stdout().is_terminal(),
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.colour {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn emit(&self, text: &str) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{text}");
    }

    fn title(&self, text: &str) {
        self.emit(&format!("\n{}", self.paint("1", &format!("== {text}"))));
    }

    fn step(&self, n: usize, text: &str) {
        self.emit(&format!(
            "\n{}",
            self.paint("1;36", &format!("[{n}/6] {text}"))
        ));
    }

    fn ok(&self, text: &str) {
        self.emit(&format!("  {} {text}", self.paint("32", "ok")));
    }

    fn info(&self, text: &str) {
        self.emit(&format!("  {text}"));
    }

    fn log(&self, lines: &[String]) {
        if lines.is_empty() {
            return;
        }
        self.emit(&format!("  {}", self.paint("2", "server log:")));
        for line in lines {
            self.emit(&format!("    {}", self.paint("2", line)));
        }
    }

    fn table(&self, header: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
        let rows: Vec<Vec<String>> = rows.into_iter().collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len())
                    .chain([header[i].len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<String>| {
            cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        self.emit(&format!(
            "  {}",
            self.paint("1", &line(header.iter().map(|h| h.to_string()).collect()))
        ));
        for row in rows {
            self.emit(&format!("  {}", line(row)));
        }
    }
}
