//! Processes the benchmarks start (servers, node, nginx, wrk, cargo bench), each in its own
//! process group, killed and reaped on every path: when dropped, when a step fails, and on
//! Ctrl-C or SIGTERM of xtask.
//!
//! # Caveats
//!
//! Killing is done per process group (`killpg`), so a peer's workers (nginx, Node cluster)
//! go with their primary even when it cannot pass the signal on. The group leader is
//! reaped here; its descendants are reaped by whoever adopts them once the leader is gone,
//! and [`Proc`]'s guard ([`testkit::KillOnDrop::spawn_group`]) waits until the group is
//! empty.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Once;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{KillOnDrop, LineLog};

pub(crate) use testkit::children_of;

static HANDLER: Once = Once::new();

fn install_handler() {
    HANDLER.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            testkit::kill_all_groups();
            std::process::exit(130);
        });
        if let Err(err) = installed {
            eprintln!("warning: no Ctrl-C handler ({err}); an interrupt may leave processes");
        }
    });
}

/// A named child process leading its own process group, under a [`KillOnDrop`] group
/// guard: dropping it kills the whole group.
#[derive(Debug)]
pub(crate) struct Proc {
    name: String,
    guard: KillOnDrop,
}

impl Proc {
    /// Starts `command` in a new process group.
    pub(crate) fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        install_handler();
        let guard = KillOnDrop::spawn_group(command).with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            guard,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Reaps the process if it has exited.
    pub(crate) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.guard.try_wait()?)
    }

    /// Waits for the process to exit by itself within `timeout`, collecting its standard
    /// output (which must be piped). Kills the group if it takes longer.
    pub(crate) fn output(mut self, timeout: Duration) -> Result<(bool, String, String)> {
        let child = self.guard.child_mut();
        let mut stdout = child.stdout.take().context("stdout not piped")?;
        let stderr = child.stderr.take();
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
        let Some(status) = self.guard.wait_timeout(timeout)? else {
            bail!("{} did not finish within {timeout:?}", self.name);
        };
        // The group may still hold helpers that keep the pipes open: end them.
        let _ = self.guard.signal_group(Signal::SIGKILL);
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        Ok((status.success(), out, err))
    }

    /// Asks the group to stop with SIGTERM, then kills what is left after `grace`.
    pub(crate) fn stop(mut self, grace: Duration) {
        let _ = self.guard.signal_group(Signal::SIGTERM);
        let _ = self.guard.wait_timeout(grace);
        // Dropping the guard kills the rest and waits for the group to be empty.
    }
}

/// Sends SIGKILL to one process (a worker of a server under test).
pub(crate) fn kill_pid(pid: u32) -> Result<()> {
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).with_context(|| format!("killing {pid}"))
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

/// Every line a process prints on standard output and error, read in order: each wait
/// looks at the lines after the one the previous wait returned.
#[derive(Debug)]
pub(crate) struct Lines {
    log: LineLog,
    next: usize,
}

impl Lines {
    /// Reads the piped standard output and error of `proc` in two threads.
    pub(crate) fn capture(proc: &mut Proc) -> Self {
        let child = proc.guard.child_mut();
        let log = LineLog::new();
        if let Some(stdout) = child.stdout.take() {
            log.collect(stdout);
        }
        if let Some(stderr) = child.stderr.take() {
            log.collect(stderr);
        }
        Self { log, next: 0 }
    }

    /// Waits for the next line containing `needle`; returns when it was read and the line.
    pub(crate) fn wait_for(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(Instant, String)> {
        let line = self.log.wait_for(self.next, needle, timeout)?;
        self.next = line.index + 1;
        Ok((line.at, line.text))
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
