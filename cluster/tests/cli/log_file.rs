//! `--log-file PATH`: the workers' lines and the primary's messages go to the file and
//! nothing to the terminal; SIGUSR1 after a rotation renamed the file (logrotate's
//! `postrotate`) reopens it: later lines go to the new file, none is lost or written
//! twice. Without a log file SIGUSR1 is ignored with a line; a reopen that fails keeps
//! the old file and says so. The worker is the Rust one (`examples/http_worker.rs`),
//! which writes TEXT as a line for each `GET /say/TEXT`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{KillOnDrop, LineLog, TempDir, http_get};

use crate::command::{Cluster, TIMEOUT, run_to_end};

/// The first line of a reopened log file (`REOPENED` in the command's `logfile.rs`).
const REOPENED: &str = "cluster: reopened the log file";

/// How often a file is read again while a test waits for a line in it.
const POLL: Duration = Duration::from_millis(10);

/// The text of `path`, empty while it does not exist.
fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Reads `paths` again every [`POLL`] until `done` holds for their texts (one string,
/// in the order given), for at most [`TIMEOUT`]; returns the texts.
#[track_caller]
fn wait_in_files(paths: &[&Path], what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text: String = paths.iter().map(|p| read(p)).collect();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in {paths:?} within {TIMEOUT:?}; they hold:\n{text}"
        );
        std::thread::sleep(POLL);
    }
}

/// Waits for `count` lines that contain `needle` in `path`; returns its text.
#[track_caller]
fn wait_lines_in(path: &Path, needle: &str, count: usize) -> String {
    wait_in_files(&[path], needle, |text| {
        text.lines().filter(|l| l.contains(needle)).count() >= count
    })
}

/// A `cluster --log-file` command and what it wrote to the terminal.
struct Logged {
    guard: KillOnDrop,
    terminal: LineLog,
    addr: SocketAddr,
}

impl Logged {
    /// Runs `cluster --workers 2 --log-file PATH -- http_worker` and waits until both
    /// workers listen (as the file says); adopts them.
    fn start(path: &Path) -> Logged {
        let worker = crate::rust_worker();
        let args: [&OsStr; 8] = [
            "--workers".as_ref(),
            "2".as_ref(),
            "--grace".as_ref(),
            "10s".as_ref(),
            "--log-file".as_ref(),
            path.as_os_str(),
            "--".as_ref(),
            worker.as_os_str(),
        ];
        let (mut guard, terminal) = crate::command::spawn(&args);
        let text = wait_lines_in(path, " is listening on ", 2);
        for line in text.lines() {
            if let Some(pid) = line
                .split_once(" started (pid ")
                .and_then(|(_, rest)| rest.strip_suffix(')')?.parse().ok())
            {
                guard.adopt(pid);
            }
        }
        let addr = text
            .lines()
            .find_map(|l| l.strip_prefix("listening on ")?.parse().ok())
            .unwrap_or_else(|| panic!("no address in the log file:\n{text}"));
        Logged {
            guard,
            terminal,
            addr,
        }
    }

    /// `GET /say/TEXT`: the worker that answers writes TEXT as a line.
    fn say(&self, text: &str) {
        say(self.addr, text);
    }

    fn signal(&self, signal: Signal) {
        self.guard.signal(signal).expect("signal the primary");
    }

    /// SIGTERM; checks that the command ends well and returns what it wrote to the
    /// terminal.
    fn stop(mut self) -> Vec<String> {
        self.signal(Signal::SIGTERM);
        let status = self.guard.wait_timeout(TIMEOUT).expect("wait");
        let status = status.unwrap_or_else(|| panic!("cluster did not exit"));
        assert!(self.terminal.wait_closed(TIMEOUT), "the output did not end");
        assert!(status.success(), "{status}: {}", self.terminal.tail(40));
        self.terminal.lines_from(0)
    }
}

/// `GET /say/TEXT` at `addr`.
#[track_caller]
fn say(addr: SocketAddr, text: &str) {
    let answered = http_get(addr, &format!("/say/{text}"));
    assert!(matches!(answered, Ok((200, _))), "{text}: {answered:?}");
}

/// Sets its flag when dropped: the test's client stops on every path, a failed
/// assertion included (so that nothing outlives the test).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How many times each worker line (`worker ID | TEXT`) says each TEXT.
fn said(text: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        if let Some((_, said)) = line.split_once(" | ") {
            *counts.entry(said.to_owned()).or_default() += 1;
        }
    }
    counts
}

#[test]
fn sigusr1_after_moving_the_log_file_sends_new_lines_to_the_new_file_and_loses_none() {
    let dir = TempDir::new("rotate");
    let path = dir.path().join("cluster.log");
    let rotated = dir.path().join("cluster.log.1");
    let cluster = Logged::start(&path);
    let (before, after) = (30, 30);
    for n in 0..before {
        cluster.say(&format!("before-{n}"));
    }
    // logrotate's rename, then its postrotate.
    std::fs::rename(&path, &rotated).expect("mv the log file");
    cluster.signal(Signal::SIGUSR1);
    let new = wait_lines_in(&path, REOPENED, 1);
    assert_eq!(
        new.lines().next(),
        Some(REOPENED),
        "the new file's first line"
    );
    for n in 0..after {
        cluster.say(&format!("after-{n}"));
    }
    let expected: Vec<String> = (0..before)
        .map(|n| format!("before-{n}"))
        .chain((0..after).map(|n| format!("after-{n}")))
        .collect();
    let both = [rotated.as_path(), path.as_path()];
    wait_in_files(&both, "every line", |text| {
        let said = said(text);
        expected.iter().all(|e| said.contains_key(e))
    });
    let terminal = cluster.stop();
    assert!(
        terminal.is_empty(),
        "with a log file, nothing on the terminal: {terminal:?}"
    );

    let (old, new) = (read(&rotated), read(&path));
    let counts = said(&format!("{old}{new}"));
    for line in &expected {
        assert_eq!(counts.get(line), Some(&1), "{line} once:\n{old}---\n{new}");
    }
    assert!(
        old.contains("| before-0"),
        "the old file kept its lines:\n{old}"
    );
    assert!(
        !old.contains("| after-"),
        "no line after the reopen in the old file:\n{old}"
    );
    assert!(!old.contains(REOPENED), "{old}");
    assert_eq!(new.lines().next(), Some(REOPENED), "{new}");
    assert!(
        new.contains(" exited (exit code 0, asked to stop)"),
        "{new}"
    );
}

/// A client that makes requests without a pause while the file is renamed and reopened:
/// each line it caused is in one file exactly once, and those of requests made after the
/// reopen line was seen only in the new file.
#[test]
fn a_reopen_under_steady_requests_loses_no_line() {
    let dir = TempDir::new("steady");
    let path = dir.path().join("cluster.log");
    let rotated = dir.path().join("cluster.log.1");
    let cluster = Logged::start(&path);
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    // Each request's text and when it was sent.
    let sent = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let client = std::thread::spawn({
        let (addr, stop, sent) = (cluster.addr, Arc::clone(&stop.0), Arc::clone(&sent));
        move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("steady-{n}");
                let at = Instant::now();
                say(addr, &text);
                sent.lock().expect("sent").push((text, at));
                n += 1;
            }
        }
    });
    let count = || sent.lock().expect("sent").len();
    let wait_for_requests = |more: usize| {
        let target = count() + more;
        let deadline = Instant::now() + TIMEOUT;
        while count() < target && !client.is_finished() {
            assert!(Instant::now() < deadline, "the client stalled");
            std::thread::sleep(POLL);
        }
    };
    wait_for_requests(50);
    std::fs::rename(&path, &rotated).expect("mv the log file");
    cluster.signal(Signal::SIGUSR1);
    wait_lines_in(&path, REOPENED, 1);
    let reopened = Instant::now();
    wait_for_requests(50);
    drop(stop);
    client.join().expect("the client");
    let sent = std::mem::take(&mut *sent.lock().expect("sent"));
    let both = [rotated.as_path(), path.as_path()];
    wait_in_files(&both, "every line", |text| {
        let said = said(text);
        sent.iter().all(|(text, _)| said.contains_key(text))
    });
    let terminal = cluster.stop();
    assert!(
        terminal.is_empty(),
        "with a log file, nothing on the terminal: {terminal:?}"
    );

    let (old, new) = (read(&rotated), read(&path));
    let (in_old, in_new) = (said(&old), said(&new));
    for (text, at) in &sent {
        let times = in_old.get(text).unwrap_or(&0) + in_new.get(text).unwrap_or(&0);
        assert_eq!(times, 1, "{text} once:\n{old}---\n{new}");
        if *at > reopened {
            assert!(
                !in_old.contains_key(text),
                "{text} after the reopen in the old file"
            );
        }
    }
    assert!(
        !in_old.is_empty() && !in_new.is_empty(),
        "both files have lines"
    );
    assert_eq!(new.lines().next(), Some(REOPENED), "{new}");
}

#[test]
fn sigusr1_without_a_log_file_is_ignored_with_a_line() {
    let worker = crate::rust_worker();
    let mut cluster = Cluster::start(1, &[OsStr::new("--"), worker.as_os_str()]);
    let mark = cluster.log.mark();
    cluster.signal(Signal::SIGUSR1);
    cluster
        .log
        .wait_for(mark, "SIGUSR1 ignored: there is no --log-file", TIMEOUT)
        .expect("the signal is ignored with a line");
    let answered = http_get(cluster.addr(), "/");
    assert!(matches!(answered, Ok((200, _))), "{answered:?}");
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

/// The log file's directory is gone at the reopen: the command writes on to the file it
/// has, and says so there and on stderr.
#[test]
fn a_failed_reopen_keeps_the_old_file_and_says_so() {
    let dir = TempDir::new("gone");
    std::fs::create_dir(dir.path().join("logs")).expect("mkdir");
    let path = dir.path().join("logs/cluster.log");
    let cluster = Logged::start(&path);
    let moved = dir.path().join("old");
    std::fs::rename(dir.path().join("logs"), &moved).expect("mv the directory");
    cluster.signal(Signal::SIGUSR1);
    let error = cluster
        .terminal
        .wait_for(0, "cannot reopen the log file", TIMEOUT)
        .expect("the failure on stderr");
    assert!(
        error.text.contains("No such file or directory"),
        "{}",
        error.text
    );
    cluster.say("kept");
    let old = moved.join("cluster.log");
    let text = wait_lines_in(&old, "| kept", 1);
    assert!(text.contains("cannot reopen the log file"), "{text}");
    // Said once, and nothing else reached the terminal.
    assert_eq!(cluster.stop(), [error.text]);
}

#[test]
fn a_log_file_that_cannot_be_opened_ends_the_command_at_once() {
    let dir = TempDir::new("unopenable");
    let path = dir.path().join("no such dir/cluster.log");
    let (status, output) = run_to_end(&[
        OsStr::new("--log-file"),
        path.as_os_str(),
        OsStr::new("--"),
        OsStr::new("/bin/true"),
    ]);
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains("cannot open the log file") && output.contains("No such file"),
        "{output}"
    );
    assert!(!output.contains("started"), "nothing was forked: {output}");
}
