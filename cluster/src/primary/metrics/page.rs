//! `/status`: the status page, server-rendered HTML with no external asset and no script:
//! a header (primary pid, policy, uptime, readiness, reload), a table of the slots and
//! their workers, and an inline SVG chart of the last minutes (hand-offs and restarts per
//! second, from the [`History`](super::history::History) ring). It reloads itself every
//! [`REFRESH_SECONDS`]. Every string from the cluster is escaped. Pure: a snapshot in,
//! a page out.

use std::fmt::Write as _;
use std::time::Duration;

use super::history::Rate;
use crate::primary::stats::{ReloadReport, Stats, WorkerStats};

/// How often the page reloads itself (`<meta http-equiv="refresh">`).
pub(crate) const REFRESH_SECONDS: u32 = 2;

/// The chart's drawing area, in SVG user units.
const CHART_WIDTH: f64 = 600.0;
const CHART_HEIGHT: f64 = 120.0;
/// Room for the axis labels around the drawing area.
const MARGIN_LEFT: f64 = 48.0;
const MARGIN_BOTTOM: f64 = 18.0;

/// What the page shows: the snapshot, the rates of the last minutes, and this process.
#[derive(Debug)]
pub(crate) struct Page<'a> {
    pub(crate) stats: &'a Stats,
    pub(crate) rates: &'a [Rate],
    pub(crate) primary_pid: u32,
}

/// `text` with `&`, `<`, `>`, `"` and `'` escaped, for HTML text and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `3d 4h`, `2h 5m`, `4m 12s`, `9s`.
fn duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, minutes, seconds) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{minutes}m {seconds}s"),
        (0, _, _) => format!("{hours}h {minutes}m"),
        _ => format!("{days}d {hours}h"),
    }
}

/// `512 KiB`, `48.3 MiB`, `1.20 GiB`.
fn bytes(n: u64) -> String {
    const KIB: f64 = 1024.0;
    let n = n as f64;
    if n < KIB * KIB {
        format!("{:.0} KiB", n / KIB)
    } else if n < KIB * KIB * KIB {
        format!("{:.1} MiB", n / KIB / KIB)
    } else {
        format!("{:.2} GiB", n / KIB / KIB / KIB)
    }
}

fn reload_outcome(report: &ReloadReport) -> String {
    let took = format!("{:.1}s", report.took.as_secs_f64());
    if report.succeeded() {
        format!(
            "succeeded: {} slots replaced in {took}",
            report.replaced.len()
        )
    } else if report.interrupted {
        format!("cut short by a stop after {took}")
    } else {
        let failed: Vec<String> = report.failed.iter().map(|f| f.slot.to_string()).collect();
        format!(
            "failed in {took}: slots {} kept their old worker",
            failed.join(", ")
        )
    }
}

impl Page<'_> {
    /// The whole page.
    pub(crate) fn render(&self) -> String {
        let stats = self.stats;
        let mut html = String::with_capacity(8192);
        let _ = write!(
            html,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\">\
             <title>cluster {pid}</title><style>{STYLE}</style></head><body>\n",
            pid = self.primary_pid,
        );
        let (ready, ready_class) = match (stats.ready, stats.stopping) {
            (_, true) => ("stopping", "bad"),
            (true, false) => ("ready", "good"),
            (false, false) => ("not ready", "bad"),
        };
        let _ = write!(
            html,
            "<h1>cluster <span class=\"{ready_class}\" id=\"readiness\">{ready}</span></h1>\n\
             <p>primary pid <b id=\"primary-pid\">{pid}</b> &middot; policy <b>{policy}</b> \
             &middot; up {uptime} &middot; {workers} workers in {slots} slots</p>\n",
            pid = self.primary_pid,
            policy = escape(stats.policy.as_str()),
            uptime = duration(stats.uptime),
            workers = stats.workers.len(),
            slots = stats.slots.len(),
        );
        html.push_str("<p>reload: ");
        match (&stats.reload, &stats.last_reload) {
            (Some(progress), _) => {
                let _ = write!(
                    html,
                    "in progress, {} of {} slots done",
                    progress.done, progress.total
                );
            }
            (None, Some(report)) => html.push_str(&escape(&reload_outcome(report))),
            (None, None) => html.push_str("none yet"),
        }
        let _ = writeln!(
            html,
            " &middot; {} connections queued &middot; {} handed since the start</p>",
            stats.queued, stats.totals.handed
        );
        self.table(&mut html);
        self.chart(&mut html);
        html.push_str("</body></html>\n");
        html
    }

    fn table(&self, html: &mut String) {
        let stats = self.stats;
        html.push_str(
            "<table id=\"workers\"><thead><tr><th>slot</th><th>worker</th><th>pid</th>\
             <th>state</th><th>uptime</th><th>restarts</th><th>last exit</th><th>CPU</th>\
             <th>RSS</th><th>handed</th><th>listening</th><th>build</th></tr></thead><tbody>\n",
        );
        let mut workers: Vec<&WorkerStats> = stats.workers.iter().collect();
        workers.sort_by_key(|w| (w.slot, w.id));
        for slot in &stats.slots {
            let last_exit = slot.last_exit.map_or_else(String::new, |exit| {
                escape(&format!("{} ({})", exit.cause, exit.status))
            });
            let mut any = false;
            for worker in workers.iter().filter(|w| w.slot == slot.slot) {
                any = true;
                let cpu = worker
                    .usage
                    .and_then(|u| u.cpu_percent)
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"));
                let rss = worker
                    .usage
                    .map_or_else(|| "-".to_owned(), |u| bytes(u.rss_bytes));
                let listening: Vec<String> = worker
                    .listening
                    .iter()
                    .map(|a| escape(&a.to_string()))
                    .collect();
                let _ = writeln!(
                    html,
                    "<tr><td>{slot}</td><td>{id}</td><td class=\"pid\">{pid}</td>\
                     <td class=\"{state}\">{state}</td><td>{uptime}</td><td>{restarts}</td>\
                     <td>{last_exit}</td><td>{cpu}</td><td>{rss}</td><td>{handed}</td>\
                     <td>{listening}</td><td>{build}</td></tr>",
                    slot = slot.slot,
                    id = worker.id,
                    pid = worker.pid,
                    state = escape(worker.state.as_str()),
                    uptime = duration(worker.uptime),
                    restarts = slot.restarts,
                    handed = worker.handed,
                    listening = listening.join("<br>"),
                    build = escape(worker.build.as_deref().unwrap_or("-")),
                );
            }
            if !any {
                let state = if slot.failed {
                    "given up"
                } else {
                    "restarting"
                };
                let _ = writeln!(
                    html,
                    "<tr><td>{slot}</td><td>-</td><td>-</td><td class=\"bad\">{state}</td>\
                     <td>-</td><td>{restarts}</td><td>{last_exit}</td><td>-</td><td>-</td>\
                     <td>-</td><td>-</td><td>-</td></tr>",
                    slot = slot.slot,
                    restarts = slot.restarts,
                );
            }
        }
        // Warm spares, and workers whose slot is gone (a scale-down's, draining).
        for worker in workers
            .iter()
            .filter(|w| !stats.slots.iter().any(|s| s.slot == w.slot))
        {
            let (slot, state) = match worker.spare {
                true => ("spare".to_owned(), "spare"),
                false => (worker.slot.to_string(), worker.state.as_str()),
            };
            let rss = worker
                .usage
                .map_or_else(|| "-".to_owned(), |u| bytes(u.rss_bytes));
            let _ = writeln!(
                html,
                "<tr><td>{slot}</td><td>{id}</td><td class=\"pid\">{pid}</td>\
                 <td class=\"{state}\">{state}</td><td>{uptime}</td><td>-</td><td>-</td>\
                 <td>-</td><td>{rss}</td><td>{handed}</td><td>-</td><td>{build}</td></tr>",
                id = worker.id,
                pid = worker.pid,
                uptime = duration(worker.uptime),
                handed = worker.handed,
                build = escape(worker.build.as_deref().unwrap_or("-")),
            );
        }
        html.push_str("</tbody></table>\n");
    }

    /// The chart: a polyline per series over the ring's time span, scaled to the largest
    /// rate (at least 1/s).
    fn chart(&self, html: &mut String) {
        let width = MARGIN_LEFT + CHART_WIDTH + 8.0;
        let height = CHART_HEIGHT + MARGIN_BOTTOM + 8.0;
        let _ = write!(
            html,
            "<h2>hand-offs and restarts per second, last {minutes} minutes</h2>\n<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" \
             width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" \
             role=\"img\" aria-label=\"hand-offs and restarts per second\">\n",
            minutes = super::history::HISTORY_POINTS / 60,
        );
        let top = self
            .rates
            .iter()
            .map(|r| r.handed.max(r.restarts))
            .fold(1.0_f64, f64::max);
        let (x0, y0) = (MARGIN_LEFT, 4.0);
        let _ = writeln!(
            html,
            "<rect x=\"{x0}\" y=\"{y0}\" width=\"{CHART_WIDTH}\" height=\"{CHART_HEIGHT}\" \
             class=\"frame\"/>\n<text x=\"{tx}\" y=\"{ty}\" class=\"axis\">{top:.0}/s</text>\n\
             <text x=\"{tx}\" y=\"{by}\" class=\"axis\">0</text>",
            tx = x0 - 4.0,
            ty = y0 + 10.0,
            by = y0 + CHART_HEIGHT,
        );
        let _ = writeln!(
            html,
            "<text x=\"{x0}\" y=\"{ly}\" class=\"handed\">hand-offs/s</text>\
             <text x=\"{rx}\" y=\"{ly}\" class=\"restarts\">restarts/s</text>\
             <text x=\"{ex}\" y=\"{ly}\" class=\"axis\">now</text>",
            ly = y0 + CHART_HEIGHT + 14.0,
            rx = x0 + 110.0,
            ex = x0 + CHART_WIDTH,
        );
        for (class, value) in [
            ("handed", (|r: &Rate| r.handed) as fn(&Rate) -> f64),
            ("restarts", |r: &Rate| r.restarts),
        ] {
            let points = self.points(top, value);
            let _ = writeln!(html, "<polyline class=\"{class}\" points=\"{points}\"/>");
        }
        html.push_str("</svg>\n");
    }

    /// A polyline's points: the newest at the right edge, the width spanning as many
    /// seconds as the ring holds samples ([`HISTORY_POINTS`](super::history::HISTORY_POINTS)).
    fn points(&self, top: f64, value: fn(&Rate) -> f64) -> String {
        let Some(last) = self.rates.last() else {
            return String::new();
        };
        let span = (super::history::HISTORY_POINTS as f64).max(1.0);
        let mut points = String::new();
        for rate in self.rates {
            let ago = last.at.saturating_sub(rate.at).as_secs_f64();
            let x = MARGIN_LEFT + CHART_WIDTH * (1.0 - (ago / span).min(1.0));
            let y = 4.0 + CHART_HEIGHT * (1.0 - value(rate) / top);
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        points.trim_end().to_owned()
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:1.5em;color:#222}\
table{border-collapse:collapse}th,td{padding:3px 9px;border-bottom:1px solid #ddd;\
text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f3f3}\
.good,.listening{color:#18794e}.bad{color:#c4320a}.draining,.starting{color:#946300}\
svg .frame{fill:#fafafa;stroke:#ccc}svg polyline{fill:none;stroke-width:1.5}\
svg polyline.handed{stroke:#2563eb}svg text.handed{fill:#2563eb}\
svg polyline.restarts{stroke:#c4320a}svg text.restarts{fill:#c4320a}\
svg .axis{font-size:10px;text-anchor:end;fill:#666}svg text{font-size:11px}";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::metrics::history::History;
    use crate::primary::metrics::sample_stats;

    fn render(rates: &[Rate]) -> String {
        let stats = sample_stats();
        Page {
            stats: &stats,
            rates,
            primary_pid: 4100,
        }
        .render()
    }

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            escape(r#"<a href="x">'&'</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        let html = render(&[]);
        // The sample's build id is `<b>"x"&'y'`: never raw in the page.
        assert!(!html.contains("<b>\"x\""), "{html}");
        assert!(
            html.contains("&lt;b&gt;&quot;x&quot;&amp;&#39;y&#39;"),
            "{html}"
        );
    }

    #[test]
    fn shows_every_worker_and_the_slots_without_one() {
        let html = render(&[]);
        for pid in ["4101", "4103", "4104"] {
            assert!(
                html.contains(&format!("<td class=\"pid\">{pid}</td>")),
                "{pid}"
            );
        }
        assert!(html.contains("<b id=\"primary-pid\">4100</b>"), "{html}");
        assert!(html.contains("given up"), "slot 2: {html}");
        assert!(
            html.contains("signal (signal 9)") || html.contains("signal ("),
            "{html}"
        );
        for state in ["listening", "draining", "starting"] {
            assert!(html.contains(&format!(">{state}</td>")), "{state}: {html}");
        }
        assert!(html.contains("not ready"), "{html}");
        assert!(
            html.contains("succeeded: 2 slots replaced in 3.2s"),
            "{html}"
        );
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(!html.contains("<script"), "no script");
        assert!(!html.contains("src="), "no external asset");
    }

    #[test]
    fn the_chart_draws_the_rates_newest_at_the_right() {
        let mut history = History::default();
        let mut totals = crate::Totals::default();
        for second in 0..4 {
            totals.handed += 10 * second;
            history.record(Duration::from_secs(second), &totals);
        }
        let rates = history.rates();
        let html = render(&rates);
        let handed = html
            .lines()
            .find(|l| l.starts_with("<polyline class=\"handed\""))
            .expect("a polyline");
        let points: Vec<&str> = handed
            .split('"')
            .nth(3)
            .expect("points")
            .split(' ')
            .collect();
        assert_eq!(points.len(), 3, "{handed}");
        let right = format!("{:.1},", MARGIN_LEFT + CHART_WIDTH);
        assert!(points[2].starts_with(&right), "{handed}");
        // The largest rate (30/s) is at the top of the drawing area.
        assert!(points[2].ends_with(",4.0"), "{handed}");
        assert!(html.contains(">30/s</text>"), "{html}");
    }

    #[test]
    fn durations_and_sizes_read_like_a_person_wrote_them() {
        assert_eq!(duration(Duration::from_secs(9)), "9s");
        assert_eq!(duration(Duration::from_secs(252)), "4m 12s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(
            duration(Duration::from_secs(3 * 86_400 + 4 * 3600)),
            "3d 4h"
        );
        assert_eq!(bytes(524_288), "512 KiB");
        assert_eq!(bytes(50_646_630), "48.3 MiB");
    }
}
