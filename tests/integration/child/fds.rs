//! Fd hygiene: a child sees only 0, 1, 2 and the slots it was given.

use std::os::fd::AsFd;

use child::Stdio;

use super::{helper, options};

async fn fds_seen(options: child::SpawnOptions) -> String {
    let child = child::spawn(helper("child_fds"), [] as [&str; 0], options).expect("spawn");
    let output = child.wait_with_output().await.expect("wait");
    assert!(output.status.success(), "{}", output.stderr_lossy());
    output.stdout_lossy().trim().to_owned()
}

#[tokio::test]
async fn a_child_sees_only_its_stdio_and_given_fds_while_the_parent_holds_many() {
    // Things a parent typically holds: a listener, pipes, another child's IPC channel, and
    // even an fd that is NOT close-on-exec.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (read, write) = std::io::pipe().unwrap();
    let leaky = listener.as_fd().try_clone_to_owned().unwrap();
    nix::fcntl::fcntl(
        &leaky,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let quiet = child::ForkOptions::new()
        .silent()
        .map_spawn_options(|o| o.kill_on_drop(true));
    let other = child::fork(helper("child_forked"), [] as [&str; 0], quiet).unwrap();

    assert_eq!(fds_seen(options().stdin(Stdio::Null)).await, "0 1 2");
    assert_eq!(
        fds_seen(options().stdio(3, Stdio::Pipe).stdio(5, Stdio::Null)).await,
        "0 1 2 3 5"
    );
    let given = read.as_fd().try_clone_to_owned().unwrap();
    assert_eq!(
        fds_seen(options().stdio(4, Stdio::Fd(given))).await,
        "0 1 2 4"
    );
    assert_eq!(fds_seen(options().stdio(3, Stdio::Ipc)).await, "0 1 2 3");
    drop((listener, read, write, leaky, other));
}

#[tokio::test]
async fn extra_stdio_slots_carry_data_both_ways() {
    use std::io::{Read, Write};
    let script = "read line <&3; echo \"got $line\" >&3";
    let mut child =
        child::spawn("/bin/sh", ["-c", script], options().stdio(3, Stdio::Pipe)).unwrap();
    let mut socket = std::os::unix::net::UnixStream::from(child.take_stdio(3).expect("slot 3"));
    assert!(child.take_stdio(3).is_none());
    socket.write_all(b"hello\n").unwrap();
    let mut reply = String::new();
    socket.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "got hello\n");
    assert!(child.wait().await.unwrap().success());
}
