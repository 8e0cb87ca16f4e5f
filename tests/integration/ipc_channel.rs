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
