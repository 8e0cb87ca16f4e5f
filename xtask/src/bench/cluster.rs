//! Cluster start-up workloads, measured from outside: the time from starting httpd-demo,
//! the `cluster` command with Node workers (rr and reuseport), or a Node 20 cluster (the last two run
//! `xtask/peers/node_cluster_http.js`) to its `listening on` line with every worker
//! listening, and from SIGKILL of one worker to the line saying its replacement listens.
//! Every round starts a fresh server, so the restart backoff is always at its first
//! (shortest) step.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::http::wait_listening;
use super::process::{Lines, Proc, children_of, kill_pid, piped};
use super::{Better, Ctx, Peer, Series, Workload};

const WORKERS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(30);

/// One round on one side: start-up and respawn in ms, and the restart delay the primary
/// logged (httpd-demo only).
#[derive(Debug, Clone, Copy)]
struct Round {
    start_ms: f64,
    respawn_ms: f64,
    backoff_ms: Option<f64>,
}

fn measure(name: &str, mut command: Command) -> Result<Round> {
    let started = Instant::now();
    let mut proc = Proc::spawn(name, &mut command)?;
    let mut lines = Lines::capture(&mut proc);
    let (_, listening_at) = wait_listening(&mut lines, WORKERS)?;
    let start_ms = ms(listening_at - started);
    let victim = *children_of(proc.pid())
        .first()
        .with_context(|| format!("{name} has no worker process"))?;
    let killed = Instant::now();
    kill_pid(victim)?;
    let mut backoff_ms = None;
    let respawned = loop {
        let (at, line) = lines.wait_for("worker", TIMEOUT)?;
        if line.contains("restarting a worker") {
            backoff_ms = parse_delay(&line);
        }
        // httpd-demo and the Node peer: `worker listening`; the command: `worker N is
        // listening on`.
        if line.contains("worker listening") || line.contains(" is listening on ") {
            break at;
        }
    };
    proc.stop(Duration::from_secs(3));
    Ok(Round {
        start_ms,
        respawn_ms: ms(respawned - killed),
        backoff_ms,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `delay=100ms` field of a tracing line, in ms.
fn parse_delay(line: &str) -> Option<f64> {
    let value = line.split("delay=").nth(1)?.split_whitespace().next()?;
    for (suffix, scale) in [("ms", 1.0), ("µs", 1e-3), ("ns", 1e-6), ("s", 1e3)] {
        if let Some(n) = value.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * scale);
        }
    }
    None
}

/// fork_to_listening and respawn_to_listening.
pub(super) fn run(ctx: &Ctx, demo: &Path, cluster_command: &Path) -> Result<Vec<Workload>> {
    let rounds = if ctx.quick { 5 } else { 11 };
    let demo_command = || {
        let mut command = piped(demo);
        command
            .args(["--workers", &WORKERS.to_string(), "--port", "0"])
            .args(["--policy", "rr", "--grace", "1"])
            .env("RUST_LOG", "info");
        command
    };
    let node_command = || {
        let mut command = piped("node");
        command
            .arg(ctx.peers_dir().join("node_cluster_http.js"))
            .args(["0", &WORKERS.to_string()])
            .env("NODE_CLUSTER_SCHED_POLICY", "rr");
        command
    };
    let with_node_workers = |policy: &str, spares: usize| {
        let mut command = piped(cluster_command);
        command
            .args(["--workers", &WORKERS.to_string(), "--policy", policy])
            .args(["--warm-spares", &spares.to_string(), "--no-control"])
            .args(["--grace", "1", "--"])
            .arg(ctx.peers_dir().join("node_cluster_http.js"))
            .arg("0");
        command
    };
    let (demo_name, node_name) = ("httpd-demo rr", "Node cluster rr");
    let command_name = "cluster command rr (Node workers)";
    let reuseport_name = "cluster command reuseport (Node workers)";
    let spares_name = "cluster command rr --warm-spares 1 (Node workers)";
    let mut demo_rounds = Vec::new();
    let mut node_rounds = Vec::new();
    let mut command_rounds = Vec::new();
    let mut reuseport_rounds = Vec::new();
    let mut spares_rounds = Vec::new();
    for round in 1..=rounds {
        demo_rounds.push(measure(demo_name, demo_command())?);
        if ctx.node.installed {
            command_rounds.push(measure(command_name, with_node_workers("rr", 0))?);
            reuseport_rounds.push(measure(reuseport_name, with_node_workers("reuseport", 0))?);
            spares_rounds.push(measure(spares_name, with_node_workers("rr", 1))?);
            node_rounds.push(measure(node_name, node_command())?);
        }
        let last = |r: &[Round]| {
            r.last().map_or("-".to_owned(), |r| {
                format!("{:.1}/{:.1} ms", r.start_ms, r.respawn_ms)
            })
        };
        println!(
            "  round {round}/{rounds}: start/respawn {demo_name} {}, {command_name} {}, \
             {reuseport_name} {}, {spares_name} {}, {node_name} {}",
            last(&demo_rounds),
            last(&command_rounds),
            last(&reuseport_rounds),
            last(&spares_rounds),
            last(&node_rounds)
        );
    }

    let series = |name: &str, rounds: &[Round], f: fn(&Round) -> f64| Series {
        name: name.to_owned(),
        values: rounds.iter().map(f).collect(),
    };
    let peer = |rounds: &[Round], f: fn(&Round) -> f64| {
        if ctx.node.installed {
            Peer::Measured(series(node_name, rounds, f))
        } else {
            Peer::Missing {
                name: node_name.to_owned(),
                reason: ctx.node.missing(),
            }
        }
    };
    // The command's rows exist only with Node (its workers are Node programs).
    let subjects = |f: fn(&Round) -> f64| {
        let mut all = vec![series(demo_name, &demo_rounds, f)];
        if ctx.node.installed {
            all.push(series(command_name, &command_rounds, f));
            all.push(series(reuseport_name, &reuseport_rounds, f));
            all.push(series(spares_name, &spares_rounds, f));
        }
        all
    };
    let start = Workload {
        key: "fork_to_listening",
        title: "cluster start: spawn of the primary to `listening on` (2 workers)".to_owned(),
        unit: "ms",
        better: Better::Lower,
        subjects: subjects(|r| r.start_ms),
        peers: vec![peer(&node_rounds, |r| r.start_ms)],
        notes: vec![format!(
            "a fresh server per round, {rounds} rounds interleaved; measured from outside"
        )],
    };
    let mut respawn = Workload {
        key: "respawn_to_listening",
        title: "respawn: SIGKILL of a worker to its replacement listening".to_owned(),
        unit: "ms",
        better: Better::Lower,
        subjects: subjects(|r| r.respawn_ms),
        peers: vec![peer(&node_rounds, |r| r.respawn_ms)],
        notes: vec!["the Node peer forks a replacement at once on `exit`".to_owned()],
    };
    let without_backoff: Vec<f64> = demo_rounds
        .iter()
        .filter_map(|r| Some(r.respawn_ms - r.backoff_ms?))
        .collect();
    if let Some(backoff) = demo_rounds
        .iter()
        .find_map(|r| r.backoff_ms)
        .filter(|ms| *ms > 0.0)
    {
        let rest = Series {
            name: String::new(),
            values: without_backoff,
        };
        respawn.notes.push(format!(
            "httpd-demo waited {backoff:.0} ms (its restart backoff) before replacing the \
             crashed worker; without that delay the respawn takes {:.1} ms (median)",
            rest.median()
        ));
    }
    Ok(vec![start, respawn])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tracing_delays() {
        let line = "2025 INFO cluster::primary::core: restarting a worker slot=0 delay=100ms";
        assert_eq!(parse_delay(line), Some(100.0));
        assert_eq!(parse_delay("delay=1.5s"), Some(1500.0));
        assert_eq!(parse_delay("no delay here"), None);
    }
}
