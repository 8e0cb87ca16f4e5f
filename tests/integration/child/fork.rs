//! `fork`: message round trips, disconnect, and the parent-death signal.

use tokio::io::AsyncReadExt;

use child::{ForkOptions, Stdio};

use super::{helper, kill_on_drop};

async fn recv_string(child: &mut child::Child) -> Option<String> {
    Some(
        child
            .recv()
            .await
            .expect("recv")?
            .decode::<String>()
            .expect("a string"),
    )
}

#[tokio::test]
async fn messages_round_trip_and_disconnect_ends_the_child() {
    let options = ForkOptions::new().map_spawn_options(|o| o.kill_on_drop(true));
    let mut forked = child::fork(helper("child_forked"), [] as [&str; 0], options).unwrap();
    assert!(forked.connected());
    let ready = recv_string(&mut forked).await.unwrap();
    assert_eq!(ready, format!("ready {}", forked.pid()));
    for text in ["ping", "", "a longer message with ünïcödé"] {
        forked.send(text).await.unwrap();
        assert_eq!(recv_string(&mut forked).await.as_deref(), Some(text));
    }
    forked.disconnect().unwrap();
    assert!(!forked.connected());
    assert!(
        forked.wait().await.unwrap().success(),
        "the child exits 0 at end of channel"
    );
    assert!(matches!(
        forked.send("late").await,
        Err(child::Error::NoChannel)
    ));
}

#[tokio::test]
async fn a_child_without_a_channel_gets_none() {
    let child = child::spawn(
        helper("child_forked"),
        [] as [&str; 0],
        super::quiet_options(),
    )
    .unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the helper bails when parent_channel() is None"
    );
}

/// Runs `child_detach ARGS`, which forks a grandchild with a parent-death signal, prints
/// its pid and exits at once; the grandchild inherits stdout, so stdout ends only once
/// both are gone. Asserts that it did end: the grandchild died with its parent.
async fn assert_the_grandchild_dies_with_its_parent<const N: usize>(args: [&str; N]) {
    let options = super::options().stdin(Stdio::Null).stderr(Stdio::Inherit);
    let mut parent = child::spawn(helper("child_detach"), args, options).unwrap();
    let mut stdout = parent.stdout.take().unwrap();
    let mut text = String::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        stdout.read_to_string(&mut text),
    )
    .await;
    let pid: i32 = text.trim().parse().expect("a pid");
    let _guard = kill_on_drop(pid);
    read.expect("the grandchild died with its parent").unwrap();
    assert!(parent.wait().await.unwrap().success());
    super::assert_dead(pid as u32);
}

#[tokio::test]
async fn a_forked_child_dies_with_its_parent_when_asked() {
    // `child_forked linger` survives the end of its channel.
    assert_the_grandchild_dies_with_its_parent(["fork-linger", helper("child_forked")]).await;
}

#[tokio::test]
async fn a_forked_program_that_never_opens_its_channel_dies_with_its_parent_too() {
    // `/bin/sleep 300`: the signal is set before the program runs, not by the program's
    // channel call.
    assert_the_grandchild_dies_with_its_parent(["fork-sleep"]).await;
}

#[tokio::test]
async fn a_missing_program_with_a_parent_death_signal_is_a_spawn_error() {
    // The fork + exec path must report a failed exec like posix_spawn does.
    let options = ForkOptions::new().parent_death_signal(child::Signal::SIGKILL);
    let error =
        child::fork("/nonexistent/program", [] as [&str; 0], options).expect_err("no such program");
    assert!(
        matches!(&error, child::Error::Spawn(e) if e.raw_os_error() == Some(libc::ENOENT)),
        "{error:?}"
    );
}

#[tokio::test]
async fn connected_turns_false_when_the_child_disconnects() {
    let options = ForkOptions::new().map_spawn_options(|o| o.kill_on_drop(true));
    let mut forked = child::fork(helper("child_forked"), ["disconnect"], options).unwrap();
    assert!(recv_string(&mut forked).await.unwrap().starts_with("ready"));
    assert!(forked.connected());
    assert_eq!(
        recv_string(&mut forked).await,
        None,
        "the child closed its end"
    );
    assert!(
        !forked.connected(),
        "Node's 'disconnect' sets connected to false"
    );
    assert!(
        forked.recv().await.unwrap().is_none(),
        "and stays disconnected"
    );
    assert!(forked.send("late").await.is_err());
    assert!(forked.wait().await.unwrap().success());
}

#[tokio::test]
async fn the_child_handle_sends_descriptors() {
    let options = ForkOptions::new().map_spawn_options(|o| o.kill_on_drop(true));
    let mut forked = child::fork(helper("child_forked"), child::NO_ARGS, options).unwrap();
    assert!(recv_string(&mut forked).await.unwrap().starts_with("ready"));
    let (read_end, write_end) = std::io::pipe().unwrap();
    forked
        .send_with_fds("through the pipe", vec![write_end.into()])
        .await
        .unwrap();
    assert_eq!(
        recv_string(&mut forked).await.as_deref(),
        Some("through the pipe")
    );
    let mut text = String::new();
    tokio::task::spawn_blocking(move || {
        std::io::Read::read_to_string(&mut { read_end }, &mut text).map(|_| text)
    })
    .await
    .unwrap()
    .map(|text| assert_eq!(text, "through the pipe"))
    .unwrap();
    forked.disconnect().unwrap();
    assert!(forked.wait().await.unwrap().success());
}
