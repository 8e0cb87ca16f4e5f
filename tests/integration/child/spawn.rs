//! `spawn`: stdio, kill, wait, timeout, cancellation, detached processes, drop.

use std::time::Duration;

use child::{Error, ExitStatus, Signal, SpawnErrorKind, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::{assert_reaped, helper, kill_on_drop, options, process_state, quiet_options};

async fn stdout_of(
    program: &str,
    args: &[&str],
    options: child::SpawnOptions,
) -> (String, ExitStatus) {
    let child = child::spawn(program, args, options).expect("spawn");
    let output = child.wait_with_output().await.expect("wait");
    (
        String::from_utf8(output.stdout).expect("utf-8"),
        output.status,
    )
}

#[tokio::test]
async fn spawn_returns_before_any_output_and_pipes_work() {
    let mut cat = child::spawn("cat", [] as [&str; 0], options()).expect("spawn");
    assert!(cat.pid() > 0);
    assert_eq!(
        cat.try_wait().unwrap(),
        None,
        "cat waits for input, so it cannot have exited"
    );
    let mut stdin = cat.stdin.take().unwrap();
    stdin.write_all(b"ping").await.unwrap();
    drop(stdin);
    let mut echoed = String::new();
    cat.stdout
        .take()
        .unwrap()
        .read_to_string(&mut echoed)
        .await
        .unwrap();
    assert_eq!(echoed, "ping");
    assert_eq!(cat.wait().await.unwrap(), ExitStatus::Exited(0));
}

#[tokio::test]
async fn kill_marks_the_child_killed_and_the_exit_shows_the_signal() {
    let sleeper = child::spawn("sleep", ["30"], quiet_options()).expect("spawn");
    assert!(!sleeper.killed());
    assert!(sleeper.kill(Signal::SIGTERM).unwrap());
    assert!(sleeper.killed());
    let status = sleeper.wait().await.unwrap();
    assert_eq!(
        (status.code(), status.signal()),
        (None, Some(Signal::SIGTERM))
    );
    assert!(
        !sleeper.kill(Signal::SIGTERM).unwrap(),
        "an exited child is never signalled again"
    );
    assert_eq!(sleeper.wait().await.unwrap(), status, "wait is repeatable");
}

#[tokio::test]
async fn wait_and_kill_run_concurrently() {
    let sleeper = child::spawn("sleep", ["30"], quiet_options()).expect("spawn");
    let (status, sent) = tokio::join!(sleeper.wait(), async { sleeper.kill(Signal::SIGKILL) });
    assert!(sent.unwrap());
    assert_eq!(status.unwrap().signal(), Some(Signal::SIGKILL));
}

#[tokio::test]
async fn spawn_failures_are_typed_and_name_the_program() {
    let Err(Error::Spawn(err)) = child::spawn("no-such-program-xyz", ["a", "b"], options()) else {
        panic!("expected a spawn error");
    };
    assert_eq!(err.kind(), SpawnErrorKind::NotFound);
    assert_eq!(err.program(), "no-such-program-xyz");
    assert_eq!(err.args(), ["a", "b"]);
    assert_eq!(
        err.to_string(),
        "spawn no-such-program-xyz ENOENT: not found"
    );
    assert_eq!(err.cwd(), None);
    let Err(Error::Spawn(err)) = child::spawn("/etc/passwd", [] as [&str; 0], options()) else {
        panic!("expected a spawn error");
    };
    assert_eq!(err.kind(), SpawnErrorKind::PermissionDenied);
    let Err(Error::Spawn(err)) =
        child::spawn("/bin/true", [] as [&str; 0], options().cwd("/no/such/dir"))
    else {
        panic!("expected a spawn error");
    };
    assert_eq!(err.kind(), SpawnErrorKind::NotFound);
    assert_eq!(err.cwd(), Some(std::path::Path::new("/no/such/dir")));
    assert_eq!(
        err.to_string(),
        "spawn /bin/true ENOENT: working directory /no/such/dir not found"
    );
    let err =
        child::exec_file_sync("no-such-program-xyz", ["a"], child::ExecOptions::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "could not start `no-such-program-xyz a`: ENOENT"
    );
}

#[tokio::test]
async fn timeout_kills_with_sigterm_by_default_and_the_kill_signal_when_asked() {
    for (signal, options) in [
        (
            Signal::SIGTERM,
            quiet_options().timeout(Duration::from_millis(50)),
        ),
        (
            Signal::SIGKILL,
            quiet_options()
                .timeout(Duration::from_millis(50))
                .kill_signal(Signal::SIGKILL),
        ),
    ] {
        let sleeper = child::spawn("sleep", ["30"], options).expect("spawn");
        assert_eq!(sleeper.wait().await.unwrap().signal(), Some(signal));
        assert!(sleeper.killed());
    }
}

#[tokio::test]
async fn cancellation_kills_the_child() {
    let token = CancellationToken::new();
    let sleeper = child::spawn(
        "sleep",
        ["30"],
        quiet_options().cancel_on(token.clone().cancelled_owned()),
    )
    .expect("spawn");
    token.cancel();
    assert_eq!(
        sleeper.wait().await.unwrap().signal(),
        Some(Signal::SIGTERM)
    );
    assert!(sleeper.killed());
}

#[tokio::test]
async fn env_cwd_argv0_and_shell() {
    let (env, _) = stdout_of(
        "/usr/bin/env",
        &[],
        quiet_options().env_clear().env("ONLY", "this"),
    )
    .await;
    assert_eq!(env, "ONLY=this\n");
    let inherited = quiet_options()
        .env("ipc_crate_does_not_matter", "1")
        .env(ipc::CHANNEL_FD_ENV, "3");
    let (env, _) = stdout_of("/usr/bin/env", &[], inherited).await;
    assert!(env.contains("ipc_crate_does_not_matter=1\n"));
    assert!(
        !env.contains(ipc::CHANNEL_FD_ENV),
        "the channel variable is never passed without a channel"
    );
    let (cwd, _) = stdout_of("pwd", &[], quiet_options().cwd("/tmp")).await;
    assert_eq!(cwd, "/tmp\n");
    let (argv0, _) = stdout_of(
        "/bin/sh",
        &["-c", "echo $0"],
        quiet_options().argv0("custom-name"),
    )
    .await;
    assert_eq!(argv0, "custom-name\n");
    let (piped, status) =
        stdout_of("echo abc | tr a x", &[], quiet_options().shell("/bin/sh")).await;
    assert_eq!((piped.as_str(), status.code()), ("xbc\n", Some(0)));
}

#[tokio::test]
async fn uid_and_gid_use_the_fork_path() {
    if !nix::unistd::geteuid().is_root() {
        return; // Only root may change ids; nothing to check otherwise.
    }
    let options = quiet_options().uid(65534).gid(65534).stdio(3, Stdio::Null);
    let (ids, status) = stdout_of(
        "/bin/sh",
        &["-c", "id -u; id -g; test -e /proc/self/fd/3 && echo fd3"],
        options,
    )
    .await;
    assert_eq!(
        (ids.as_str(), status.code()),
        ("65534\n65534\nfd3\n", Some(0))
    );
}

#[tokio::test]
async fn dropping_a_handle_leaves_no_zombie() {
    // cat exits when its stdin closes, which dropping the handle does.
    let cat = child::spawn(
        "cat",
        [] as [&str; 0],
        options().kill_on_drop(false).stdout(Stdio::Null),
    )
    .unwrap();
    let pid = cat.pid();
    drop(cat);
    assert_reaped(pid);
    // kill_on_drop ends a child that would run on.
    let sleeper = child::spawn("sleep", ["30"], quiet_options()).unwrap();
    let pid = sleeper.pid();
    drop(sleeper);
    assert_reaped(pid);
}

#[tokio::test]
async fn a_detached_grandchild_outlives_its_parent() {
    let parent = child::spawn(helper("child_detach"), [] as [&str; 0], options()).unwrap();
    let output = parent.wait_with_output().await.unwrap();
    assert!(output.status.success());
    let pid: i32 = output.stdout_lossy().trim().parse().expect("a pid");
    let _guard = kill_on_drop(pid);
    let state = process_state(pid as u32).expect("the grandchild is still running");
    assert_ne!(state, 'Z');
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(sid.as_raw(), pid, "detached means its own session");
}

#[tokio::test]
async fn killing_a_group_kills_the_whole_group() {
    // The shell and its background sleep both hold stdout: it ends when both are dead.
    let script = "sleep 30 & echo $!; wait";
    let mut group =
        child::spawn("/bin/sh", ["-c", script], quiet_options().detached(true)).unwrap();
    let mut stdout = group.stdout.take().unwrap();
    let mut line = Vec::new();
    while !line.ends_with(b"\n") {
        let mut byte = [0_u8; 1];
        assert_eq!(
            stdout.read(&mut byte).await.unwrap(),
            1,
            "the shell prints its child's pid"
        );
        line.push(byte[0]);
    }
    let sleep_pid: i32 = String::from_utf8(line).unwrap().trim().parse().unwrap();
    let _guard = kill_on_drop(sleep_pid);
    assert!(group.kill_group(Signal::SIGKILL).unwrap());
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).await.unwrap();
    assert_eq!(group.wait().await.unwrap().signal(), Some(Signal::SIGKILL));
    // Its stdout closes while it exits, a moment before it is a zombie (or reaped).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while process_state(sleep_pid as u32).is_some_and(|s| s != 'Z')
        && std::time::Instant::now() < deadline
    {
        tokio::task::yield_now().await;
    }
    assert!(
        process_state(sleep_pid as u32).is_none_or(|s| s == 'Z'),
        "the background sleep died too"
    );
}

#[tokio::test]
async fn wait_closed_drains_the_pipes_and_returns_the_status() {
    // More output than a pipe holds: the child can only exit once we drain it.
    let script = "head -c 1000000 /dev/zero; echo err >&2; exit 5";
    let mut child = child::spawn("/bin/sh", ["-c", script], options()).unwrap();
    assert_eq!(child.wait_closed().await.unwrap(), ExitStatus::Exited(5));
    assert!(child.stdout.is_none() && child.stderr.is_none() && child.stdin.is_none());
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(marker))
        })
        .collect()
}

#[test]
fn spawning_on_a_runtime_without_io_is_no_runtime_and_starts_nothing() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // A unique sleep length marks the processes this test could start.
    let marker = format!("3600.{}", std::process::id());
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let spawned = child::spawn("sleep", [&marker], quiet_options()).map(|c| c.pid());
            let exec = child::exec(&format!("sleep {marker}"), child::ExecOptions::new()).await;
            (spawned, exec.map(|o| o.status))
        })
    }));
    let leftovers = processes_with(&marker);
    for pid in &leftovers {
        drop(kill_on_drop(*pid as i32));
    }
    let (spawned, exec) = spawned.expect("spawn must not panic");
    assert!(matches!(spawned, Err(Error::NoRuntime)), "{spawned:?}");
    let err = exec.unwrap_err();
    let source = std::error::Error::source(&err).and_then(|s| s.downcast_ref::<Error>());
    assert!(matches!(source, Some(Error::NoRuntime)), "{err:?}");
    assert_eq!(leftovers, Vec::<u32>::new(), "no process was started");
}

#[tokio::test]
async fn kill_group_of_a_child_that_leads_no_group_is_an_error_not_an_exit() {
    let sleeper = child::spawn("sleep", ["30"], quiet_options()).unwrap();
    let err = sleeper
        .kill_group(Signal::SIGTERM)
        .expect_err("the child leads no process group");
    assert!(
        err.to_string().contains("does not lead a process group"),
        "{err}"
    );
    assert_eq!(sleeper.try_wait().unwrap(), None, "it still runs");
    assert!(!sleeper.killed());
}

#[tokio::test]
async fn an_executable_script_without_a_shebang_runs_with_bin_sh() {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::temp_dir().join(format!("child-no-shebang-{}", std::process::id()));
    std::fs::write(&path, "echo \"script ran with $1\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path_text = path.to_str().unwrap().to_owned();
    let result = child::spawn(&path_text, ["arg"], quiet_options());
    let (out, status) = match result {
        Ok(child) => {
            let output = child.wait_with_output().await.unwrap();
            (output.stdout_lossy().into_owned(), output.status)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            panic!("spawn failed: {e}");
        }
    };
    let sync = child::exec_file_sync(&path_text, ["sync"], child::ExecOptions::new());
    let _ = std::fs::remove_file(&path);
    assert_eq!(
        (out.as_str(), status.code()),
        ("script ran with arg\n", Some(0))
    );
    assert_eq!(sync.unwrap().stdout, b"script ran with sync\n");
}

/// `process_group(true)`: the child leads a group of its own in our session (both spawn
/// paths: posix_spawn, and the fork path a uid takes), and
/// `kill_group` reaches it.
#[tokio::test]
async fn a_child_in_a_group_of_its_own_stays_in_our_session() {
    let ours = nix::unistd::getsid(None).expect("our session");
    for options in [
        quiet_options().process_group(true),
        quiet_options()
            .process_group(true)
            .uid(nix::unistd::getuid().as_raw()),
    ] {
        let child = child::spawn("/bin/sleep", ["30"], options).unwrap();
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.pid()).expect("a pid"));
        assert_eq!(nix::unistd::getpgid(Some(pid)).expect("its group"), pid);
        assert_eq!(nix::unistd::getsid(Some(pid)).expect("its session"), ours);
        assert!(
            child
                .kill_group(Signal::SIGTERM)
                .expect("a group to signal")
        );
        let status = child.wait().await.unwrap();
        assert_eq!(
            status,
            ExitStatus::Signaled {
                signal: Signal::SIGTERM as i32,
                core_dumped: false
            }
        );
    }
}
