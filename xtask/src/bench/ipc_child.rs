//! IPC echo and spawn/exec workloads: runs the crates' own side-by-side benches
//! (`ipc/benches/echo.rs`, `child/benches/vs_node.rs`, which interleave their rounds) with
//! `--json` and turns their lines into workloads.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::process::{Proc, piped};
use super::{Better, Ctx, Peer, Series, Workload};

/// One line of a bench's `--json` output.
#[derive(Debug, Clone, Deserialize)]
struct Line {
    benchmark: String,
    subject: String,
    unit: String,
    #[serde(default)]
    message_bytes: Option<f64>,
    values: Vec<f64>,
}

/// `cargo bench -p <package> --bench <bench> -- [--quick] --json`, parsed.
fn run_bench(ctx: &Ctx, package: &str, bench: &str) -> Result<Vec<Line>> {
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

fn parse(out: &str) -> Result<Vec<Line>> {
    let lines: Vec<Line> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    if lines.is_empty() {
        bail!("no JSON lines in:\n{out}");
    }
    Ok(lines)
}

/// How to read one benchmark of a bench's output.
struct Spec {
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    /// Scale applied to the bench's values (msg/s to MB/s for large messages).
    to_mb: bool,
    subject: &'static str,
    /// Peers: the bench's row name, and the tool it needs when it is Node.
    peers: &'static [(&'static str, bool)],
}

fn workload(ctx: &Ctx, lines: &[Line], spec: &Spec) -> Workload {
    let series = |name: &str| {
        lines
            .iter()
            .find(|l| l.benchmark == spec.key && l.subject == name)
            .map(|l| {
                let scale = match (spec.to_mb, l.message_bytes) {
                    (true, Some(bytes)) => bytes / 1e6,
                    _ => 1.0,
                };
                debug_assert!(spec.to_mb || l.unit == spec.unit);
                Series {
                    name: name.to_owned(),
                    values: l.values.iter().map(|v| v * scale).collect(),
                }
            })
    };
    let mut w = Workload {
        key: spec.key,
        title: spec.title.to_owned(),
        unit: spec.unit,
        better: Better::Higher,
        subjects: series(spec.subject).into_iter().collect(),
        peers: Vec::new(),
        notes: Vec::new(),
    };
    for &(name, needs_node) in spec.peers {
        w.peers.push(match series(name) {
            Some(s) => Peer::Measured(s),
            None if needs_node && !ctx.node.installed => Peer::Missing {
                name: name.to_owned(),
                reason: ctx.node.missing(),
            },
            None => Peer::Missing {
                name: name.to_owned(),
                reason: "no such row in the bench output".to_owned(),
            },
        });
    }
    w
}

/// ipc_echo_16b and ipc_echo_64k.
pub(super) fn run_ipc(ctx: &Ctx) -> Result<Vec<Workload>> {
    let lines = run_bench(ctx, "ipc", "echo")?;
    let peers: &[(&str, bool)] = &[("node fork() IPC", true), ("raw socketpair", false)];
    let mut out = vec![
        workload(
            ctx,
            &lines,
            &Spec {
                key: "ipc_echo_16b",
                title: "IPC echo, 16-byte messages, 64 in flight",
                unit: "msg/s",
                to_mb: false,
                subject: "ipc channel",
                peers,
            },
        ),
        workload(
            ctx,
            &lines,
            &Spec {
                key: "ipc_echo_64k",
                title: "IPC echo, 64 KiB messages, 64 in flight",
                unit: "MB/s",
                to_mb: true,
                subject: "ipc channel",
                peers,
            },
        ),
    ];
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
                key: "spawn_true",
                title: "sequential spawn + wait of /bin/true",
                unit: "spawn/s",
                to_mb: false,
                subject: "child::spawn",
                peers: &[("node spawn", true), ("std::process::Command", false)],
            },
        ),
        workload(
            ctx,
            &lines,
            &Spec {
                key: "exec_100mb",
                title: "exec capturing 100 MB of stdout",
                unit: "MB/s",
                to_mb: false,
                subject: "child::exec_file",
                peers: &[("node exec", true), ("std output()", false)],
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
    fn parses_json_lines_and_skips_notes() {
        let out = "node: not installed\n\
            {\"benchmark\":\"ipc_echo_64k\",\"subject\":\"ipc channel\",\"unit\":\"msg/s\",\
            \"message_bytes\":65536,\"values\":[1000.0,2000.0]}\n";
        let lines = parse(out).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].values, [1000.0, 2000.0]);
        assert!(parse("nothing").is_err());
    }
}
