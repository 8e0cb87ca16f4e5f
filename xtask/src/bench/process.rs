//! Processes the benchmarks start (servers, node, nginx, wrk, cargo bench), each in its own
//! process group, killed and reaped on every path: when dropped, when a step fails, and on
//! Ctrl-C or SIGTERM of xtask.
//!
//! # Caveats
//!
//! Killing is done per process group (`killpg`), so a peer's workers (nginx, Node cluster)
//! go with their primary even when it cannot pass the signal on. The group leader is
//! reaped here; its descendants are reaped by whoever adopts them once the leader is gone,
//! and [`Proc`]'s drop waits until the group is empty.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Process groups started and not yet reaped, for the Ctrl-C handler.
static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());
static HANDLER: Once = Once::new();

fn install_handler() {
    HANDLER.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            for pgid in LIVE.lock().map(|l| l.clone()).unwrap_or_default() {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
            std::process::exit(130);
        });
        if let Err(err) = installed {
            eprintln!("warning: no Ctrl-C handler ({err}); an interrupt may leave processes");
        }
    });
}

/// A child process leading its own process group; dropping it kills the whole group.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    child: Child,
    reaped: bool,
}

impl Proc {
    /// Starts `command` in a new process group.
    pub(crate) fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        install_handler();
        let child = command
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        LIVE.lock()
            .expect("live process groups")
            .insert(child.id() as i32);
        Ok(Self {
            name: name.to_owned(),
            child,
            reaped: false,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the process to exit by itself within `timeout`, collecting its standard
    /// output (which must be piped). Kills the group if it takes longer.
    pub(crate) fn output(mut self, timeout: Duration) -> Result<(bool, String, String)> {
        let mut stdout = self.child.stdout.take().context("stdout not piped")?;
        let stderr = self.child.stderr.take();
        let out = thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let err = thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                self.reaped = true;
                break status;
            }
            if Instant::now() > deadline {
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        };
        // The group may still hold helpers that keep the pipes open: end them.
        self.kill_group(Signal::SIGKILL);
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        Ok((status.success(), out, err))
    }

    /// Asks the group to stop with SIGTERM, then kills what is left after `grace`.
    pub(crate) fn stop(mut self, grace: Duration) {
        self.kill_group(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.reaped = true;
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        // Drop kills the rest and waits for the group to be empty.
    }

    fn kill_group(&self, signal: Signal) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), signal);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        self.kill_group(Signal::SIGKILL);
        if !self.reaped {
            let _ = self.child.wait();
        }
        // Wait (briefly) for the rest of the group, adopted and reaped by init.
        let deadline = Instant::now() + Duration::from_secs(3);
        while killpg(Pid::from_raw(pgid), None) != Err(Errno::ESRCH) && Instant::now() < deadline {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            thread::sleep(Duration::from_millis(10));
        }
        if let Ok(mut live) = LIVE.lock() {
            live.remove(&pgid);
        }
    }
}

/// Sends SIGKILL to one process (a worker of a server under test).
pub(crate) fn kill_pid(pid: u32) -> Result<()> {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).with_context(|| format!("killing {pid}"))
}

/// The live (non-zombie) children of `parent`, from `/proc`.
pub(crate) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(") ")?.1.to_owned();
                    let mut fields = rest.split_whitespace();
                    let state = fields.next()?;
                    let ppid: u32 = fields.next()?.parse().ok()?;
                    Some(ppid == parent && state != "Z")
                })
                .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// VmRSS of a process in MB (10^6 bytes), from `/proc/PID/status`.
pub(crate) fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024.0 / 1e6)
}

/// Every line a process prints on standard output and error, with the instant it was
/// read.
#[derive(Debug)]
pub(crate) struct Lines {
    rx: Receiver<(Instant, String)>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    /// Reads the piped standard output and error of `proc` in two threads.
    pub(crate) fn capture(proc: &mut Proc) -> Self {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let child = proc.child_mut();
        let streams: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        for stream in streams {
            let (tx, seen) = (tx.clone(), Arc::clone(&seen));
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let now = Instant::now();
                    seen.lock().expect("lines").push(line.clone());
                    if tx.send((now, line)).is_err() {
                        break;
                    }
                }
            });
        }
        Self { rx, seen }
    }

    /// Waits for the next line containing `needle`; returns when it was read and the line.
    pub(crate) fn wait_for(&self, needle: &str, timeout: Duration) -> Result<(Instant, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, line)) if line.contains(needle) => return Ok((at, line)),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "no line with {needle:?} within {timeout:?}; output:\n{}",
                        self.tail()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!(
                        "process ended before printing {needle:?}; output:\n{}",
                        self.tail()
                    )
                }
            }
        }
    }

    /// The last lines printed, for error messages.
    pub(crate) fn tail(&self) -> String {
        let seen = self.seen.lock().expect("lines");
        seen[seen.len().saturating_sub(15)..].join("\n")
    }
}

/// A `Command` with no standard input and piped output.
pub(crate) fn piped(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}
