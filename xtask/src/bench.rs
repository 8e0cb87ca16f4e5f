//! `cargo xtask bench`: side-by-side benchmarks of this workspace against Node 20, nginx
//! and `std`, rounds interleaved (A B A B ...) so that a busy machine affects every side
//! alike, reported as medians and ratios in `<target>/bench/report.{md,json,svg}`.
//!
//! ```text
//! workload               subject                       peers
//! http_keepalive         httpd-demo rr|shared|reuseport Node cluster rr|none, nginx
//!                        `cluster` command rr|shared|
//!                        reuseport
//!                        (Node workers)
//! http_new_connection    same, Connection: close        same
//! http_cpu_*             workers' CPU per request (/proc) same
//! latency_*, fairness_*  same, open-loop client at 50%  same
//!                        and 80% of the slowest peer's
//!                        peak: p50/p99/p99.9/max, share
//!                        of requests per worker
//! ipc_echo_16b|64k       ipc channel                   Node fork() IPC, raw socketpair
//! spawn_true, exec_100mb child                         std, Node
//! fork_to_listening      httpd-demo start              Node cluster start
//! respawn_to_listening   SIGKILL of a worker           same in a Node cluster
//! worker_rss             one httpd-demo worker (rr)    one Node cluster worker
//! ```
//!
//! A peer that is not installed (node, nginx, wrk) is reported as such with the command
//! that installs it; it never fails the run.

#![allow(clippy::print_stdout)]

mod cluster;
mod cpu;
mod http;
mod ipc_child;
mod latency;
mod machine;
mod openloop;
mod process;
mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BenchOptions {
    /// Fewer and shorter rounds (well under 5 minutes).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Run only these workload groups (http, latency, ipc, child, cluster); all by default.
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<Group>,
}

/// A group of workloads that run together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Group {
    /// http_keepalive, http_new_connection, worker_rss, http_cpu_*.
    Http,
    /// latency_* and fairness_*: the open-loop client at fixed rates.
    Latency,
    /// ipc_echo_16b, ipc_echo_64k.
    Ipc,
    /// spawn_true, exec_100mb.
    Child,
    /// fork_to_listening, respawn_to_listening.
    Cluster,
}

/// Which direction is better for a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Better {
    Higher,
    Lower,
}

/// The values one side measured, one per round.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) values: Vec<f64>,
}

impl Series {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            values: Vec::new(),
        }
    }

    pub(crate) fn median(&self) -> f64 {
        testkit::median(&self.values)
    }

    pub(crate) fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub(crate) fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// A peer: measured, or why not.
#[derive(Debug, Clone)]
pub(crate) enum Peer {
    Measured(Series),
    Missing { name: String, reason: String },
}

impl Peer {
    pub(crate) fn name(&self) -> &str {
        match self {
            Peer::Measured(s) => &s.name,
            Peer::Missing { name, .. } => name,
        }
    }
}

/// One benchmark: its subjects and peers, all in one unit.
#[derive(Debug, Clone)]
pub(crate) struct Workload {
    pub(crate) key: &'static str,
    pub(crate) title: String,
    pub(crate) unit: &'static str,
    pub(crate) better: Better,
    pub(crate) subjects: Vec<Series>,
    pub(crate) peers: Vec<Peer>,
    /// Remarks printed under the table.
    pub(crate) notes: Vec<String>,
}

/// A tool the benchmarks drive, and the hint to install it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tool {
    pub(crate) name: &'static str,
    pub(crate) installed: bool,
    pub(crate) hint: &'static str,
}

impl Tool {
    fn probe(name: &'static str, version_arg: &str, hint: &'static str) -> Self {
        let installed = Command::new(name)
            .arg(version_arg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        Self {
            name,
            installed,
            hint,
        }
    }

    /// The reason a peer needing this tool was skipped.
    pub(crate) fn missing(&self) -> String {
        format!("{} not installed ({})", self.name, self.hint)
    }
}

/// What every benchmark group needs to know.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) quick: bool,
    pub(crate) root: PathBuf,
    pub(crate) out_dir: PathBuf,
    pub(crate) node: Tool,
    pub(crate) wrk: Tool,
    pub(crate) nginx: Tool,
}

impl Ctx {
    pub(crate) fn peers_dir(&self) -> PathBuf {
        self.root.join("xtask/peers")
    }
}

/// Runs the benchmarks and writes the reports.
pub(crate) fn run(options: BenchOptions) -> Result<()> {
    let started = Instant::now();
    let root = crate::workspace_root();
    let target = target_dir(&root);
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let ctx = Ctx {
        quick: options.quick,
        root,
        out_dir,
        node: Tool::probe("node", "--version", testkit::NODE_INSTALL_HINT),
        wrk: Tool::probe("wrk", "--version", "apt-get install wrk"),
        nginx: Tool::probe("nginx", "-v", "apt-get install nginx-light"),
    };
    for tool in [ctx.node, ctx.wrk, ctx.nginx] {
        if !tool.installed {
            println!("note: {}; its rows are skipped", tool.missing());
        }
    }
    let wanted = |g: Group| options.only.is_empty() || options.only.contains(&g);
    println!("== building release binaries");
    let demo = build_release(&ctx.root, "httpd-demo")?;
    let command = build_release(&ctx.root, "cluster")?;

    let mut workloads = Vec::new();
    let latency_report = std::cell::RefCell::new(latency::LatencyReport::default());
    let mut group = |title: &str, run: &dyn Fn() -> Result<Vec<Workload>>| -> Result<()> {
        println!("== {title}");
        let done = run()?;
        for w in &done {
            println!("  {}", medians(w));
        }
        workloads.extend(done);
        Ok(())
    };
    if wanted(Group::Http) {
        group("http (wrk -t2 -c64, 2 workers each)", &|| {
            http::run(&ctx, &demo, &command)
        })?;
    }
    if wanted(Group::Latency) {
        group(
            "latency (open loop at 50% and 80% of the slowest peer's peak)",
            &|| {
                let (done, report) = latency::run(&ctx, &demo, &command)?;
                *latency_report.borrow_mut() = report;
                Ok(done)
            },
        )?;
    }
    if wanted(Group::Ipc) {
        group("ipc echo (cargo bench -p ipc --bench echo)", &|| {
            ipc_child::run_ipc(&ctx)
        })?;
    }
    if wanted(Group::Child) {
        group(
            "spawn and exec (cargo bench -p child --bench vs_node)",
            &|| ipc_child::run_child(&ctx),
        )?;
    }
    if wanted(Group::Cluster) {
        group("fork to listening and respawn", &|| {
            cluster::run(&ctx, &demo, &command)
        })?;
    }
    let machine = machine::Machine::probe(&ctx);
    let written = report::write(
        &ctx.out_dir,
        &machine,
        &workloads,
        &latency_report.into_inner(),
    )?;
    println!("{}", report::summary(&workloads));
    for path in written {
        println!("wrote {}", path.display());
    }
    println!("bench finished in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `key (unit): name median, ...` for the terminal.
fn medians(w: &Workload) -> String {
    let sides = w
        .subjects
        .iter()
        .map(|s| format!("{} {:.1}", s.name, s.median()))
        .chain(w.peers.iter().map(|p| match p {
            Peer::Measured(s) => format!("{} {:.1}", s.name, s.median()),
            Peer::Missing { name, reason } => format!("{name}: {reason}"),
        }))
        .collect::<Vec<_>>()
        .join(", ");
    let skipped = w.notes.iter().find(|n| n.starts_with("skipped"));
    format!(
        "{} ({}): {}",
        w.key,
        w.unit,
        skipped.map_or(sides, String::clone)
    )
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo build --release -p <package>`, as `cargo xtask demo` does; returns the binary.
fn build_release(root: &Path, package: &str) -> Result<PathBuf> {
    let status = cargo(root)
        .args(["build", "--release", "--quiet", "-p", package])
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build of {package} failed");
    Ok(target_dir(root).join("release").join(package))
}

/// A `cargo` command in the workspace root (the cargo that runs xtask, if known).
pub(crate) fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(root);
    command
}
