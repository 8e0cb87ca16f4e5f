//! What `cargo xtask chaos` writes: the table on stdout, `target/chaos/report.json` and
//! `target/chaos/timeline.svg` (one band per target: requests and failures per 100 ms,
//! every fault drawn on the time axis as a span of its colour).

use std::fmt::Write as _;
use std::time::Duration;

use super::check::{Run, Verdict};
use super::schedule::FaultKind;

/// One target's result.
pub(crate) struct Outcome {
    pub(crate) name: String,
    pub(crate) seed: u64,
    pub(crate) run: Run,
    pub(crate) verdict: Verdict,
}

/// The table printed at the end.
pub(crate) fn table(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>9} {:>7} {:>9} {:>11} {:>12} {:>10} {:>8} {:>7}  result",
        "target",
        "requests",
        "failed",
        "explained",
        "unexplained",
        "longest gap",
        "RSS drift",
        "fd drift",
        "faults"
    );
    for o in outcomes {
        let v = &o.verdict;
        let _ = writeln!(
            out,
            "{:<20} {:>9} {:>7} {:>9} {:>11} {:>9} ms {:>7} kB {:>8} {:>7}  {}",
            o.name,
            v.requests,
            v.failed,
            v.explained,
            v.unexplained.len(),
            v.longest_gap.as_millis(),
            v.rss_drift_kb,
            v.fd_drift,
            o.run.faults.len(),
            if v.passed() { "ok" } else { "FAILED" }
        );
    }
    out
}

/// `report.json`: the seed and, per target, the counts, the longest gap, the drift and
/// the faults by kind; every problem found.
pub(crate) fn json(seed: u64, outcomes: &[Outcome]) -> serde_json::Result<String> {
    let targets: Vec<serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            let v = &o.verdict;
            serde_json::json!({
                "target": o.name,
                "seed": o.seed,
                "requests": v.requests,
                "failed": v.failed,
                "explained": v.explained,
                "unexplained": v.unexplained.len(),
                "longest_gap_ms": v.longest_gap.as_millis() as u64,
                "longest_gap_after": v.longest_gap_after.map(FaultKind::name),
                "rss_kb": {"warm": o.run.warm.rss_kb, "end": o.run.end.rss_kb, "drift": v.rss_drift_kb},
                "fds": {"warm": o.run.warm.fds, "end": o.run.end.fds, "drift": v.fd_drift},
                "faults_by_kind": v.faults,
                "faults": o.run.faults.iter().map(|f| serde_json::json!({
                    "kind": f.kind.name(),
                    "start_ms": f.start.as_millis() as u64,
                    "end_ms": f.end.as_millis() as u64,
                    "pid": f.pid,
                    "detail": f.detail,
                })).collect::<Vec<_>>(),
                "passed": v.passed(),
                "problems": v.problems,
            })
        })
        .collect();
    serde_json::to_string_pretty(&serde_json::json!({ "seed": seed, "targets": targets }))
}

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 150.0;
const BAND: f64 = 130.0;
const BUCKET: Duration = Duration::from_millis(100);

fn colour(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Kill => "#d62728",
        FaultKind::Stop => "#9467bd",
        FaultKind::Hup => "#2ca02c",
        FaultKind::Scale => "#17becf",
        FaultKind::Upgrade => "#ff7f0e",
        FaultKind::WorkerFds => "#8c564b",
        FaultKind::PrimaryFds => "#e377c2",
        FaultKind::Burst => "#bcbd22",
        FaultKind::Slowloris => "#7f7f7f",
        FaultKind::Burn => "#1f77b4",
    }
}

/// `timeline.svg`.
pub(crate) fn svg(seed: u64, outcomes: &[Outcome]) -> String {
    let height = 60.0 + BAND * outcomes.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="10" y="18" font-size="14">cargo xtask chaos, seed {seed}: requests (grey) and failures (red) per 100 ms; faults as coloured spans</text>"#
    );
    // Legend.
    let mut x = 10.0;
    for kind in FaultKind::ALL {
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="28" width="10" height="10" fill="{}"/><text x="{}" y="37">{}</text>"#,
            colour(kind),
            x + 13.0,
            kind.name()
        );
        x += 20.0 + 7.0 * kind.name().len() as f64;
    }
    let plot = WIDTH - LEFT - 20.0;
    for (i, o) in outcomes.iter().enumerate() {
        let top = 60.0 + BAND * i as f64;
        let end = o
            .run
            .requests
            .iter()
            .map(|r| r.end)
            .max()
            .unwrap_or_default();
        let buckets = (end.as_millis() / BUCKET.as_millis()) as usize + 1;
        let mut total = vec![0u32; buckets];
        let mut failed = vec![0u32; buckets];
        for r in &o.run.requests {
            let b = (r.end.as_millis() / BUCKET.as_millis()) as usize;
            total[b] += 1;
            if !r.is_ok() {
                failed[b] += 1;
            }
        }
        let peak = f64::from(total.iter().copied().max().unwrap_or(1).max(1));
        let scale_x = plot / buckets as f64;
        let chart = BAND - 40.0;
        let base = top + 14.0 + chart;
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}">{}</text><text x="10" y="{}" fill="{}">{}</text>"#,
            top + 40.0,
            o.name,
            top + 56.0,
            if o.verdict.passed() {
                "#2ca02c"
            } else {
                "#d62728"
            },
            if o.verdict.passed() {
                "passed"
            } else {
                "FAILED"
            }
        );
        for f in &o.run.faults {
            let x0 = LEFT + f.start.as_millis() as f64 / BUCKET.as_millis() as f64 * scale_x;
            let w = ((f.end - f.start).as_millis() as f64 / BUCKET.as_millis() as f64 * scale_x)
                .max(1.5);
            let _ = writeln!(
                s,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{w:.1}" height="{chart:.1}" fill="{}" fill-opacity="0.25"><title>{} {:.3}-{:.3} s {}</title></rect>"#,
                top + 14.0,
                colour(f.kind),
                f.kind.name(),
                f.start.as_secs_f64(),
                f.end.as_secs_f64(),
                f.detail
            );
        }
        for (b, (&t, &e)) in total.iter().zip(&failed).enumerate() {
            let x0 = LEFT + b as f64 * scale_x;
            let h = f64::from(t) / peak * chart;
            let _ = write!(
                s,
                r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#999"/>"##,
                base - h,
                scale_x.max(0.5)
            );
            if e > 0 {
                let h = (f64::from(e) / peak * chart).max(2.0);
                let _ = write!(
                    s,
                    r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="#d62728"/>"##,
                    base - h,
                    scale_x.max(1.0)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{base}" x2="{}" y2="{base}" stroke="black"/><text x="{}" y="{}" text-anchor="end">{:.0} s</text><text x="{LEFT}" y="{}">0</text>"#,
            LEFT + plot,
            LEFT + plot,
            base + 12.0,
            end.as_secs_f64(),
            base + 12.0
        );
    }
    s.push_str("</svg>\n");
    s
}
