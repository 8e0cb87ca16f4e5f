//! What the fleet run measured: per step, the requests and failures seen by the client
//! through nginx and which host answered them (nginx's `X-Upstream` header); printed as
//! tables, written as `report.json` and drawn as `fleet.svg` (requests per second per
//! host over time).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use plotters::prelude::*;
use serde::Serialize;
use testkit::Sample;

/// One step's time window on the load's clock, and what it adds to the report.
#[derive(Debug, Clone)]
pub(crate) struct Window {
    pub(crate) name: &'static str,
    pub(crate) start: Duration,
    pub(crate) end: Duration,
    /// Step-specific figures (milliseconds and the like).
    pub(crate) extra: BTreeMap<&'static str, serde_json::Value>,
}

/// One step in `report.json`: `{"name", "requests", "failures", ...}`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Step {
    pub(crate) name: &'static str,
    pub(crate) requests: usize,
    pub(crate) failures: usize,
    pub(crate) duration_s: f64,
    /// Successful responses by the host that gave them.
    pub(crate) per_host: BTreeMap<String, usize>,
    /// Requests nginx sent to more than one host (a retry hid a host's failure).
    pub(crate) retried: usize,
    #[serde(flatten)]
    pub(crate) extra: BTreeMap<&'static str, serde_json::Value>,
}

/// The host that answered: the last of nginx's `$upstream_addr` list.
pub(crate) fn answered_by(sample: &Sample) -> Option<&str> {
    sample.tag.as_deref()?.rsplit(", ").next()
}

/// Whether nginx tried `addr` for this request (first try or a retry).
pub(crate) fn tried(sample: &Sample, addr: &str) -> bool {
    sample
        .tag
        .as_deref()
        .is_some_and(|t| t.split(", ").any(|a| a == addr))
}

/// Sums `samples` inside `window`; `names` maps upstream addresses to host names.
pub(crate) fn step(samples: &[Sample], window: &Window, names: &BTreeMap<String, String>) -> Step {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= window.start && s.at < window.end)
        .collect();
    let mut per_host: BTreeMap<String, usize> = names.values().map(|n| (n.clone(), 0)).collect();
    for s in inside.iter().filter(|s| s.is_ok()) {
        if let Some(name) = answered_by(s).and_then(|a| names.get(a)) {
            *per_host.entry(name.clone()).or_default() += 1;
        }
    }
    Step {
        name: window.name,
        requests: inside.len(),
        failures: inside.iter().filter(|s| !s.is_ok()).count(),
        duration_s: (window.end - window.start).as_secs_f64(),
        per_host,
        retried: inside
            .iter()
            .filter(|s| s.tag.as_deref().is_some_and(|t| t.contains(", ")))
            .count(),
        extra: window.extra.clone(),
    }
}

/// A step's table: requests, failures, retries, then each host's share.
pub(crate) fn table(step: &Step) -> String {
    let mut rows = vec![
        ("requests".to_owned(), step.requests.to_string()),
        ("failures".to_owned(), step.failures.to_string()),
        ("retried by nginx".to_owned(), step.retried.to_string()),
    ];
    let ok: usize = step.per_host.values().sum();
    for (host, n) in &step.per_host {
        let share = if ok == 0 {
            0.0
        } else {
            100.0 * *n as f64 / ok as f64
        };
        rows.push((format!("{host} share"), format!("{n} ({share:.1}%)")));
    }
    for (key, value) in &step.extra {
        rows.push(((*key).to_owned(), value.to_string()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!(
        "  {} ({:.1} s)\n",
        step.name.to_uppercase(),
        step.duration_s
    );
    for (k, v) in rows {
        out.push_str(&format!("    {k:<width$}  {v:>16}\n"));
    }
    out
}

/// `{"steps": [...]}`.
pub(crate) fn json(steps: &[Step]) -> Result<String> {
    #[derive(Serialize)]
    struct Report<'a> {
        steps: &'a [Step],
    }
    Ok(serde_json::to_string_pretty(&Report { steps })? + "\n")
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Requests per second per host (and failures, red) in 250 ms buckets, steps shaded.
pub(crate) fn svg(
    path: &Path,
    samples: &[Sample],
    windows: &[Window],
    names: &BTreeMap<String, String>,
) -> Result<()> {
    const BUCKET: f64 = 0.25;
    let end = samples.last().map_or(1.0, |s| s.at.as_secs_f64()).max(1.0);
    let buckets = (end / BUCKET).ceil() as usize + 1;
    let hosts: Vec<&String> = names.values().collect();
    let mut series = vec![vec![0f64; buckets]; hosts.len() + 1];
    for s in samples {
        let b = (s.at.as_secs_f64() / BUCKET) as usize;
        let line = if s.is_ok() {
            answered_by(s)
                .and_then(|a| names.get(a))
                .and_then(|n| hosts.iter().position(|h| *h == n))
        } else {
            Some(hosts.len())
        };
        if let Some(line) = line {
            series[line][b.min(buckets - 1)] += 1.0 / BUCKET;
        }
    }
    let peak = series
        .iter()
        .flatten()
        .copied()
        .fold(1.0f64, f64::max)
        .max(1.0);
    let (left, top, width, height) = (60i32, 40i32, 900i32, 300i32);
    let root = SVGBackend::new(
        path,
        ((left + width + 30) as u32, (top + height + 60) as u32),
    )
    .into_drawing_area();
    root.fill(&WHITE)?;
    let x = |t: f64| left + (t / end * f64::from(width)) as i32;
    let y = |v: f64| top + height - (v / peak * f64::from(height)) as i32;
    let font = ("sans-serif", 12).into_font();
    root.draw(&Text::new(
        format!(
            "cargo xtask fleet: requests/s per host through nginx (peak {peak:.0}/s), red = failed"
        ),
        (left, 12),
        ("sans-serif", 14).into_font(),
    ))?;
    for (i, w) in windows.iter().enumerate() {
        let shade = if i % 2 == 0 {
            RGBColor(240, 240, 240)
        } else {
            RGBColor(225, 232, 240)
        };
        let (a, b) = (x(w.start.as_secs_f64()), x(w.end.as_secs_f64()));
        root.draw(&Rectangle::new(
            [(a, top), (b.max(a + 1), top + height)],
            shade.filled(),
        ))?;
        root.draw(&Text::new(w.name, (a + 2, top + 4), font.clone()))?;
    }
    for (i, line) in series.iter().enumerate() {
        let colour = if i == hosts.len() {
            RED
        } else {
            COLOURS[i % COLOURS.len()]
        };
        let points: Vec<(i32, i32)> = line
            .iter()
            .enumerate()
            .map(|(b, v)| (x((b as f64 + 0.5) * BUCKET), y(*v)))
            .collect();
        root.draw(&PathElement::new(points, colour.stroke_width(2)))?;
        let label = hosts.get(i).map_or("failed", |h| h.as_str());
        root.draw(&Text::new(
            label.to_owned(),
            (left + 10 + 80 * i as i32, top + height + 30),
            font.clone().color(&colour),
        ))?;
    }
    root.draw(&PathElement::new(
        vec![
            (left, top),
            (left, top + height),
            (left + width, top + height),
        ],
        BLACK.stroke_width(1),
    ))?;
    for t in (0..=end as u32).step_by(5) {
        root.draw(&Text::new(
            format!("{t} s"),
            (x(f64::from(t)) - 8, top + height + 6),
            font.clone(),
        ))?;
    }
    root.draw(&Text::new(format!("{peak:.0}"), (5, top), font.clone()))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use testkit::Outcome;

    fn sample(ms: u64, ok: bool, tag: &str) -> Sample {
        Sample {
            at: Duration::from_millis(ms),
            outcome: if ok {
                Outcome::Status(200)
            } else {
                Outcome::Failed("reset".into())
            },
            tag: Some(tag.to_owned()).filter(|t| !t.is_empty()),
        }
    }

    #[test]
    fn a_step_counts_its_window_by_answering_host() {
        let names: BTreeMap<String, String> = [("a:1", "h1"), ("b:1", "h2")]
            .map(|(a, n)| (a.to_owned(), n.to_owned()))
            .into();
        let samples = [
            sample(5, true, "a:1"),
            sample(10, true, "a:1"),
            sample(20, true, "b:1, a:1"),
            sample(30, false, ""),
            sample(40, true, "b:1"),
            sample(50, true, "b:1"),
        ];
        let window = Window {
            name: "kill-host",
            start: Duration::from_millis(10),
            end: Duration::from_millis(50),
            extra: BTreeMap::new(),
        };
        let step = step(&samples, &window, &names);
        assert_eq!((step.requests, step.failures, step.retried), (4, 1, 1));
        assert_eq!(step.per_host["h1"], 2);
        assert_eq!(step.per_host["h2"], 1);
        assert!(tried(&samples[2], "b:1") && !tried(&samples[1], "b:1"));
        let json = json(&[step]).unwrap();
        assert!(json.contains("\"name\": \"kill-host\""), "{json}");
    }
}
