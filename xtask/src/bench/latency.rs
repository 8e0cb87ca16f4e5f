//! Latency at a fixed offered load, and fairness: the open-loop client
//! ([`super::openloop`]) against every HTTP server of the `http` group (fresh instances),
//! keep-alive and new connection per request, at two rates per workload: [`LOADS`] of
//! the peak of the slowest peer (Node cluster rr/none, nginx), measured with wrk in the
//! same run just before. Each run gives p50, p99, p99.9 and max from the scheduled send
//! times, and the share of requests each worker answered (`x-worker-pid`), as max/min.
//!
//! The workloads it returns hold the p99 at each load (`latency_*`) and the fairness at
//! the higher load (`fairness_*`), one value per side; every percentile is in
//! [`LatencyRow`]s for the report's latency table and chart.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use super::http::{Kind, Server, wrk};
use super::openloop::{self, OpenLoop};
use super::{Better, Ctx, Peer, Series, Workload};

/// Fractions of the slowest peer's peak.
pub(crate) const LOADS: [f64; 2] = [0.5, 0.8];

/// Client threads (connections and requests outstanding at most): enough that the client
/// is never what limits the rate (at 64k req/s and 0.7 ms a round trip, 45 are busy).
const CONNECTIONS: usize = 128;

/// One paced run of one server.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyRow {
    pub(crate) workload: &'static str,
    pub(crate) server: String,
    pub(crate) subject: bool,
    /// Fraction of the slowest peer's peak.
    pub(crate) load: f64,
    /// Offered requests per second.
    pub(crate) rate: f64,
    /// Answered requests per second.
    pub(crate) achieved: f64,
    pub(crate) p50_us: u64,
    pub(crate) p99_us: u64,
    pub(crate) p999_us: u64,
    pub(crate) max_us: u64,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) unsent: u64,
    /// max/min of the requests each worker answered.
    pub(crate) fairness: Option<f64>,
    /// Requests per worker, most first.
    pub(crate) shares: Vec<u64>,
}

/// What the latency group measured, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct LatencyReport {
    /// Per workload, the slowest peer and its peaks.
    pub(crate) peaks: Vec<Peak>,
    pub(crate) rows: Vec<LatencyRow>,
}

/// The peak the rates of a workload are fractions of.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Peak {
    pub(crate) workload: &'static str,
    /// The slowest peer (under this client).
    pub(crate) server: String,
    /// Its answered requests per second under the open-loop client, offered
    /// [`OVERLOAD`] times its wrk peak: the rates' reference.
    pub(crate) open_loop: f64,
    /// Its wrk peak (a lighter client, for comparison).
    pub(crate) wrk: f64,
}

/// How far past its wrk peak a server is offered load to find its peak under this
/// client.
pub(crate) const OVERLOAD: f64 = 1.5;

/// One workload of the group and the keys of the workloads it gives.
struct Spec {
    name: &'static str,
    /// A new connection per request (`Connection: close`).
    close: bool,
    /// The p99 workload at each of [`LOADS`].
    p99_keys: [&'static str; 2],
    /// The fairness workload (at the last load).
    fairness_key: &'static str,
}

const WORKLOADS: [Spec; 2] = [
    Spec {
        name: "keepalive",
        close: false,
        p99_keys: ["latency_keepalive_p99_50", "latency_keepalive_p99_80"],
        fairness_key: "fairness_keepalive",
    },
    Spec {
        name: "new_connection",
        close: true,
        p99_keys: [
            "latency_new_connection_p99_50",
            "latency_new_connection_p99_80",
        ],
        fairness_key: "fairness_new_connection",
    },
];

/// Runs the group: workloads for the goal table and the rows for the latency table.
pub(super) fn run(
    ctx: &Ctx,
    demo: &Path,
    command: &Path,
) -> Result<(Vec<Workload>, LatencyReport)> {
    let mut report = LatencyReport::default();
    if !ctx.wrk.installed {
        let w = Workload {
            key: "latency_keepalive_p99_80",
            title: "latency".to_owned(),
            unit: "us",
            better: Better::Lower,
            subjects: Vec::new(),
            peers: Vec::new(),
            notes: vec![format!(
                "skipped: {} (the peak is measured with wrk)",
                ctx.wrk.missing()
            )],
        };
        return Ok((vec![w], report));
    }
    let seconds = if ctx.quick { 2.0 } else { 5.0 };
    let (servers, missing) = Server::start_all(ctx, demo, command)?;
    for server in &servers {
        wrk(&server.addr, 1, false)?;
    }
    let have_peers = servers.iter().any(|s| !s.kind.is_subject());
    let mut workloads = Vec::new();
    for spec in &WORKLOADS {
        let (key, close) = (spec.name, spec.close);
        // Every server gets the same wrk run, so that all come to the paced load equally
        // warm: a Node worker's JIT still tiers up in its first seconds under load, and
        // when only the peers ran here, the `cluster` command's Node workers (the same
        // program) showed a p99 4 times Node's at 50% keep-alive load.
        //
        // The rates are fractions of the slowest peer's peak under this client (without
        // peers, the slowest server's), found by offering each more than its wrk peak:
        // the client shares the machine's 2 cores with the server and takes far more CPU
        // than wrk, so 80% of a wrk peak was past what any Node setup could answer, and
        // its p99 measured how far past, not the latency at 80% load.
        let mut slowest: Option<Peak> = None;
        for server in &servers {
            let wrk_peak = wrk(&server.addr, 2, close)?.requests_per_sec;
            if have_peers && server.kind.is_subject() {
                continue; // only the peers set the reference
            }
            let overload = openloop::run(OpenLoop {
                addr: server.addr.parse().context("server address")?,
                rate: wrk_peak * OVERLOAD,
                duration: Duration::from_secs_f64(seconds),
                connections: CONNECTIONS,
                close,
            });
            let peak = Peak {
                workload: key,
                server: server.kind.label(),
                open_loop: overload.achieved_rate(),
                wrk: wrk_peak,
            };
            if slowest
                .as_ref()
                .is_none_or(|p| peak.open_loop < p.open_loop)
            {
                slowest = Some(peak);
            }
        }
        let peak_of = slowest.context("no server to measure a peak on")?;
        let (slowest, peak) = (peak_of.server.clone(), peak_of.open_loop);
        println!(
            "  {key}: slowest peer {slowest} peaks at {peak:.0} req/s under this client \
             (wrk: {:.0})",
            peak_of.wrk
        );
        report.peaks.push(peak_of);
        for (pass, load) in LOADS.into_iter().enumerate() {
            let rate = peak * load;
            // Alternate the order between passes, so no side always runs first.
            let order: Vec<&Server> = if pass % 2 == 0 {
                servers.iter().collect()
            } else {
                servers.iter().rev().collect()
            };
            let mut rows = Vec::new();
            for server in order {
                let addr: SocketAddr = server.addr.parse().context("server address")?;
                let result = openloop::run(OpenLoop {
                    addr,
                    rate,
                    duration: Duration::from_secs_f64(seconds),
                    connections: CONNECTIONS,
                    close,
                });
                let workers = server.workers();
                let mut shares: Vec<u64> = workers
                    .iter()
                    .map(|pid| result.by_worker.get(pid).copied().unwrap_or(0))
                    .collect();
                shares.sort_unstable_by(|a, b| b.cmp(a));
                let row = LatencyRow {
                    workload: key,
                    server: server.kind.label(),
                    subject: server.kind.is_subject(),
                    load,
                    rate,
                    achieved: result.achieved_rate(),
                    p50_us: result.percentile_us(0.5).unwrap_or(0),
                    p99_us: result.percentile_us(0.99).unwrap_or(0),
                    p999_us: result.percentile_us(0.999).unwrap_or(0),
                    max_us: result.percentile_us(1.0).unwrap_or(0),
                    requests: result.latencies_us.len() as u64,
                    errors: result.errors,
                    unsent: result.unsent,
                    fairness: openloop::fairness(&result.by_worker, &workers),
                    shares,
                };
                println!(
                    "  {key} {:.0}% ({rate:.0}/s) {}: p50 {} p99 {} p99.9 {} max {} us, \
                     fairness {}{}",
                    load * 100.0,
                    row.server,
                    row.p50_us,
                    row.p99_us,
                    row.p999_us,
                    row.max_us,
                    row.fairness.map_or("-".to_owned(), |f| format!("{f:.2}")),
                    if row.errors + row.unsent > 0 {
                        format!(", {} errors, {} unsent", row.errors, row.unsent)
                    } else {
                        String::new()
                    }
                );
                rows.push(row);
            }
            rows.sort_by_key(|r| servers.iter().position(|s| s.kind.label() == r.server));
            workloads.push(as_workload(
                spec.p99_keys[pass],
                format!(
                    "p99 latency, {key}, open loop at {:.0}% of {slowest}'s peak under this \
                     client ({rate:.0} req/s offered, {CONNECTIONS} connections)",
                    load * 100.0
                ),
                "us",
                &rows,
                |r| r.p99_us as f64,
                &missing,
            ));
            if pass == LOADS.len() - 1 {
                workloads.push(as_workload(
                    spec.fairness_key,
                    format!(
                        "fairness, {key}: max/min of the requests each worker answered \
                         (x-worker-pid) at {:.0}% load",
                        load * 100.0
                    ),
                    "max/min",
                    &rows,
                    |r| r.fairness.unwrap_or(f64::NAN),
                    &missing,
                ));
            }
            report.rows.extend(rows);
        }
    }
    for server in servers {
        server.proc.stop(Duration::from_secs(3));
    }
    Ok((workloads, report))
}

/// One value per side from `rows`; subjects and peers as in the http group.
fn as_workload(
    key: &'static str,
    title: String,
    unit: &'static str,
    rows: &[LatencyRow],
    value: fn(&LatencyRow) -> f64,
    missing: &[(Kind, String)],
) -> Workload {
    let mut w = Workload {
        key,
        title,
        unit,
        better: Better::Lower,
        subjects: Vec::new(),
        peers: Vec::new(),
        notes: Vec::new(),
    };
    for row in rows {
        let series = Series {
            name: row.server.clone(),
            values: vec![value(row)],
        };
        if row.subject {
            w.subjects.push(series);
        } else {
            w.peers.push(Peer::Measured(series));
        }
        if row.errors + row.unsent > 0 {
            w.notes.push(format!(
                "{}: {} errors, {} requests never sent (counted as late)",
                row.server, row.errors, row.unsent
            ));
        }
    }
    for (kind, reason) in missing {
        w.peers.push(Peer::Missing {
            name: kind.label(),
            reason: reason.clone(),
        });
    }
    w
}
