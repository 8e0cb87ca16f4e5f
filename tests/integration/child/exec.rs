//! `exec`, `exec_file` and the blocking variants: max buffer, timeout, errors, exit codes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use child::{ExecError, ExecErrorKind, ExecOptions, Output, Signal, SpawnErrorKind, StreamName};
use tokio_util::sync::CancellationToken;

use super::{assert_reaped, kill_on_drop, run_child_parent};

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn exactly_max_buffer_passes_and_one_more_byte_fails() {
    let output = child::exec(&format!("head -c {MIB} /dev/zero"), ExecOptions::new())
        .await
        .unwrap();
    assert_eq!(output.stdout.len(), MIB);
    let err = child::exec(
        &format!("head -c {} /dev/zero", MIB + 1),
        ExecOptions::new(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.kind(),
        ExecErrorKind::MaxBufferExceeded(StreamName::Stdout)
    );
    assert_eq!(
        err.stdout().len(),
        MIB,
        "the output is kept, truncated to the limit"
    );
    assert_eq!(err.to_string(), "stdout maxBuffer length exceeded");
}

#[tokio::test]
async fn max_buffer_five_keeps_hello() {
    let err = child::exec("echo hello world", ExecOptions::new().max_buffer(5))
        .await
        .unwrap_err();
    assert_eq!(err.stdout(), b"hello");
    assert_eq!(
        err.kind(),
        ExecErrorKind::MaxBufferExceeded(StreamName::Stdout)
    );
    let err = child::exec("echo hello world >&2", ExecOptions::new().max_buffer(5))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind(), err.stderr()),
        (
            ExecErrorKind::MaxBufferExceeded(StreamName::Stderr),
            &b"hello"[..]
        )
    );
}

#[tokio::test]
async fn max_buffer_kills_a_child_that_keeps_writing() {
    let err = child::exec_file("yes", [] as [&str; 0], ExecOptions::new().max_buffer(10))
        .await
        .unwrap_err();
    assert!(err.killed());
    assert_eq!(err.signal(), Some(Signal::SIGTERM));
    assert_eq!(err.stdout(), b"y\ny\ny\ny\ny\n");
}

#[tokio::test]
async fn timeout_kills_with_sigterm_and_sigkill_when_asked() {
    let err = child::exec(
        "sleep 30",
        ExecOptions::new().timeout(Duration::from_millis(50)),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), ExecErrorKind::TimedOut);
    assert!(err.killed());
    assert_eq!((err.code(), err.signal()), (None, Some(Signal::SIGTERM)));
    assert_eq!(
        err.to_string(),
        "Command failed: sleep 30 (timed out, killed with SIGTERM)"
    );
    let options = ExecOptions::new()
        .timeout(Duration::from_millis(50))
        .kill_signal(Signal::SIGKILL);
    let err = child::exec("sleep 30", options).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.signal()),
        (ExecErrorKind::TimedOut, Some(Signal::SIGKILL))
    );
}

#[tokio::test]
async fn a_failed_command_carries_node_error_fields() {
    let err = child::exec("echo out; echo problem >&2; exit 3", ExecOptions::new())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ExecErrorKind::Failed);
    assert_eq!(
        (err.code(), err.signal(), err.killed()),
        (Some(3), None, false)
    );
    assert_eq!(err.cmd(), "echo out; echo problem >&2; exit 3");
    assert_eq!(
        (err.stdout(), err.stderr()),
        (&b"out\n"[..], &b"problem\n"[..])
    );
    assert_eq!(
        err.to_string(),
        "Command failed: echo out; echo problem >&2; exit 3\nproblem\n"
    );
    let err = child::exec_file("ls", ["/no/such/dir"], ExecOptions::new())
        .await
        .unwrap_err();
    assert_eq!((err.cmd(), err.code()), ("ls /no/such/dir", Some(2)));
    assert!(
        err.to_string()
            .starts_with("Command failed: ls /no/such/dir\nls: ")
    );
}

#[tokio::test]
async fn a_missing_command_is_127_under_exec_and_not_found_under_exec_file() {
    let err = child::exec("no-such-command-xyz", ExecOptions::new())
        .await
        .unwrap_err();
    assert_eq!((err.kind(), err.code()), (ExecErrorKind::Failed, Some(127)));
    let err = child::exec_file("no-such-command-xyz", ["arg"], ExecOptions::new())
        .await
        .unwrap_err();
    assert_eq!((err.kind(), err.code()), (ExecErrorKind::Spawn, None));
    let source = std::error::Error::source(&err)
        .expect("a source")
        .downcast_ref::<child::Error>()
        .expect("child::Error");
    let child::Error::Spawn(spawn) = source else {
        panic!("expected a spawn error, got {source:?}")
    };
    assert_eq!(spawn.kind(), SpawnErrorKind::NotFound);
    let err =
        child::exec_file_sync("no-such-command-xyz", ["arg"], ExecOptions::new()).unwrap_err();
    assert_eq!(err.kind(), ExecErrorKind::Spawn);
    assert_eq!(
        child::exec_sync("no-such-command-xyz", ExecOptions::new())
            .unwrap_err()
            .code(),
        Some(127)
    );
}

#[tokio::test]
async fn cancellation_kills_an_exec() {
    let token = CancellationToken::new();
    let run = child::exec(
        "sleep 30",
        ExecOptions::new().cancel_on(token.clone().cancelled_owned()),
    );
    let (result, ()) = tokio::join!(run, async { token.cancel() });
    let err = result.unwrap_err();
    assert_eq!(
        (err.kind(), err.signal()),
        (ExecErrorKind::Cancelled, Some(Signal::SIGTERM))
    );
}

#[tokio::test]
async fn input_and_both_streams_are_captured() {
    let options = ExecOptions::new().input("some input");
    let output = child::exec("cat; echo err >&2", options).await.unwrap();
    assert_eq!(
        (output.stdout_lossy(), output.stderr_lossy()),
        ("some input".into(), "err\n".into())
    );
}

#[test]
fn sync_timeout_and_max_buffer_are_error_kinds() {
    let err = child::exec_sync(
        "sleep 30",
        ExecOptions::new().timeout(Duration::from_millis(50)),
    )
    .unwrap_err();
    assert_eq!(
        (err.kind(), err.signal(), err.killed()),
        (ExecErrorKind::TimedOut, Some(Signal::SIGTERM), true)
    );
    let err = child::spawn_sync(
        "head",
        ["-c", "2000", "/dev/zero"],
        ExecOptions::new().max_buffer(1000),
    )
    .unwrap_err();
    assert_eq!(
        err.kind(),
        ExecErrorKind::MaxBufferExceeded(StreamName::Stdout)
    );
    assert_eq!(err.stdout().len(), 1000);
    let output = child::exec_sync(&format!("head -c {MIB} /dev/zero"), ExecOptions::new()).unwrap();
    assert_eq!(output.stdout.len(), MIB);
    let err = child::exec_sync(
        &format!("head -c {} /dev/zero", MIB + 1),
        ExecOptions::new(),
    )
    .unwrap_err();
    assert_eq!(
        (err.kind(), err.stdout().len()),
        (ExecErrorKind::MaxBufferExceeded(StreamName::Stdout), MIB)
    );
}

/// A fresh path in the temporary directory for a test's pid file.
fn pid_file(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("child-{test}-{}.pid", std::process::id()))
}

/// Waits until the shell has written its pid to `path` (it renames a whole file into place).
async fn read_pid(path: &Path) -> u32 {
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().parse().expect("a pid");
        }
        tokio::task::yield_now().await;
    }
}

/// A shell script that publishes its pid in `path`, then becomes `sleep 30`.
fn publish_pid_then_sleep(path: &Path) -> String {
    let path = path.display();
    format!("echo $$ > {path}.tmp && mv {path}.tmp {path} && exec sleep 30")
}

/// Polls `run` until its child has published its pid, drops it, and checks that the child
/// is gone (killed and reaped) although its timeout is far away.
async fn check_dropping_ends_the_child(
    run: impl Future<Output = Result<Output, ExecError>>,
    path: &Path,
) {
    let mut run = Box::pin(run);
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            result = &mut run => panic!("the run ended early: {result:?}"),
            pid = read_pid(path) => pid,
        }
    });
    let pid = waited.await.expect("the child published its pid");
    let _ = std::fs::remove_file(path);
    let _guard = kill_on_drop(pid as i32);
    drop(run);
    assert_reaped(pid);
}

#[tokio::test]
async fn a_dropped_exec_future_ends_its_child() {
    let path = pid_file("dropped-exec");
    let options = ExecOptions::new().timeout(Duration::from_secs(60));
    check_dropping_ends_the_child(child::exec(&publish_pid_then_sleep(&path), options), &path)
        .await;
    let path = pid_file("dropped-exec-file");
    let token = CancellationToken::new();
    let options = ExecOptions::new().cancel_on(token.clone().cancelled_owned());
    let script = publish_pid_then_sleep(&path);
    check_dropping_ends_the_child(child::exec_file("/bin/sh", ["-c", &script], options), &path)
        .await;
    token.cancel();
}

#[test]
fn feeding_input_to_a_child_that_closed_stdin_never_raises_sigpipe() {
    // The helper restores SIGPIPE's default disposition, as a C host or a CLI does.
    assert_eq!(run_child_parent("sigpipe-async"), "ok\n");
    assert_eq!(run_child_parent("sigpipe-sync"), "ok\n");
}

#[tokio::test]
async fn a_zero_timeout_means_no_timeout_as_in_node() {
    for _ in 0..5 {
        let output = child::exec("echo hi", ExecOptions::new().timeout(Duration::ZERO))
            .await
            .unwrap();
        assert_eq!(output.stdout, b"hi\n");
    }
    let output = child::exec_sync("echo hi", ExecOptions::new().timeout(Duration::ZERO)).unwrap();
    assert_eq!(output.stdout, b"hi\n");
}

#[test]
fn signals_the_parent_ignores_are_reset_in_the_child() {
    // The helper ignores SIGINT, SIGQUIT and SIGUSR1, then prints cat's SigIgn mask.
    let out = run_child_parent("sigign");
    let (mask, rest) = out.split_once('\n').expect("two lines");
    assert_eq!(rest, "ok\n");
    let mask = u64::from_str_radix(mask, 16).expect("a hex mask");
    // Bit n - 1 is signal n. glibc's posix_spawn leaves its own internal signals 32 and 33
    // ignored (it cannot be asked otherwise); no standard signal may be.
    assert_eq!(mask & 0x7fff_ffff, 0, "ignored in the child: {mask:#x}");
}

#[tokio::test]
async fn a_child_that_exits_0_after_its_timeout_signal_succeeds_as_in_node() {
    // The trap is the script's first command; the timeout leaves it ample time to be set.
    let script = "trap 'kill $!; echo bye; exit 0' TERM; sleep 30 & wait";
    let options = || ExecOptions::new().timeout(Duration::from_millis(500));
    let output = child::exec(script, options()).await.unwrap();
    assert_eq!(
        (output.status.code(), output.stdout_lossy()),
        (Some(0), "bye\n".into())
    );
    let output = child::exec_sync(script, options()).unwrap();
    assert_eq!(
        (output.status.code(), output.stdout_lossy()),
        (Some(0), "bye\n".into())
    );
    // Exiting non-zero after the signal is still a timeout.
    let script = "trap 'kill $!; exit 3' TERM; sleep 30 & wait";
    let err = child::exec(script, options()).await.unwrap_err();
    assert_eq!(
        (err.kind(), err.code(), err.killed()),
        (ExecErrorKind::TimedOut, Some(3), true)
    );
}

#[test]
fn spawn_sync_can_inherit_stdio_as_node_spawn_sync_does() {
    assert_eq!(
        run_child_parent("inherit"),
        "through the inherited stdout\ncaptured 0 bytes\nok\n"
    );
}
