//! `child` side by side with `std::process` and Node 20 in one run, rounds interleaved
//! (A B C A B C ...) so that a noisy machine affects every subject alike.
//!
//! Run with `cargo bench -p child --bench vs_node` (`-- --quick` for fewer rounds). Node
//! is optional: without it its rows are skipped with a note. `-- --json` prints one
//! [`testkit::BenchLine`] per row instead of the table (every round's value), for
//! `cargo xtask bench`.

#![allow(clippy::print_stdout)]

use std::path::Path;
use std::process::{Command, Stdio as StdStdio};
use std::time::{Duration, Instant};

use child::{ExecOptions, SpawnOptions, Stdio};
use testkit::{
    BenchArgs, BenchLine, Benchmark, NODE_INSTALL_HINT, Subject, Unit, median, node_available,
    node_timing,
};

const SPAWNS: u32 = 300;
const CAPTURE_BYTES: usize = 100_000_000;

fn main() {
    let args = BenchArgs::from_env();
    let node = node_available();
    if !node {
        println!("node: not installed, Node rows skipped ({NODE_INSTALL_HINT})");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut spawn_rows: Vec<(Subject, Vec<f64>)> = vec![
        (Subject::StdCommand, vec![]),
        (Subject::ChildSpawn, vec![]),
        (Subject::ChildSpawnIpc, vec![]),
        (Subject::ChildSpawnSync, vec![]),
    ];
    let mut exec_rows: Vec<(Subject, Vec<f64>)> = vec![
        (Subject::StdOutput, vec![]),
        (Subject::ChildExecFile, vec![]),
        (Subject::ChildExec, vec![]),
        (Subject::ChildExecFileSync, vec![]),
    ];
    if node {
        spawn_rows.push((Subject::NodeSpawn, vec![]));
        exec_rows.push((Subject::NodeExec, vec![]));
    }
    let capture = || ExecOptions::new().max_buffer(2 * CAPTURE_BYTES);
    let head_args = [
        "-c".to_string(),
        CAPTURE_BYTES.to_string(),
        "/dev/zero".into(),
    ];
    for _ in 0..args.rounds() {
        let per_sec = |d: Duration| f64::from(SPAWNS) / d.as_secs_f64();
        spawn_rows[0].1.push(per_sec(timed(|| {
            for _ in 0..SPAWNS {
                let status = Command::new("/bin/true")
                    .stdin(StdStdio::null())
                    .stdout(StdStdio::null())
                    .stderr(StdStdio::null())
                    .status()
                    .expect("std spawn");
                assert!(status.success());
            }
        })));
        let variants: [(usize, fn() -> SpawnOptions); 2] = [(1, quiet), (2, with_ipc)];
        for (row, make) in variants {
            spawn_rows[row].1.push(per_sec(timed(|| {
                rt.block_on(async {
                    for _ in 0..SPAWNS {
                        let c = child::spawn("/bin/true", [] as [&str; 0], make()).expect("spawn");
                        assert!(c.wait().await.expect("wait").success());
                    }
                })
            })));
        }
        spawn_rows[3].1.push(per_sec(timed(|| {
            for _ in 0..SPAWNS {
                let out = child::spawn_sync("/bin/true", [] as [&str; 0], ExecOptions::new())
                    .expect("spawn_sync");
                assert!(out.status.success());
            }
        })));
        if node {
            spawn_rows[4]
                .1
                .push(per_sec(node_seconds("node_spawn.js", &SPAWNS.to_string())));
        }

        let mb_per_sec = |d: Duration| CAPTURE_BYTES as f64 / 1e6 / d.as_secs_f64();
        exec_rows[0].1.push(mb_per_sec(timed(|| {
            let out = Command::new("head")
                .args(&head_args)
                .output()
                .expect("std output");
            assert_eq!(out.stdout.len(), CAPTURE_BYTES);
        })));
        exec_rows[1].1.push(mb_per_sec(timed(|| {
            let out = rt
                .block_on(child::exec_file("head", &head_args, capture()))
                .expect("exec_file");
            assert_eq!(out.stdout.len(), CAPTURE_BYTES);
        })));
        exec_rows[2].1.push(mb_per_sec(timed(|| {
            let command = format!("head -c {CAPTURE_BYTES} /dev/zero");
            let out = rt.block_on(child::exec(&command, capture())).expect("exec");
            assert_eq!(out.stdout.len(), CAPTURE_BYTES);
        })));
        exec_rows[3].1.push(mb_per_sec(timed(|| {
            let out = child::exec_file_sync("head", &head_args, capture()).expect("exec_file_sync");
            assert_eq!(out.stdout.len(), CAPTURE_BYTES);
        })));
        if node {
            exec_rows[4].1.push(mb_per_sec(node_seconds(
                "node_exec.js",
                &CAPTURE_BYTES.to_string(),
            )));
        }
    }
    if args.json {
        json_lines(Benchmark::SpawnTrue, Unit::SpawnsPerSec, spawn_rows);
        json_lines(Benchmark::Exec100mb, Unit::MegabytesPerSec, exec_rows);
        return;
    }
    report(
        "spawn_true: sequential spawn + wait of /bin/true",
        Unit::SpawnsPerSec,
        &spawn_rows,
    );
    report(
        "exec_100mb: capture 100 MB of stdout",
        Unit::MegabytesPerSec,
        &exec_rows,
    );
}

fn quiet() -> SpawnOptions {
    SpawnOptions::new()
        .stdin(Stdio::Null)
        .stdout(Stdio::Null)
        .stderr(Stdio::Null)
}

fn with_ipc() -> SpawnOptions {
    quiet().stdio(3, Stdio::Ipc)
}

fn timed(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

/// One [`BenchLine`] per row, one value per round.
fn json_lines(benchmark: Benchmark, unit: Unit, rows: Vec<(Subject, Vec<f64>)>) {
    for (subject, values) in rows {
        let line = BenchLine {
            benchmark,
            subject,
            unit,
            message_bytes: None,
            values,
        };
        println!("{}", line.to_json());
    }
}

/// Prints each row's median and its ratio to the first row (std) and to the last (Node,
/// when present).
fn report(title: &str, unit: Unit, rows: &[(Subject, Vec<f64>)]) {
    println!("\n{title} ({} rounds, medians)", rows[0].1.len());
    let std = median(&rows[0].1);
    let node = rows
        .last()
        .filter(|(subject, _)| subject.needs_node())
        .map(|(_, v)| median(v));
    let unit = unit.label();
    for (subject, values) in rows {
        let name = subject.label();
        let m = median(values);
        let vs_node = node
            .map(|n| format!("   {:.2}x node", m / n))
            .unwrap_or_default();
        println!(
            "  {name:<26} {m:>9.1} {unit}   {:.2}x std{vs_node}",
            m / std
        );
    }
}

fn node_seconds(script: &str, arg: &str) -> Duration {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/peers")
        .join(script);
    node_timing(&path, [arg]).unwrap_or_else(|e| panic!("{e}"))
}
