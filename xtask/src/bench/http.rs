//! HTTP workloads: wrk (`-t2 -c64`, loopback) against httpd-demo with each policy, a Node
//! 20 cluster (round-robin and `SCHED_NONE`), the same Node workers under this workspace's
//! `cluster` command (rr, shared and reuseport) and nginx (2 workers, `reuseport`), all
//! with 2 workers; keep-alive and `Connection: close`. Around every wrk run, the CPU time
//! of the server's workers and of its primary is read from `/proc` and divided by the
//! requests wrk completed (`http_cpu_*`). Afterwards, the RSS of their workers.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cpu::{self, Ticks};
use super::process::{Lines, Proc, children_of, piped, rss_mb};
use super::{Better, Ctx, Peer, Series, Workload};

const WORKERS: usize = 2;
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The servers, in the order each round visits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Demo(&'static str),
    /// `node_cluster_http.js`'s worker half under the `cluster` command.
    Command(&'static str),
    Node(&'static str),
    Nginx,
}

pub(super) const KINDS: [Kind; 9] = [
    Kind::Demo("rr"),
    Kind::Demo("shared"),
    Kind::Demo("reuseport"),
    Kind::Command("rr"),
    Kind::Command("shared"),
    Kind::Command("reuseport"),
    Kind::Node("rr"),
    Kind::Node("none"),
    Kind::Nginx,
];

impl Kind {
    pub(super) fn label(self) -> String {
        match self {
            Kind::Demo(policy) => format!("httpd-demo {policy}"),
            Kind::Command(policy) => format!("cluster command {policy} (Node workers)"),
            Kind::Node(policy) => format!("Node cluster {policy}"),
            Kind::Nginx => "nginx reuseport".to_owned(),
        }
    }

    pub(super) fn is_subject(self) -> bool {
        matches!(self, Kind::Demo(_) | Kind::Command(_))
    }
}

/// A server kind that was not started, and why.
pub(super) type Missing = (Kind, String);

/// A running server with 2 workers.
pub(super) struct Server {
    pub(super) kind: Kind,
    pub(super) addr: String,
    pub(super) proc: Proc,
    _lines: Option<Lines>,
}

impl Server {
    pub(super) fn start(ctx: &Ctx, demo: &Path, command_path: &Path, kind: Kind) -> Result<Self> {
        match kind {
            Kind::Demo(policy) => {
                let mut command = piped(demo);
                command
                    .args(["--workers", &WORKERS.to_string(), "--port", "0"])
                    .args(["--policy", policy, "--grace", "1"])
                    .env("RUST_LOG", "info");
                Self::start_announcing(kind, command)
            }
            Kind::Command(policy) => {
                let mut command = piped(command_path);
                command
                    .args(["--workers", &WORKERS.to_string(), "--policy", policy])
                    .args(["--grace", "1", "--"])
                    .arg(ctx.peers_dir().join("node_cluster_http.js"))
                    .arg("0");
                Self::start_announcing(kind, command)
            }
            Kind::Node(policy) => {
                let mut command = piped("node");
                command
                    .arg(ctx.peers_dir().join("node_cluster_http.js"))
                    .args(["0", &WORKERS.to_string()])
                    .env("NODE_CLUSTER_SCHED_POLICY", policy);
                Self::start_announcing(kind, command)
            }
            Kind::Nginx => start_nginx(ctx),
        }
    }

    /// Starts a server that prints `listening on http://ADDR` and one `worker listening`
    /// line per worker; returns once every worker listens.
    fn start_announcing(kind: Kind, mut command: std::process::Command) -> Result<Self> {
        let mut proc = Proc::spawn(&kind.label(), &mut command)?;
        let mut lines = Lines::capture(&mut proc);
        let (addr, _) = wait_listening(&mut lines, WORKERS)?;
        Ok(Self {
            kind,
            addr,
            proc,
            _lines: Some(lines),
        })
    }

    pub(super) fn workers(&self) -> Vec<u32> {
        children_of(self.proc.pid())
    }

    /// Starts every kind whose tools are installed; the others with why not.
    pub(super) fn start_all(
        ctx: &Ctx,
        demo: &Path,
        command: &Path,
    ) -> Result<(Vec<Server>, Vec<Missing>)> {
        let mut servers = Vec::new();
        let mut missing = Vec::new();
        for kind in KINDS {
            let absent = match kind {
                Kind::Node(_) | Kind::Command(_) if !ctx.node.installed => Some(ctx.node.missing()),
                Kind::Nginx if !ctx.nginx.installed => Some(ctx.nginx.missing()),
                _ => None,
            };
            if let Some(reason) = absent {
                missing.push((kind, reason));
                continue;
            }
            let server = Server::start(ctx, demo, command, kind)?;
            println!("  {} listening on {}", kind.label(), server.addr);
            servers.push(server);
        }
        Ok((servers, missing))
    }
}

/// Waits for `listening on http://ADDR` (the `cluster` command: `listening on ADDR`) and
/// `workers` lines with `worker listening` (`worker N is listening on`), in whatever
/// order they come; returns the address and when the first line came.
pub(super) fn wait_listening(lines: &mut Lines, workers: usize) -> Result<(String, Instant)> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut addr = None;
    let mut listening = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, line) = lines.wait_for("listening", left)?;
        if let Some(rest) = line.split("listening on http://").nth(1) {
            addr = Some((rest.trim().to_owned(), at));
        } else if line.contains("worker listening") || line.contains(" is listening on ") {
            listening += 1;
        } else if let Some(rest) = line.strip_prefix("listening on ") {
            addr = Some((rest.trim().to_owned(), at));
        }
        if let Some(found) = &addr
            && listening >= workers
        {
            return Ok(found.clone());
        }
    }
}

fn start_nginx(ctx: &Ctx) -> Result<Server> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let prefix = ctx.out_dir.join("nginx");
    for dir in ["", "temp"] {
        std::fs::create_dir_all(prefix.join(dir))?;
    }
    let template = std::fs::read_to_string(ctx.peers_dir().join("nginx.conf"))
        .context("reading xtask/peers/nginx.conf")?;
    let conf = template
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@PORT@", &port.to_string())
        .replace("@WORKERS@", &WORKERS.to_string());
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut command = piped("nginx");
    command
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(prefix.join("error.log"));
    let mut proc = Proc::spawn("nginx", &mut command)?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = proc.try_wait()? {
            let log = std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
            bail!("nginx exited at start ({status}):\n{log}");
        }
        if TcpStream::connect(&addr).is_ok() && children_of(proc.pid()).len() >= WORKERS {
            break;
        }
        if Instant::now() > deadline {
            bail!("nginx did not listen on {addr} within {START_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Server {
        kind: Kind::Nginx,
        addr,
        proc,
        _lines: None,
    })
}

/// What one wrk run of `seconds` (whole seconds: wrk takes no fractions) gave.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct WrkRun {
    pub(super) requests_per_sec: f64,
    pub(super) requests: u64,
    errors: u64,
}

pub(super) fn wrk(addr: &str, seconds: u64, close: bool) -> Result<WrkRun> {
    let mut command = piped("wrk");
    command.args(["-t2", "-c64", &format!("-d{seconds}s")]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://{addr}/"));
    let proc = Proc::spawn("wrk", &mut command)?;
    let (ok, out, err) = proc.output(Duration::from_secs(seconds + 30))?;
    if !ok {
        bail!("wrk failed: {out}{err}");
    }
    parse_wrk(&out)
}

fn parse_wrk(out: &str) -> Result<WrkRun> {
    let mut run = WrkRun::default();
    let number = |s: &str| s.trim().trim_end_matches(',').parse::<f64>().ok();
    let mut found = false;
    for line in out.lines().map(str::trim) {
        if let Some((count, _)) = line.split_once(" requests in ") {
            run.requests = count.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Requests/sec:").and_then(number) {
            run.requests_per_sec = v;
            found = true;
        } else if let Some(v) = line
            .strip_prefix("Non-2xx or 3xx responses:")
            .and_then(number)
        {
            run.errors += v as u64;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            run.errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1).and_then(number))
                .sum::<f64>() as u64;
        }
    }
    if !found {
        bail!("no Requests/sec in wrk output:\n{out}");
    }
    Ok(run)
}

/// Runs the HTTP workloads; returns http_keepalive, http_new_connection and worker_rss.
pub(super) fn run(ctx: &Ctx, demo: &Path, command: &Path) -> Result<Vec<Workload>> {
    let workload = |key, title: &str, unit, better| Workload {
        key,
        title: title.to_owned(),
        unit,
        better,
        subjects: Vec::new(),
        peers: Vec::new(),
        notes: Vec::new(),
    };
    let mut keepalive = workload(
        "http_keepalive",
        "HTTP hello world, keep-alive (wrk -t2 -c64, 2 workers)",
        "req/s",
        Better::Higher,
    );
    let mut close = workload(
        "http_new_connection",
        "HTTP hello world, new connection per request (wrk -H 'Connection: close')",
        "req/s",
        Better::Higher,
    );
    let mut rss = workload(
        "worker_rss",
        "RSS of one worker after the HTTP load (VmRSS; each worker is one value)",
        "MB",
        Better::Lower,
    );
    if !ctx.wrk.installed {
        for w in [&mut keepalive, &mut close, &mut rss] {
            w.notes.push(format!("skipped: {}", ctx.wrk.missing()));
        }
        return Ok(vec![keepalive, close, rss]);
    }
    let (rounds, seconds, warmup) = if ctx.quick { (3, 2, 1) } else { (5, 5, 2) };

    let (servers, missing) = Server::start_all(ctx, demo, command)?;
    for server in &servers {
        for close in [false, true] {
            wrk(&server.addr, warmup, close)?;
        }
    }
    let mut ka: Vec<Series> = servers
        .iter()
        .map(|s| Series::new(s.kind.label()))
        .collect();
    let mut nc = ka.clone();
    // CPU per request: [keep-alive, close] x server, one value per round.
    let mut cpu_rounds: Vec<[CpuRounds; 2]> = vec![Default::default(); servers.len()];
    let mut errors = vec![[0u64; 2]; servers.len()];
    for round in 1..=rounds {
        for (which, series) in [(false, &mut ka), (true, &mut nc)] {
            for (i, server) in servers.iter().enumerate() {
                let workers = server.workers();
                let primary = server.proc.pid();
                let before = (cpu::read_all(&workers)?, cpu::read(primary)?);
                let run = wrk(&server.addr, seconds, which)?;
                let after = (cpu::read_all(&workers)?, cpu::read(primary)?);
                series[i].values.push(run.requests_per_sec);
                errors[i][usize::from(which)] += run.errors;
                cpu_rounds[i][usize::from(which)].push(
                    after.0 - before.0,
                    after.1 - before.1,
                    run.requests,
                );
            }
        }
        println!(
            "  round {round}/{rounds}: {}",
            ka.iter()
                .zip(&nc)
                .map(|(k, n)| format!(
                    "{} {:.0}/{:.0}",
                    k.name,
                    k.values.last().unwrap_or(&0.0),
                    n.values.last().unwrap_or(&0.0)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut rss_series = Vec::new();
    for server in &servers {
        let mut series = Series::new(format!("{} worker", server.kind.label()));
        for pid in server.workers() {
            series.values.push(rss_mb(pid)?);
        }
        rss_series.push(series);
    }
    for (i, server) in servers.iter().enumerate() {
        for (w, e) in [(&mut keepalive, errors[i][0]), (&mut close, errors[i][1])] {
            if e > 0 {
                w.notes.push(format!(
                    "{}: wrk counted {e} socket errors or non-2xx responses",
                    server.kind.label()
                ));
            }
        }
    }
    let kinds: Vec<Kind> = servers.iter().map(|s| s.kind).collect();
    for server in servers {
        server.proc.stop(Duration::from_secs(3));
    }
    let mut cpu_ka = workload(
        "http_cpu_keepalive",
        "CPU time of the workers per keep-alive request (user + system, /proc, during the \
         keep-alive rounds)",
        "us/req",
        Better::Lower,
    );
    let mut cpu_nc = workload(
        "http_cpu_new_connection",
        "CPU time of the workers per new-connection request (user + system, /proc, during \
         the Connection: close rounds)",
        "us/req",
        Better::Lower,
    );
    let mut cpu_series = [Vec::new(), Vec::new()];
    for (kind, rounds) in kinds.iter().zip(&cpu_rounds) {
        for (which, w) in [(0, &mut cpu_ka), (1, &mut cpu_nc)] {
            let r = &rounds[which];
            cpu_series[which].push(Series {
                name: kind.label(),
                values: r.workers_total(),
            });
            w.notes.push(format!(
                "{}: workers user {:.2} + system {:.2} us/req; primary {:.2} us/req",
                kind.label(),
                testkit::median(&r.user),
                testkit::median(&r.system),
                testkit::median(&r.primary),
            ));
        }
    }
    let [cpu_ka_series, cpu_nc_series] = cpu_series;
    for (w, series) in [
        (&mut keepalive, ka),
        (&mut close, nc),
        (&mut rss, rss_series),
        (&mut cpu_ka, cpu_ka_series),
        (&mut cpu_nc, cpu_nc_series),
    ] {
        for (kind, s) in kinds.iter().zip(series) {
            if kind.is_subject() {
                w.subjects.push(s);
            } else {
                w.peers.push(Peer::Measured(s));
            }
        }
        for (kind, reason) in &missing {
            let suffix = if w.key == "worker_rss" { " worker" } else { "" };
            w.peers.push(Peer::Missing {
                name: format!("{}{suffix}", kind.label()),
                reason: reason.clone(),
            });
        }
    }
    rss.notes.push(format!(
        "measured after {rounds} rounds of keep-alive and new-connection load"
    ));
    Ok(vec![keepalive, close, rss, cpu_ka, cpu_nc])
}

/// One server's CPU per request in one kind of run, one value per round (us/req).
#[derive(Debug, Clone, Default)]
struct CpuRounds {
    user: Vec<f64>,
    system: Vec<f64>,
    primary: Vec<f64>,
}

impl CpuRounds {
    fn push(&mut self, workers: Ticks, primary: Ticks, requests: u64) {
        let (user, system) = cpu::per_request_us(workers, requests, cpu::TICKS_PER_SECOND);
        let (pu, ps) = cpu::per_request_us(primary, requests, cpu::TICKS_PER_SECOND);
        self.user.push(user);
        self.system.push(system);
        self.primary.push(pu + ps);
    }

    fn workers_total(&self) -> Vec<f64> {
        self.user
            .iter()
            .zip(&self.system)
            .map(|(u, s)| u + s)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://127.0.0.1:1/\n  2 threads and 64 connections\n\
                   3000 requests in 2.00s, 1.00MB read\n  Socket errors: connect 0, read 3, \
                   write 0, timeout 1\n  Non-2xx or 3xx responses: 2\nRequests/sec:  \
                   36012.50\nTransfer/sec:      3.00MB\n";
        let run = parse_wrk(out).unwrap();
        assert_eq!(run.requests_per_sec, 36012.5);
        assert_eq!(run.errors, 6);
        assert_eq!(run.requests, 3000);
        assert!(parse_wrk("nothing").is_err());
    }
}
