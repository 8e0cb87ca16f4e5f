//! The reports: `report.md` (machine, goals, one table per workload), `report.json` (one
//! result per subject/peer pair) and `report.svg` (a bar chart of the ratios, plotters'
//! SVG backend).
//!
//! `ratio` is always `subject_value / peer_value`. For throughput (req/s, msg/s, MB/s,
//! spawn/s) higher is better; for `ms` and `MB` (RSS) lower is better, so there a ratio
//! below 1 means the subject wins. The chart plots the advantage instead (the ratio, or
//! its inverse when lower is better), so that a longer bar is always better.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;

use super::latency::{LatencyReport, LatencyRow};
use super::machine::Machine;
use super::{Better, Peer, Series, Workload};

/// A target from an issue: `subject / peer` at least (or at most, when lower is better)
/// `threshold`. The peer may be another subject of the same workload; without a peer
/// the goal is on the subject's own value (fairness: max/min).
struct Goal {
    issue: u32,
    key: &'static str,
    subject: String,
    peer: Option<String>,
    better: Better,
    threshold: f64,
}

fn at_least(issue: u32, key: &'static str, subject: &str, peer: &str, t: f64) -> Goal {
    Goal {
        issue,
        key,
        subject: subject.to_owned(),
        peer: Some(peer.to_owned()),
        better: Better::Higher,
        threshold: t,
    }
}

fn at_most(issue: u32, key: &'static str, subject: &str, peer: &str, t: f64) -> Goal {
    Goal {
        better: Better::Lower,
        ..at_least(issue, key, subject, peer, t)
    }
}

/// A goal on the subject's own value, at most `t`.
fn value_at_most(issue: u32, key: &'static str, subject: &str, t: f64) -> Goal {
    Goal {
        peer: None,
        ..at_most(issue, key, subject, "", t)
    }
}

const KEEPALIVE: &str = "http_keepalive";
const NEW_CONN: &str = "http_new_connection";
const NODE_RR: &str = "Node cluster rr";
const NGINX: &str = "nginx reuseport";
const POLICIES: [&str; 3] = ["rr", "shared", "reuseport"];
/// The p99 at 80% load, keep-alive and new connection.
const P99_80: [&str; 2] = ["latency_keepalive_p99_80", "latency_new_connection_p99_80"];
const FAIRNESS: [&str; 2] = ["fairness_keepalive", "fairness_new_connection"];

fn demo(policy: &str) -> String {
    format!("httpd-demo {policy}")
}

fn command(policy: &str) -> String {
    format!("cluster command {policy} (Node workers)")
}

/// The goals in force: issue 6's, as raised by issues 16 and 25 where they set new ones,
/// and issue 25's for Node workers under the `cluster` command (which replace 13's).
fn goals() -> Vec<Goal> {
    let mut goals = vec![
        at_least(6, KEEPALIVE, "httpd-demo rr", NODE_RR, 2.0),
        at_least(16, NEW_CONN, "httpd-demo rr", NODE_RR, 2.5),
        at_least(16, NEW_CONN, "httpd-demo rr", "httpd-demo shared", 0.8),
        at_least(16, NEW_CONN, "httpd-demo reuseport", NGINX, 1.0),
    ];
    for policy in POLICIES {
        goals.push(at_least(16, KEEPALIVE, &demo(policy), NGINX, 1.0));
    }
    // Node apps under the `cluster` command.
    goals.push(at_least(25, NEW_CONN, &command("rr"), NODE_RR, 1.5));
    goals.push(at_least(25, NEW_CONN, &command("shared"), NODE_RR, 2.5));
    goals.push(at_least(25, NEW_CONN, &command("reuseport"), NODE_RR, 2.5));
    for policy in POLICIES {
        goals.push(at_least(25, KEEPALIVE, &command(policy), NODE_RR, 1.2));
    }
    for key in P99_80 {
        for policy in POLICIES {
            goals.push(at_most(25, key, &command(policy), NODE_RR, 1.0));
        }
        for policy in POLICIES {
            goals.push(at_most(25, key, &demo(policy), NGINX, 1.2));
            goals.push(at_most(25, key, &demo(policy), NODE_RR, 0.5));
        }
    }
    for key in FAIRNESS {
        for policy in ["rr", "reuseport"] {
            goals.push(value_at_most(25, key, &command(policy), 1.3));
            goals.push(value_at_most(25, key, &demo(policy), 1.3));
        }
    }
    goals.extend([
        at_least(6, "ipc_echo_16b", "ipc channel", "node fork() IPC", 5.0),
        at_least(6, "ipc_echo_64k", "ipc channel", "node fork() IPC", 10.0),
        at_least(6, "spawn_true", "child::spawn", "node spawn", 3.0),
        at_least(
            25,
            "spawn_true",
            "child::spawn",
            "std::process::Command",
            1.0,
        ),
        at_least(6, "exec_100mb", "child::exec_file", "std output()", 0.9),
        at_most(6, "fork_to_listening", "httpd-demo rr", NODE_RR, 0.1),
        at_most(6, "respawn_to_listening", "httpd-demo rr", NODE_RR, 0.1),
        at_most(25, "respawn_to_listening", &command("rr"), NODE_RR, 1.0),
        at_most(
            25,
            "respawn_to_listening",
            "cluster command rr --warm-spares 1 (Node workers)",
            NODE_RR,
            0.2,
        ),
        at_most(
            6,
            "worker_rss",
            "httpd-demo rr worker",
            "Node cluster rr worker",
            0.2,
        ),
    ]);
    goals
}

/// One subject/peer pair, as `report.json` lists it.
#[derive(Debug, Clone, Serialize)]
struct Pair {
    benchmark: &'static str,
    subject: String,
    peer: String,
    unit: &'static str,
    subject_value: Option<f64>,
    peer_value: Option<f64>,
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct JsonReport<'a> {
    machine: &'a Machine,
    results: Vec<Pair>,
    /// Every paced run of the latency group (empty when it did not run).
    latency: &'a LatencyReport,
}

fn round(v: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (v * scale).round() / scale
}

fn pairs(workloads: &[Workload]) -> Vec<Pair> {
    let mut out = Vec::new();
    for w in workloads {
        for s in &w.subjects {
            for p in &w.peers {
                let (peer, peer_value) = match p {
                    Peer::Measured(ps) => (ps.name.clone(), Some(ps.median())),
                    Peer::Missing { name, reason } => (format!("{name} ({reason})"), None),
                };
                let subject_value = s.median();
                out.push(Pair {
                    benchmark: w.key,
                    subject: s.name.clone(),
                    peer,
                    unit: w.unit,
                    subject_value: Some(round(subject_value, 3)),
                    peer_value: peer_value.map(|v| round(v, 3)),
                    ratio: peer_value.map(|v| round(subject_value / v, 4)),
                });
            }
        }
    }
    out
}

/// A goal's outcome: the measured ratio, if both sides were measured, and whether it holds.
fn evaluate(goal: &Goal, workloads: &[Workload]) -> Option<(f64, bool)> {
    let w = workloads.iter().find(|w| w.key == goal.key)?;
    let subject = w.subjects.iter().find(|s| s.name == goal.subject)?;
    let ratio = match &goal.peer {
        None => subject.median(),
        Some(name) => {
            let peer = (w.peers.iter())
                .find_map(|p| match p {
                    Peer::Measured(s) if s.name == *name => Some(s),
                    _ => None,
                })
                .or_else(|| w.subjects.iter().find(|s| s.name == *name))?;
            subject.median() / peer.median()
        }
    };
    if ratio.is_nan() {
        return None;
    }
    let holds = match goal.better {
        Better::Higher => ratio >= goal.threshold,
        Better::Lower => ratio <= goal.threshold,
    };
    Some((ratio, holds))
}

fn goal_text(goal: &Goal) -> String {
    let op = if goal.better == Better::Higher {
        ">="
    } else {
        "<="
    };
    match &goal.peer {
        Some(peer) => format!(
            "(#{}) {}: {} / {peer} {op} {}",
            goal.issue, goal.key, goal.subject, goal.threshold
        ),
        None => format!(
            "(#{}) {}: {} {op} {}",
            goal.issue, goal.key, goal.subject, goal.threshold
        ),
    }
}

fn num(v: f64) -> String {
    if v.is_nan() {
        "-".to_owned()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio_text(ratio: f64, better: Better) -> String {
    match better {
        Better::Higher => format!("{ratio:.2}x"),
        Better::Lower if ratio > 0.0 && ratio < 1.0 => {
            format!("{ratio:.3}x (1/{:.1})", 1.0 / ratio)
        }
        Better::Lower => format!("{ratio:.3}x"),
    }
}

fn range(s: &Series) -> String {
    format!("{}-{}", num(s.min()), num(s.max()))
}

fn markdown(machine: &Machine, workloads: &[Workload]) -> String {
    let mut md = String::from("# `cargo xtask bench` report\n\n| machine | |\n| --- | --- |\n");
    for (k, v) in machine.rows() {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    md.push_str(
        "\nRatios are subject / peer of the medians. Higher is better for req/s, msg/s, MB/s \
         and spawn/s; lower is better for ms and MB (RSS), where a ratio below 1 means the \
         subject wins.\n\n## Goals\n\n| goal | measured | holds |\n| --- | --- | --- |\n",
    );
    for goal in &goals() {
        let shown = |r: f64| match goal.peer {
            Some(_) => ratio_text(r, goal.better),
            None => format!("{r:.2}"),
        };
        let (measured, holds) = match evaluate(goal, workloads) {
            Some((r, h)) => (shown(r), if h { "yes" } else { "**no**" }),
            None => ("not measured".to_owned(), "-"),
        };
        let _ = writeln!(md, "| {} | {measured} | {holds} |", goal_text(goal));
    }
    for w in workloads {
        let direction = match w.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        if w.subjects.is_empty() {
            let _ = writeln!(md, "\n## {}\n\n{}.\n", w.key, w.title);
            for note in &w.notes {
                let _ = writeln!(md, "- {note}");
            }
            continue;
        }
        let rounds = w.subjects.first().map_or(0, |s| s.values.len());
        let _ = write!(
            md,
            "\n## {}\n\n{}. Unit: {} ({direction}); {rounds} values per side.\n\n\
             | | median | min-max |",
            w.key, w.title, w.unit
        );
        for p in &w.peers {
            let _ = write!(md, " vs {} |", p.name());
        }
        md.push_str("\n| --- | --- | --- |");
        md.push_str(&" --- |".repeat(w.peers.len()));
        md.push('\n');
        for s in &w.subjects {
            let _ = write!(
                md,
                "| **{}** | {} | {} |",
                s.name,
                num(s.median()),
                range(s)
            );
            for p in &w.peers {
                let cell = match p {
                    Peer::Measured(ps) => ratio_text(s.median() / ps.median(), w.better),
                    Peer::Missing { .. } => "-".to_owned(),
                };
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
        for p in &w.peers {
            match p {
                Peer::Measured(ps) => {
                    let _ = write!(
                        md,
                        "| {} (peer) | {} | {} |",
                        ps.name,
                        num(ps.median()),
                        range(ps)
                    );
                }
                Peer::Missing { name, reason } => {
                    let _ = write!(md, "| {name} (peer) | {reason} | |");
                }
            }
            md.push_str(&" |".repeat(w.peers.len()));
            md.push('\n');
        }
        if !w.notes.is_empty() {
            md.push('\n');
        }
        for note in &w.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md
}

/// The chart: one bar per measured pair from 1x to the advantage of the subject (ratio,
/// or 1/ratio when lower is better) on a log scale, and a tick at each goal.
fn svg(path: &Path, workloads: &[Workload]) -> Result<()> {
    let goals = goals();
    let goals = &goals;
    let bars: Vec<(String, f64, Option<f64>)> = workloads
        .iter()
        // Fairness is a value of its own, not a ratio to a peer.
        .filter(|w| !w.key.starts_with("fairness_"))
        .flat_map(|w| {
            w.subjects.iter().flat_map(move |s| {
                w.peers.iter().filter_map(move |p| {
                    let Peer::Measured(ps) = p else { return None };
                    let ratio = s.median() / ps.median();
                    let flip = |r: f64| {
                        if w.better == Better::Lower {
                            1.0 / r
                        } else {
                            r
                        }
                    };
                    let goal = goals
                        .iter()
                        .find(|g| {
                            g.key == w.key
                                && g.subject == s.name
                                && g.peer.as_deref() == Some(ps.name.as_str())
                        })
                        .map(|g| flip(g.threshold));
                    Some((
                        format!("{}: {} vs {}", w.key, s.name, ps.name),
                        flip(ratio),
                        goal,
                    ))
                })
            })
        })
        .collect();
    let (label_w, bar_w, row_h, top) = (520i32, 560i32, 22i32, 60i32);
    let height = top + row_h * bars.len().max(1) as i32 + 40;
    let root =
        SVGBackend::new(path, ((label_w + bar_w + 80) as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    // A log scale centred on 1x: bars grow right when the subject wins, left when not.
    let (lo, hi) = bars
        .iter()
        .flat_map(|(_, v, g)| [*v, g.unwrap_or(1.0)])
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold((0.5f64, 2.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let x = |v: f64| {
        let v = v.clamp(lo, hi);
        label_w + ((v / lo).ln() / (hi / lo).ln() * f64::from(bar_w)) as i32
    };
    let font = ("sans-serif", 13).into_font();
    root.draw(&Text::new(
        "cargo xtask bench: advantage of the subject over each peer, log scale (right of 1x = \
         subject wins; for ms and MB: peer / subject); | = goal, orange = below goal or 1x",
        (10, 15),
        ("sans-serif", 14).into_font(),
    ))?;
    for (i, (label, value, goal)) in bars.iter().enumerate() {
        let y = top + row_h * i as i32;
        let colour = if *value >= goal.unwrap_or(1.0) {
            RGBColor(46, 139, 87)
        } else {
            RGBColor(222, 120, 31)
        };
        root.draw(&Text::new(label.clone(), (10, y + 4), font.clone()))?;
        let (a, b) = (x(1.0).min(x(*value)), x(1.0).max(x(*value)));
        root.draw(&Rectangle::new(
            [(a, y + 2), (b.max(a + 1), y + row_h - 4)],
            colour.filled(),
        ))?;
        root.draw(&Text::new(
            format!("{value:.2}x"),
            (b + 4, y + 4),
            font.clone(),
        ))?;
        if let Some(g) = goal {
            root.draw(&PathElement::new(
                vec![(x(*g), y), (x(*g), y + row_h - 2)],
                BLACK.stroke_width(2),
            ))?;
        }
    }
    let bottom = top + row_h * bars.len().max(1) as i32;
    root.draw(&PathElement::new(
        vec![(x(1.0), top - 6), (x(1.0), bottom)],
        BLACK.stroke_width(1),
    ))?;
    for tick in [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0] {
        if (lo..=hi).contains(&tick) {
            root.draw(&Text::new(
                format!("{tick}x"),
                (x(tick) - 8, bottom + 6),
                font.clone(),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Milliseconds from microseconds, for the latency table.
fn ms(us: u64) -> String {
    let ms = us as f64 / 1e3;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.3}")
    }
}

/// The latency section of report.md: one row per paced run.
fn latency_markdown(latency: &LatencyReport) -> String {
    if latency.rows.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n## Latency at a fixed offered load (open loop)\n\nRequests sent on a fixed \
         schedule whether or not earlier ones were answered; latency from each request's \
         scheduled time (no coordinated omission). Fairness: max/min of the requests each \
         worker answered (`x-worker-pid`); shares: requests per worker.\n\n",
    );
    for peak in &latency.peaks {
        let _ = writeln!(
            md,
            "- {}: rates from {}'s peak under the open-loop client, {:.0} req/s answered \
             when offered {:.1}x its wrk peak of {:.0} req/s (this run)",
            peak.workload,
            peak.server,
            peak.open_loop,
            super::latency::OVERLOAD,
            peak.wrk
        );
    }
    md.push_str(
        "\n| workload | load | server | offered req/s | answered req/s | p50 ms | p99 ms | \
         p99.9 ms | max ms | fairness | shares | errors / unsent |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in &latency.rows {
        let name = if r.subject {
            format!("**{}**", r.server)
        } else {
            r.server.clone()
        };
        let shares = r
            .shares
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/");
        let _ = writeln!(
            md,
            "| {} | {:.0}% | {name} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {shares} | {} / {} |",
            r.workload,
            r.load * 100.0,
            r.rate,
            r.achieved,
            ms(r.p50_us),
            ms(r.p99_us),
            ms(r.p999_us),
            ms(r.max_us),
            r.fairness.map_or("-".to_owned(), |f| format!("{f:.2}")),
            r.errors,
            r.unsent,
        );
    }
    md
}

/// The latency chart: per workload at the highest load, one row per server, a bar to
/// its p99 on a log scale with ticks at p50 and p99.9.
fn latency_svg(path: &Path, latency: &LatencyReport) -> Result<()> {
    let top_load = latency.rows.iter().map(|r| r.load).fold(0.0, f64::max);
    let rows: Vec<&LatencyRow> = latency.rows.iter().filter(|r| r.load == top_load).collect();
    let (label_w, bar_w, row_h, top) = (420i32, 600i32, 22i32, 60i32);
    let height = top + row_h * rows.len().max(1) as i32 + 40;
    let root =
        SVGBackend::new(path, ((label_w + bar_w + 200) as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = 10.0f64;
    let hi = rows
        .iter()
        .map(|r| r.p999_us.max(r.p99_us) as f64)
        .fold(1000.0, f64::max);
    let x = |us: f64| label_w + ((us.max(lo) / lo).ln() / (hi / lo).ln() * f64::from(bar_w)) as i32;
    let font = ("sans-serif", 13).into_font();
    root.draw(&Text::new(
        format!(
            "cargo xtask bench: latency at {:.0}% of the slowest peer's peak, open loop, log \
             scale; bar = p99, | = p50 and p99.9 (shorter is better)",
            top_load * 100.0
        ),
        (10, 15),
        ("sans-serif", 14).into_font(),
    ))?;
    for (i, r) in rows.iter().enumerate() {
        let y = top + row_h * i as i32;
        let colour = if r.subject {
            RGBColor(46, 139, 87)
        } else {
            RGBColor(120, 120, 120)
        };
        root.draw(&Text::new(
            format!("{}: {}", r.workload, r.server),
            (10, y + 4),
            font.clone(),
        ))?;
        let end = x(r.p99_us as f64);
        root.draw(&Rectangle::new(
            [(label_w, y + 2), (end.max(label_w + 1), y + row_h - 4)],
            colour.filled(),
        ))?;
        for tick in [r.p50_us, r.p999_us] {
            let at = x(tick as f64);
            root.draw(&PathElement::new(
                vec![(at, y), (at, y + row_h - 2)],
                BLACK.stroke_width(2),
            ))?;
        }
        root.draw(&Text::new(
            format!("{} / {} / {} ms", ms(r.p50_us), ms(r.p99_us), ms(r.p999_us)),
            (x(hi) + 6, y + 4),
            font.clone(),
        ))?;
    }
    let bottom = top + row_h * rows.len().max(1) as i32;
    for tick in [10.0, 100.0, 1e3, 1e4, 1e5, 1e6] {
        if (lo..=hi).contains(&tick) {
            root.draw(&Text::new(
                format!("{} ms", tick / 1e3),
                (x(tick) - 10, bottom + 6),
                font.clone(),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Writes report.md, report.json, report.svg (and report-latency.svg when the latency
/// group ran) into `dir`; returns their paths.
pub(super) fn write(
    dir: &Path,
    machine: &Machine,
    workloads: &[Workload],
    latency: &LatencyReport,
) -> Result<Vec<PathBuf>> {
    let md_path = dir.join("report.md");
    let md = markdown(machine, workloads) + &latency_markdown(latency);
    std::fs::write(&md_path, md).context("writing report.md")?;
    let json_path = dir.join("report.json");
    let json = JsonReport {
        machine,
        results: pairs(workloads),
        latency,
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .context("writing report.json")?;
    let svg_path = dir.join("report.svg");
    svg(&svg_path, workloads).context("writing report.svg")?;
    let mut written = vec![md_path, json_path, svg_path];
    if !latency.rows.is_empty() {
        let path = dir.join("report-latency.svg");
        latency_svg(&path, latency).context("writing report-latency.svg")?;
        written.push(path);
    }
    Ok(written)
}

/// The goals, for the terminal.
pub(super) fn summary(workloads: &[Workload]) -> String {
    let mut out = String::from("\n== goals\n");
    for goal in &goals() {
        let line = match evaluate(goal, workloads) {
            Some((r, holds)) => format!(
                "  {:<4} {}  measured {}",
                if holds { "ok" } else { "MISS" },
                goal_text(goal),
                match goal.peer {
                    Some(_) => ratio_text(r, goal.better),
                    None => format!("{r:.2}"),
                }
            ),
            None => format!("  -    {} not measured", goal_text(goal)),
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(better: Better, subject: f64, peer: Option<f64>) -> Workload {
        Workload {
            key: "fork_to_listening",
            title: "t".into(),
            unit: "ms",
            better,
            subjects: vec![Series {
                name: "httpd-demo rr".into(),
                values: vec![subject],
            }],
            peers: vec![match peer {
                Some(v) => Peer::Measured(Series {
                    name: "Node cluster rr".into(),
                    values: vec![v],
                }),
                None => Peer::Missing {
                    name: "Node cluster rr".into(),
                    reason: "node not installed".into(),
                },
            }],
            notes: vec![],
        }
    }

    #[test]
    fn one_pair_per_subject_and_peer_with_nulls_for_missing_peers() {
        let measured = pairs(&[workload(Better::Lower, 5.0, Some(100.0))]);
        assert_eq!(measured.len(), 1);
        assert_eq!(measured[0].ratio, Some(0.05));
        let missing = pairs(&[workload(Better::Lower, 5.0, None)]);
        assert_eq!(missing[0].ratio, None);
        assert!(missing[0].peer.contains("not installed"));
    }

    #[test]
    fn lower_is_better_goals_hold_below_the_threshold() {
        let goals = goals();
        let goal = goals
            .iter()
            .find(|g| g.key == "fork_to_listening")
            .expect("a start-up goal");
        assert!(
            evaluate(goal, &[workload(Better::Lower, 5.0, Some(100.0))])
                .unwrap()
                .1
        );
        assert!(
            !evaluate(goal, &[workload(Better::Lower, 50.0, Some(100.0))])
                .unwrap()
                .1
        );
    }

    #[test]
    fn medians_of_even_counts_average_the_middle() {
        let s = Series {
            name: String::new(),
            values: vec![4.0, 1.0, 3.0, 2.0],
        };
        assert_eq!(s.median(), 2.5);
    }
}
