//! Integration tests of the `child` crate: Node's test-child-process-* behaviours, fd hygiene,
//! zombies, detached processes and fork, run against real processes and helper binaries.

mod exec;
mod fds;
mod fork;
mod spawn;

use std::time::{Duration, Instant};

use child::{SpawnOptions, Stdio};
use testkit::{KillOnDrop, ProcStat};

/// Spawn options for tests: nothing inherited from the test's stdio, killed if the test
/// fails before waiting (and then reaped by the crate's orphan reaper).
fn options() -> SpawnOptions {
    SpawnOptions::new().kill_on_drop(true)
}

/// Options with stdin and stderr at /dev/null and stdout piped.
fn quiet_options() -> SpawnOptions {
    options().stdin(Stdio::Null).stderr(Stdio::Null)
}

/// Kills `pid`, a process that is not our child (a detached grandchild), when dropped.
fn kill_on_drop(pid: i32) -> KillOnDrop {
    let mut guard = KillOnDrop::default();
    guard.adopt(u32::try_from(pid).expect("a pid"));
    guard
}

/// The state letter of `/proc/<pid>/stat` (`R`, `S`, `Z`, ...), or `None` once reaped.
fn process_state(pid: u32) -> Option<char> {
    ProcStat::read(pid).map(|stat| stat.state)
}

/// Waits (bounded) until `pid` no longer exists, not even as a zombie. The reaping is done
/// by another thread, so this polls the process table until the deadline.
#[track_caller]
fn assert_reaped(pid: u32) {
    wait_for_state(pid, |state| state.is_none());
}

/// Waits (bounded) until `pid` has died: it is a zombie or gone. A process closes its
/// files before it turns into a zombie, so its pipes reach end-of-file slightly earlier.
#[track_caller]
fn assert_dead(pid: u32) {
    wait_for_state(pid, |state| state.is_none_or(|s| s == 'Z'));
}

#[track_caller]
fn wait_for_state(pid: u32, done: impl Fn(Option<char>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = process_state(pid);
        if done(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} still present in state {state:?}"
        );
        std::thread::yield_now();
    }
}

/// Runs the `child_parent` helper in `case` (a std child, so the crate under test is not
/// the one that starts it) and returns its stdout, or panics with how it ended.
#[track_caller]
fn run_child_parent(case: &str) -> String {
    let out = KillOnDrop::spawn(
        std::process::Command::new(helper("child_parent"))
            .arg(case)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
    .expect("spawn child_parent")
    .wait_with_output()
    .expect("wait for child_parent");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child_parent {case} ended with {:?}: {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Path of a helper binary of this crate.
fn helper(name: &str) -> &'static str {
    match name {
        "child_fds" => env!("CARGO_BIN_EXE_child_fds"),
        "child_forked" => env!("CARGO_BIN_EXE_child_forked"),
        "child_detach" => env!("CARGO_BIN_EXE_child_detach"),
        "child_parent" => env!("CARGO_BIN_EXE_child_parent"),
        other => panic!("no helper {other}"),
    }
}
