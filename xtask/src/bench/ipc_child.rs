//! IPC echo and spawn/exec workloads: runs the crates' own side-by-side benches
//! (`ipc/benches/echo.rs`, `child/benches/vs_node.rs`, which interleave their rounds) with
//! `--json` and turns their lines into workloads.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use testkit::{BenchLine, Benchmark, Subject, Unit};

use super::process::{Proc, piped};
use super::{Better, Ctx, Peer, Series, Workload};

/// `cargo bench -p <package> --bench <bench> -- [--quick] --json`, parsed.
fn run_bench(ctx: &Ctx, package: &str, bench: &str) -> Result<Vec<BenchLine>> {
    let mut command = piped(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(&ctx.root)
        .args(["bench", "--quiet", "-p", package, "--bench", bench, "--"]);
    if ctx.quick {
        command.arg("--quick");
    }
    command.arg("--json");
    let proc = Proc::spawn(&format!("cargo bench -p {package}"), &mut command)?;
    let (ok, out, err) = proc.output(Duration::from_secs(30 * 60))?;
    if !ok {
        bail!("cargo bench -p {package} --bench {bench} failed:\n{out}\n{err}");
    }
    parse(&out).with_context(|| format!("reading the output of the {bench} bench"))
}

fn parse(out: &str) -> Result<Vec<BenchLine>> {
    let lines = BenchLine::parse_all(out)?;
    if lines.is_empty() {
        bail!("no JSON lines in:\n{out}");
    }
    Ok(lines)
}

/// How to read one benchmark of a bench's output.
struct Spec {
    benchmark: Benchmark,
    title: &'static str,
    /// The workload's unit: the bench's, or MB/s when `to_mb`.
    unit: Unit,
    /// Scale the bench's msg/s by its message size to MB/s (for large messages).
    to_mb: bool,
    subject: Subject,
    peers: &'static [Subject],
}

fn workload(ctx: &Ctx, lines: &[BenchLine], spec: &Spec) -> Workload {
    let series = |subject: Subject| {
        lines
            .iter()
            .find(|l| l.benchmark == spec.benchmark && l.subject == subject)
            .map(|l| {
                let scale = match (spec.to_mb, l.message_bytes) {
                    (true, Some(bytes)) => bytes as f64 / 1e6,
                    _ => 1.0,
                };
                debug_assert!(spec.to_mb || l.unit == spec.unit);
                Series {
                    name: subject.label().to_owned(),
                    values: l.values.iter().map(|v| v * scale).collect(),
                }
            })
    };
    let mut w = Workload {
        key: spec.benchmark.key(),
        title: spec.title.to_owned(),
        unit: spec.unit.label(),
        better: Better::Higher,
        subjects: series(spec.subject).into_iter().collect(),
        peers: Vec::new(),
        notes: Vec::new(),
    };
    for &peer in spec.peers {
        let name = peer.label().to_owned();
        w.peers.push(match series(peer) {
            Some(s) => Peer::Measured(s),
            None if peer.needs_node() && !ctx.node.installed => Peer::Missing {
                name,
                reason: ctx.node.missing(),
            },
            None => Peer::Missing {
                name,
                reason: "no such row in the bench output".to_owned(),
            },
        });
    }
    w
}

/// ipc_echo_16b and ipc_echo_64k.
pub(super) fn run_ipc(ctx: &Ctx) -> Result<Vec<Workload>> {
    let lines = run_bench(ctx, "ipc", "echo")?;
    let peers = &[Subject::NodeForkIpc, Subject::RawSocketpair];
    let mut out = vec![
        workload(
            ctx,
            &lines,
            &Spec {
                benchmark: Benchmark::IpcEcho16b,
                title: "IPC echo, 16-byte messages, 64 in flight",
                unit: Unit::MessagesPerSec,
                to_mb: false,
                subject: Subject::IpcChannel,
                peers,
            },
        ),
        workload(
            ctx,
            &lines,
            &Spec {
                benchmark: Benchmark::IpcEcho64k,
                title: "IPC echo, 64 KiB messages, 64 in flight",
                unit: Unit::MegabytesPerSec,
                to_mb: true,
                subject: Subject::IpcChannel,
                peers,
            },
        ),
    ];
    // Node's JSON lines: a Node child, and a Rust child, against Node <-> Node.
    for subject in [Subject::IpcJsonNodeChild, Subject::IpcJsonChannel] {
        for (benchmark, title, unit, to_mb) in [
            (
                Benchmark::IpcEcho16b,
                "IPC echo in Node's JSON, 16-byte messages, 64 in flight",
                Unit::MessagesPerSec,
                false,
            ),
            (
                Benchmark::IpcEcho64k,
                "IPC echo in Node's JSON, 64 KiB messages, 64 in flight",
                Unit::MegabytesPerSec,
                true,
            ),
        ] {
            let spec = Spec {
                benchmark,
                title,
                unit,
                to_mb,
                subject,
                peers: &[Subject::NodeForkIpc],
            };
            out.push(workload(ctx, &lines, &spec));
        }
    }
    for w in &mut out {
        w.notes
            .push("from `cargo bench -p ipc --bench echo -- --json`".to_owned());
    }
    Ok(out)
}

/// spawn_true and exec_100mb.
pub(super) fn run_child(ctx: &Ctx) -> Result<Vec<Workload>> {
    let lines = run_bench(ctx, "child", "vs_node")?;
    let mut out = vec![
        workload(
            ctx,
            &lines,
            &Spec {
                benchmark: Benchmark::SpawnTrue,
                title: "sequential spawn + wait of /bin/true",
                unit: Unit::SpawnsPerSec,
                to_mb: false,
                subject: Subject::ChildSpawn,
                peers: &[Subject::NodeSpawn, Subject::StdCommand],
            },
        ),
        workload(
            ctx,
            &lines,
            &Spec {
                benchmark: Benchmark::Exec100mb,
                title: "exec capturing 100 MB of stdout",
                unit: Unit::MegabytesPerSec,
                to_mb: false,
                subject: Subject::ChildExecFile,
                peers: &[Subject::NodeExec, Subject::StdOutput],
            },
        ),
    ];
    for w in &mut out {
        w.notes
            .push("from `cargo bench -p child --bench vs_node -- --json`".to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bench_lines_and_skips_notes() {
        let line = BenchLine {
            benchmark: Benchmark::IpcEcho64k,
            subject: Subject::IpcChannel,
            unit: Unit::MessagesPerSec,
            message_bytes: Some(65536),
            values: vec![1000.0, 2000.0],
        };
        let out = format!("node: not installed\n{}\n", line.to_json());
        let lines = parse(&out).unwrap();
        assert_eq!(lines, [line]);
        assert!(parse("nothing").is_err());
    }
}
