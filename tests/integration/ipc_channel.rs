//! The `ipc` channel across two processes.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};

use testkit::KillOnDrop;
use tests::ipc_proto::{FromChild, ToChild};

/// Starts the helper with `stdin` as its standard input and `IPC_CHANNEL_FD=0`.
fn helper(stdin: Stdio, channel_env: bool) -> KillOnDrop {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipc_fd_child"));
    cmd.stdin(stdin).stdout(Stdio::piped());
    if channel_env {
        cmd.env(ipc::CHANNEL_FD_ENV, "0");
    } else {
        cmd.env_remove(ipc::CHANNEL_FD_ENV);
    }
    KillOnDrop::spawn(&mut cmd).expect("spawn ipc_fd_child")
}

#[tokio::test]
async fn a_listener_sent_over_the_channel_accepts_in_the_child() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    // The socketpair end becomes the child's fd 0: dup2 places it there alone, so no
    // other child of this multi-threaded test process can inherit it.
    let mut child = helper(Stdio::from(OwnedFd::from(theirs)), true);
    let mut channel = ipc::Channel::from_fd(ours.into()).unwrap();

    // Our copy of the listener is closed once sent: only the child can accept now.
    channel
        .send_with_fds(&ToChild::Listener, vec![OwnedFd::from(listener)])
        .await
        .unwrap();
    let mut client = TcpStream::connect(addr).unwrap();
    let client_port = client.local_addr().unwrap().port();
    client
        .write_all(b"hello through a passed listener\n")
        .unwrap();

    let report = channel
        .recv()
        .await
        .unwrap()
        .expect("a report from the child");
    assert_eq!(
        report.decode::<FromChild>().unwrap(),
        FromChild::Accepted {
            peer_port: client_port,
            line: "hello through a passed listener".into(),
        }
    );
    assert!(
        channel.recv().await.unwrap().is_none(),
        "child closed its end"
    );
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_child_without_a_channel_gets_none() {
    let out = helper(Stdio::null(), false)
        .wait_with_output()
        .expect("wait");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "none\n");
}

#[test]
fn an_inherited_fd_that_is_not_a_socket_is_a_typed_error() {
    let out = helper(Stdio::null(), true)
        .wait_with_output()
        .expect("wait");
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("error: invalid inherited channel in IPC_CHANNEL_FD=\"0\"")
            && text.contains("not a socket"),
        "{text}"
    );
}

/// Runs `ipc_hello_child <name> <version>` on the other end of a channel, calls `hello`
/// with `ours` here, and returns our result with the child's exit code and output.
async fn hello_across_processes(
    ours: (&str, u32),
    theirs: (&str, u32),
) -> (Result<(), ipc::Error>, Option<i32>, String) {
    let (parent_end, child_end) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ipc_hello_child"));
    cmd.args([theirs.0, &theirs.1.to_string()])
        .env(ipc::CHANNEL_FD_ENV, "0")
        .stdin(Stdio::from(OwnedFd::from(child_end)))
        .stdout(Stdio::piped());
    let mut child = KillOnDrop::spawn(&mut cmd).expect("spawn ipc_hello_child");
    let mut channel = ipc::Channel::from_fd(parent_end.into()).unwrap();
    let result = channel.hello(ours.0, ours.1).await;
    drop(channel);
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (result, out.status.code(), text)
}

#[tokio::test]
async fn a_hello_between_processes_agrees_on_the_same_protocol() {
    let (result, code, text) = hello_across_processes(("jobs", 3), ("jobs", 3)).await;
    result.expect("the parent agrees");
    assert_eq!((code, text.as_str()), (Some(0), "agreed\n"));
}

#[tokio::test]
async fn a_hello_between_processes_catches_another_version_on_both_ends() {
    let (result, code, text) = hello_across_processes(("jobs", 3), ("jobs", 4)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, ipc::Error::ProtocolMismatch { theirs: Some(t), .. } if t.version == 4),
        "{err:?}"
    );
    assert_eq!(code, Some(4), "{text}");
    assert_eq!(
        text,
        "error: protocol mismatch: this end speaks \"jobs\" version 4, the peer \"jobs\" version 3\n"
    );
}
