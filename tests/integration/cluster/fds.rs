//! The cluster out of descriptors, with real processes under a low `RLIMIT_NOFILE`: the
//! primary short of them under round-robin, workers short of them under round-robin and
//! under the shared policy. Each time the service must come back as soon as descriptors
//! are free, with the same workers (none lost, none restarted).

use std::net::SocketAddr;
use std::time::Duration;

use child::{SpawnOptions, Stdio};
use testkit::KillOnDrop;
use tokio::io::AsyncBufReadExt;

use super::process::{StdoutLines, line};
use super::request;

/// The descriptor limit the processes run with: a few more than they need idle.
const NOFILE: u32 = 48;

/// Who runs short of descriptors.
#[derive(Clone, Copy, PartialEq)]
enum Short {
    /// The primary (`ulimit -S -n NOFILE`; the workers raise theirs again).
    Primary,
    /// The workers (they lower their own limit to `NOFILE`).
    Workers,
}

/// The helper app as a primary with 2 workers, `short` of descriptors.
fn start(policy: &str, short: Short) -> (child::Child, StdoutLines) {
    let mut options = SpawnOptions::new()
        .kill_on_drop(true)
        .stdin(Stdio::Null)
        .stdout(Stdio::Pipe)
        .stderr(Stdio::Null)
        .env("CLUSTER_SCHED_POLICY", policy);
    let primary_limit = match short {
        Short::Primary => {
            options = options.env("CLUSTER_APP_RAISE_NOFILE", "1");
            format!("ulimit -S -n {NOFILE} && ")
        }
        Short::Workers => {
            options = options.env("CLUSTER_APP_NOFILE", NOFILE.to_string());
            String::new()
        }
    };
    let script = format!("{primary_limit}exec \"$0\" 2");
    let app = env!("CARGO_BIN_EXE_cluster_app");
    let mut primary = child::spawn("/bin/sh", ["-c", &script, app], options).expect("spawn");
    let stdout = primary.stdout.take().expect("piped stdout");
    (primary, tokio::io::BufReader::new(stdout).lines())
}

/// Opens `count` connections at once and keeps those that connected: more than the short
/// side has descriptors for.
async fn burst(address: SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..count {
        connecting.spawn(tokio::net::TcpStream::connect(address));
    }
    let mut open = Vec::new();
    while let Some(joined) = connecting.join_next().await {
        if let Ok(Ok(stream)) = joined {
            open.push(stream);
        }
    }
    open
}

/// After the burst is gone: every request is served, by the original workers, and under
/// round-robin both serve again within seconds (a worker out of rotation for good would
/// leave them all to the other).
async fn check_served_by_the_same_workers(address: SocketAddr, both: bool) {
    let mut served = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut requests = 0;
    while requests < 20 || (both && served.len() < 2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "served by {served:?} only"
        );
        let by = tokio::time::timeout(Duration::from_secs(10), request(address))
            .await
            .expect("a request hung after the shortage")
            .expect("a request failed after the shortage");
        assert!(by <= 2, "served by worker {by}: one was lost");
        served.insert(by);
        requests += 1;
    }
}

async fn check_recovers(policy: &str, short: Short) {
    let (primary, mut lines) = start(policy, short);
    let mut pids = KillOnDrop::default();
    let address: SocketAddr = line(&mut lines, "listening", &mut pids).await[1]
        .parse()
        .expect("address");
    line(&mut lines, "listening", &mut pids).await;
    let held = burst(address, 300).await;
    assert!(
        held.len() > usize::try_from(NOFILE).expect("small"),
        "the burst connected"
    );
    drop(held);
    check_served_by_the_same_workers(address, policy == "rr").await;
    for pid in pids.adopted() {
        assert!(testkit::is_running(*pid), "worker {pid} is gone");
    }
    primary.kill(child::Signal::SIGKILL).expect("kill");
    primary.wait().await.expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_out_of_descriptors_under_round_robin_serves_again_once_they_are_free() {
    check_recovers("rr", Short::Primary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_out_of_descriptors_under_round_robin_refuse_hand_offs_and_survive() {
    check_recovers("rr", Short::Workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_out_of_descriptors_under_shared_pause_accepting_and_survive() {
    check_recovers("shared", Short::Workers).await;
}
