//! `/metrics`: one snapshot of the cluster ([`Stats`]) encoded by `prometheus-client` in
//! the OpenMetrics text format (what its text encoder writes: counters' samples end in
//! `_total` and the exposition in `# EOF`). Counters come from [`Totals`](crate::Totals),
//! monotonic while the primary runs, as `ConstCounter`s of a collector made for the
//! scrape; nothing is counted twice and nothing here keeps state but the reload-duration
//! histogram ([`ReloadDurations`]), which observes each ended reload once.
//!
//! Label cardinality is bounded: states, causes and outcomes are fixed sets, and
//! per-worker series are labelled by slot (at most the worker cap, 1024), never by pid;
//! a slot's series go with it when it is removed (they are made from each snapshot).

use std::fmt::Write as _;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::primary::stats::{ExitCause, Stats};

/// The `Content-Type` of `/metrics`: the OpenMetrics text format, which Prometheus (2.x
/// and later) asks for first and parses with the counter types intact.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The upper bounds of the reload-duration buckets, in seconds (a reload takes a slot's
/// start and listen, times the slots).
const RELOAD_BUCKETS: [f64; 10] = [0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0];

/// The states `cluster_workers` always has a series for, as `WorkerState::as_str` says them.
/// A worker's `state` label: a warm spare is `spare` whatever its phase.
fn state_of(worker: &crate::primary::stats::WorkerStats) -> &'static str {
    match worker.spare {
        true => "spare",
        false => worker.state.as_str(),
    }
}

const STATES: [&str; 5] = ["starting", "online", "listening", "draining", "spare"];

/// The reload durations, each ended reload observed once: when the count of ended
/// reloads ([`Totals`](crate::Totals)) has grown since the last snapshot seen, the last
/// report's duration is observed (reloads that end between two snapshots a second apart
/// are observed as one, with the last one's duration).
#[derive(Debug)]
pub(crate) struct ReloadDurations {
    seen: u64,
    histogram: Histogram,
}

impl Default for ReloadDurations {
    fn default() -> Self {
        Self {
            seen: 0,
            histogram: Histogram::new(RELOAD_BUCKETS),
        }
    }
}

impl ReloadDurations {
    /// Observes the last reload if it ended since the last snapshot seen.
    pub(crate) fn see(&mut self, stats: &Stats) {
        let ended = stats.totals.reloads_succeeded + stats.totals.reloads_failed;
        if ended > self.seen {
            self.seen = ended;
            if let Some(report) = &stats.last_reload {
                self.histogram.observe(report.took.as_secs_f64());
            }
        }
    }
}

/// What one scrape encodes: the snapshot and what the primary counts outside the core.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) stats: Stats,
    /// Lines the application's output queues dropped
    /// ([`Primary::dropped_output_lines`](crate::Primary::dropped_output_lines)).
    pub(crate) dropped_output_lines: u64,
}

/// The exposition of `snapshot`, with the reload durations.
pub(crate) fn encode(snapshot: Snapshot, reloads: &ReloadDurations) -> String {
    let mut registry = Registry::default();
    registry.register(
        "cluster_reload_duration_seconds",
        "How long rolling reloads took, from the request to the last slot",
        reloads.histogram.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut text = String::new();
    // Writing to a String fails only if an encoder does, and ours do not.
    if prometheus_client::encoding::text::encode(&mut text, &registry).is_err() {
        text.clear();
        let _ = writeln!(text, "# EOF");
    }
    text
}

/// Writes one family of gauges: a series per label set.
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let help = sentence(help);
    let mut metric = encoder.encode_descriptor(name, &help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge without labels.
fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: V,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, &sentence(help), None, gauge.metric_type())?)
}

/// Writes one family of counters (`name` without `_total`, which the encoder adds).
fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result {
    let help = sentence(help);
    let mut metric = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter without labels (`name` without `_total`).
fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, &sentence(help), None, counter.metric_type())?)
}

/// `help` with a closing period, as `Registry::register` writes its help.
fn sentence(help: &str) -> String {
    format!("{help}.")
}

fn flag(on: bool) -> i64 {
    i64::from(on)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let stats = &self.stats;
        let totals = &stats.totals;
        let e = &mut encoder;
        gauges(
            e,
            "cluster_workers",
            "Live workers by state",
            STATES.map(|state| {
                let n = stats.workers.iter();
                let n = n.filter(|w| state_of(w) == state).count();
                ([("state", state)], count(n))
            }),
        )?;
        gauge(e, "cluster_slots", "Worker slots", count(stats.slots.len()))?;
        gauge(
            e,
            "cluster_failed_slots",
            "Slots given up (a crash loop or a lasting listen failure)",
            count(stats.failed_slots.len()),
        )?;
        gauge(
            e,
            "cluster_ready",
            "1 while every slot has a worker listening and no stop has begun",
            flag(stats.ready),
        )?;
        gauge(
            e,
            "cluster_stopping",
            "1 once a stop has begun (its delay included)",
            flag(stats.stopping),
        )?;
        gauge(
            e,
            "cluster_uptime_seconds",
            "Seconds since the primary started",
            stats.uptime.as_secs_f64(),
        )?;
        counter(e, "cluster_worker_starts", "Workers started", totals.starts)?;
        counters(
            e,
            "cluster_worker_exits",
            "Workers ended, by cause",
            ExitCause::ALL.map(|cause| ([("cause", cause.as_str())], totals.exits.get(cause))),
        )?;
        counters(
            e,
            "cluster_reloads",
            "Rolling reloads ended, by outcome (failed: a slot kept its old worker or a stop cut it short)",
            [
                ([("outcome", "succeeded")], totals.reloads_succeeded),
                ([("outcome", "failed")], totals.reloads_failed),
            ],
        )?;
        gauge(
            e,
            "cluster_reload_in_progress",
            "1 while a rolling reload runs",
            flag(stats.reload.is_some()),
        )?;
        counter(
            e,
            "cluster_handed_connections",
            "Connections handed to workers by round-robin",
            totals.handed,
        )?;
        gauge(
            e,
            "cluster_queued_connections",
            "Round-robin connections the primary holds for lack of a worker (the hand-off queue)",
            count(stats.queued),
        )?;
        counter(
            e,
            "cluster_accept_pauses",
            "Times a round-robin socket stopped accepting (its queue full, or no descriptors left)",
            totals.accept_pauses,
        )?;
        counter(
            e,
            "cluster_dropped_events",
            "Events dropped because the application did not read them",
            totals.dropped_events,
        )?;
        counter(
            e,
            "cluster_dropped_output_lines",
            "Output lines dropped because a stream was not read",
            self.dropped_output_lines,
        )?;
        // One series per slot, from the slot's current worker (during a reload step, the
        // worker the slot counts as its own).
        let current = || {
            stats.slots.iter().filter_map(|slot| {
                let worker = stats.workers.iter().find(|w| Some(w.id) == slot.worker)?;
                Some((slot.slot.to_string(), worker))
            })
        };
        gauges(
            e,
            "cluster_worker_resident_memory_bytes",
            "Resident set size of each slot's current worker",
            current().filter_map(|(slot, w)| {
                let usage = w.usage?;
                Some(([("slot", slot)], usage.rss_bytes))
            }),
        )?;
        counters(
            e,
            "cluster_worker_cpu_seconds",
            "CPU time (user and system) of each slot's current worker; it starts again from 0 \
             with a new worker",
            current().filter_map(|(slot, w)| {
                let usage = w.usage?;
                Some(([("slot", slot)], usage.cpu_time.as_secs_f64()))
            }),
        )?;
        gauges(
            e,
            "cluster_worker_uptime_seconds",
            "Seconds since each slot's current worker started",
            current().map(|(slot, w)| ([("slot", slot)], w.uptime.as_secs_f64())),
        )?;
        gauges(
            e,
            "cluster_worker_restarts",
            "How many times each slot started a worker after its first",
            (stats.slots.iter()).map(|s| ([("slot", s.slot.to_string())], i64::from(s.restarts))),
        )?;
        gauges(
            e,
            "cluster_build_info",
            "The cluster crate's version and the policy, always 1",
            [(
                [
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("policy", stats.policy.as_str()),
                ],
                1i64,
            )],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primary::metrics::sample_stats;

    /// The exposition of the sample snapshot, with `dropped_output_lines` 11.
    fn exposition(reloads: &mut ReloadDurations) -> String {
        let stats = sample_stats();
        reloads.see(&stats);
        let snapshot = Snapshot {
            stats,
            dropped_output_lines: 11,
        };
        encode(snapshot, reloads)
    }

    /// The value of the sample line `series` (name and labels, as written).
    #[track_caller]
    fn check(text: &str, series: &str, value: &str) {
        let found: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .collect();
        assert_eq!(found, [value], "{series} in:\n{text}");
    }

    #[test]
    fn every_series_has_its_labels_and_value() {
        let text = exposition(&mut ReloadDurations::default());
        check(&text, r#"cluster_workers{state="starting"}"#, "1");
        check(&text, r#"cluster_workers{state="online"}"#, "0");
        check(&text, r#"cluster_workers{state="listening"}"#, "1");
        check(&text, r#"cluster_workers{state="draining"}"#, "1");
        check(&text, "cluster_slots", "3");
        check(&text, "cluster_failed_slots", "1");
        check(&text, "cluster_ready", "0");
        check(&text, "cluster_stopping", "0");
        check(&text, "cluster_uptime_seconds", "3725.0");
        check(&text, "cluster_worker_starts_total", "5");
        check(&text, r#"cluster_worker_exits_total{cause="crash"}"#, "1");
        check(&text, r#"cluster_worker_exits_total{cause="signal"}"#, "2");
        check(&text, r#"cluster_worker_exits_total{cause="asked"}"#, "0");
        check(
            &text,
            r#"cluster_worker_exits_total{cause="disconnect"}"#,
            "0",
        );
        check(
            &text,
            r#"cluster_worker_exits_total{cause="memory limit"}"#,
            "0",
        );
        check(&text, r#"cluster_reloads_total{outcome="succeeded"}"#, "2");
        check(&text, r#"cluster_reloads_total{outcome="failed"}"#, "1");
        check(&text, "cluster_reload_in_progress", "0");
        check(&text, "cluster_handed_connections_total", "1234");
        check(&text, "cluster_queued_connections", "6");
        check(&text, "cluster_accept_pauses_total", "3");
        check(&text, "cluster_dropped_events_total", "4");
        check(&text, "cluster_dropped_output_lines_total", "11");
        check(
            &text,
            r#"cluster_build_info{version="0.1.0",policy="rr"}"#,
            "1",
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn per_worker_series_are_by_slot_from_its_current_worker() {
        let text = exposition(&mut ReloadDurations::default());
        // Slot 1's current worker is 4 (the new one), not 3, which drains.
        check(
            &text,
            r#"cluster_worker_resident_memory_bytes{slot="0"}"#,
            "1000000",
        );
        check(
            &text,
            r#"cluster_worker_resident_memory_bytes{slot="1"}"#,
            "4000000",
        );
        check(
            &text,
            r#"cluster_worker_cpu_seconds_total{slot="1"}"#,
            "1.5",
        );
        check(&text, r#"cluster_worker_uptime_seconds{slot="0"}"#, "90.0");
        check(&text, r#"cluster_worker_restarts{slot="1"}"#, "2");
        check(&text, r#"cluster_worker_restarts{slot="2"}"#, "9");
        // Slot 2 has no worker: no usage series, and never a pid as a label.
        assert!(!text.contains(r#"memory_bytes{slot="2"}"#), "{text}");
        assert!(!text.contains("pid"), "{text}");
    }

    #[test]
    fn a_reload_is_observed_once_however_often_it_is_seen() {
        let mut reloads = ReloadDurations::default();
        exposition(&mut reloads);
        let text = exposition(&mut reloads);
        check(&text, "cluster_reload_duration_seconds_count", "1");
        check(&text, "cluster_reload_duration_seconds_sum", "3.2");
        check(
            &text,
            r#"cluster_reload_duration_seconds_bucket{le="2.5"}"#,
            "0",
        );
        check(
            &text,
            r#"cluster_reload_duration_seconds_bucket{le="5.0"}"#,
            "1",
        );
        check(
            &text,
            r#"cluster_reload_duration_seconds_bucket{le="+Inf"}"#,
            "1",
        );
        // One more reload ended: observed once more.
        let mut stats = sample_stats();
        stats.totals.reloads_failed += 1;
        reloads.see(&stats);
        reloads.see(&stats);
        let text = encode(
            Snapshot {
                stats,
                dropped_output_lines: 0,
            },
            &reloads,
        );
        check(&text, "cluster_reload_duration_seconds_count", "2");
    }

    #[test]
    fn every_family_has_help_and_a_type() {
        let text = exposition(&mut ReloadDurations::default());
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!((types, helps), (21, 21), "{text}");
    }
}
