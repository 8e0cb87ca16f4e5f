//! A spawn leaves no descriptor behind: the pidfd, the `/dev/null` shared by null slots and
//! the pipes are all closed once the child is waited for and its handle dropped.
//!
//! Its own test binary with a single test, so that no other test opens or closes
//! descriptors while this one counts them.

use child::{SpawnOptions, Stdio};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

#[test]
fn spawn_and_wait_leave_no_fd_open_and_report_each_status() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let quiet = || {
            SpawnOptions::new()
                .stdin(Stdio::Null)
                .stdout(Stdio::Null)
                .stderr(Stdio::Null)
        };
        // The first spawn on a runtime checks its IO driver once; count after it.
        let first = child::spawn("/bin/true", [] as [&str; 0], quiet()).expect("spawn");
        assert!(first.wait().await.expect("wait").success());
        drop(first);
        let before = open_fds();
        for code in 0..20 {
            let options = if code % 2 == 0 {
                quiet().stdio(3, Stdio::Null)
            } else {
                SpawnOptions::new()
            };
            let script = format!("exit {code}");
            let exited = child::spawn("/bin/sh", ["-c", script.as_str()], options).expect("spawn");
            // A child that exits at once is reaped with its own status.
            assert_eq!(exited.wait().await.expect("wait").code(), Some(code));
            assert_eq!(
                exited.try_wait().expect("try_wait").map(|s| s.code()),
                Some(Some(code))
            );
        }
        assert_eq!(open_fds(), before, "fds left open by spawn + wait");
    });
}
