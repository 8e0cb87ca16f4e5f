//! Benchmarks against `std::process`: spawn+wait of `/bin/true` (plain, with an extra fd,
//! with an IPC channel), capture of 100 MB of stdout, and fork to first message.
//!
//! Run with `cargo bench -p child --bench spawn`. The fork benchmark re-executes this
//! binary as the forked child: started with a channel, it answers and exits.

use std::process::Command;
use std::time::{Duration, Instant};

use child::{ExecOptions, ForkOptions, SpawnOptions, Stdio};
use criterion::{Criterion, Throughput};

const CAPTURE_BYTES: u64 = 100_000_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn inherit() -> SpawnOptions {
    SpawnOptions::new()
        .stdin(Stdio::Inherit)
        .stdout(Stdio::Inherit)
        .stderr(Stdio::Inherit)
}

fn spawn_wait(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("spawn_wait_true");
    group.throughput(Throughput::Elements(1));
    group.bench_function("std", |b| {
        b.iter(|| assert!(Command::new("/bin/true").status().unwrap().success()))
    });
    let run = |options: fn() -> SpawnOptions| {
        rt.block_on(async {
            let child = child::spawn("/bin/true", [] as [&str; 0], options()).unwrap();
            assert!(child.wait().await.unwrap().success());
        });
    };
    group.bench_function("child", |b| b.iter(|| run(inherit)));
    group.bench_function("child_extra_fd", |b| {
        b.iter(|| run(|| inherit().stdio(3, Stdio::Null)))
    });
    group.bench_function("child_ipc", |b| {
        b.iter(|| run(|| inherit().stdio(3, Stdio::Ipc)))
    });
    group.bench_function("child_spawn_sync", |b| {
        b.iter(|| {
            assert!(
                child::spawn_sync("/bin/true", [] as [&str; 0], ExecOptions::new())
                    .unwrap()
                    .status
                    .success()
            )
        });
    });
    group.finish();
}

fn capture(c: &mut Criterion) {
    let rt = runtime();
    let count = format!("{CAPTURE_BYTES}");
    let args = ["-c", count.as_str(), "/dev/zero"];
    let mut group = c.benchmark_group("capture_100mb");
    group.throughput(Throughput::Bytes(CAPTURE_BYTES));
    group.sample_size(10);
    group.bench_function("std_output", |b| {
        b.iter(|| {
            assert_eq!(
                Command::new("head")
                    .args(args)
                    .output()
                    .unwrap()
                    .stdout
                    .len() as u64,
                CAPTURE_BYTES
            )
        });
    });
    let options = || ExecOptions::new().max_buffer(2 * CAPTURE_BYTES as usize);
    group.bench_function("child_exec_file", |b| {
        b.iter(|| {
            let output = rt
                .block_on(child::exec_file("head", args, options()))
                .unwrap();
            assert_eq!(output.stdout.len() as u64, CAPTURE_BYTES);
        });
    });
    group.bench_function("child_exec", |b| {
        let command = format!("head -c {CAPTURE_BYTES} /dev/zero");
        b.iter(|| {
            assert_eq!(
                rt.block_on(child::exec(&command, options()))
                    .unwrap()
                    .stdout
                    .len() as u64,
                CAPTURE_BYTES
            )
        });
    });
    group.bench_function("child_exec_file_sync", |b| {
        b.iter(|| {
            assert_eq!(
                child::exec_file_sync("head", args, options())
                    .unwrap()
                    .stdout
                    .len() as u64,
                CAPTURE_BYTES
            )
        });
    });
    group.finish();
}

fn fork_first_message(c: &mut Criterion) {
    let rt = runtime();
    let me = std::env::current_exe().expect("own path");
    let mut group = c.benchmark_group("fork_first_message");
    group.bench_function("child_fork", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut forked = child::fork(&me, [] as [&str; 0], ForkOptions::new()).unwrap();
                    let first = forked.recv().await.unwrap().expect("first message");
                    total += start.elapsed();
                    assert_eq!(first.decode::<String>().unwrap(), "ready");
                    forked.disconnect().unwrap();
                    assert!(forked.wait().await.unwrap().success());
                }
                total
            })
        });
    });
    group.finish();
}

/// The forked side: answer once, then exit when the parent disconnects.
fn forked_child() {
    runtime().block_on(async {
        let mut channel = child::parent_channel()
            .expect("channel")
            .expect("forked with a channel");
        channel.send("ready").await.expect("send");
        while channel.recv().await.expect("recv").is_some() {}
    });
}

fn main() {
    if std::env::var_os(ipc::CHANNEL_FD_ENV).is_some() {
        forked_child();
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    spawn_wait(&mut c);
    capture(&mut c);
    fork_first_message(&mut c);
    c.final_summary();
}
