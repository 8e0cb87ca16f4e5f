//! `cargo xtask chaos`: each target (httpd-demo under rr, shared and reuseport; the
//! `cluster` command running a Node `http` app under rr and shared; 3 workers each) in
//! turn, under a paced client load, with faults drawn from a seeded schedule, then a
//! checker over everything recorded.
//!
//! ```text
//!   start target (--log-format json) -> load (4 keep-alive + 2 new-connection threads)
//!   warm-up 2 s: the primary's RSS and fds   faults (schedule.rs), overlapping, each on
//!   a thread of its own (faults.rs)          settle: every slot back, RSS and fds again
//!   stop the load, SIGTERM the primary       check (check.rs): failures explained by
//!   nothing left, port closed                kill -9, recovery < 1 s, drift, event log
//! ```
//!
//! Writes `<target>/chaos/report.json`, `<target>/chaos/timeline.svg` and each target's
//! output (`<target>/chaos/<name>.stderr.log`, `.stdout.log`); prints a progress line and
//! a table. This process is the child subreaper, so a primary started by a `SIGUSR2`
//! upgrade, orphaned when the old one exits, is ours to reap. Every process of the run is
//! killed on every path, Ctrl-C included.

#![allow(clippy::print_stdout)]

mod check;
mod client;
mod faults;
mod report;
mod schedule;
mod sys;
mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, Once, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use self::check::{Run, Usage};
use self::client::Load;
use self::faults::FaultRecord;
use self::report::Outcome;
use self::target::{Binaries, Program, Spec, Target};

/// Options of `cargo xtask chaos`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ChaosOptions {
    /// The whole run in seconds, divided among the targets (default 300; 55 with --quick).
    #[arg(long)]
    pub(crate) seconds: Option<u64>,
    /// The schedule's seed (default: drawn, and printed first; fixed with --quick).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// About a minute in all, with the fixed seed CI runs.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Which targets: httpd-demo (rr, shared, reuseport), node (the cluster command
    /// running a Node app: rr, shared) or all.
    #[arg(long, value_enum, default_value_t = Which::All)]
    pub(crate) target: Which,
}

/// `--target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Which {
    HttpdDemo,
    Node,
    All,
}

/// The seed of `--quick`: CI's schedule, which must pass every time.
const QUICK_SEED: u64 = 0x00c4_a05e_ed24;
/// Before the first fault: the primary's RSS and fds are sampled at its end.
const WARMUP: Duration = Duration::from_secs(2);
/// After the last fault's end, before the run's end.
const SETTLE: Duration = Duration::from_millis(1500);
/// The least time a target gets.
const MIN_TARGET: Duration = Duration::from_secs(8);
/// How often the run samples its processes.
const TICK: Duration = Duration::from_millis(100);
/// How long the cluster gets to be whole again (every slot listening) after the faults.
const WHOLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Every process of one target's run, with the start time `/proc` gave it when it was
/// first seen: a pid whose start time differs is another process that reused the number.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pids: Mutex<BTreeMap<u32, u64>>,
    /// Descriptor limits lowered by faults still running: each process's limits before
    /// the first of them, and how many hold it lowered. Overlapping faults on one process
    /// put back what it had before the first, when the last ends (each restoring what it
    /// found would leave the first one's low limit for good).
    pub(crate) lowered: Mutex<BTreeMap<u32, Lowered>>,
}

/// A process's descriptor limits (soft, hard) before the first fault that lowered them,
/// and how many faults hold them lowered.
pub(crate) type Lowered = ((u64, u64), usize);

impl Registry {
    fn pids_locked(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, u64>> {
        self.pids.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers `pid` if it exists.
    pub(crate) fn add(&self, pid: u32) {
        if let Some(start) = start_time(pid) {
            self.pids_locked().entry(pid).or_insert(start);
        }
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.pids_locked().keys().copied().collect()
    }

    fn is_ours(&self, pid: u32) -> bool {
        let registered = self.pids_locked().get(&pid).copied();
        registered.is_some() && start_time(pid) == registered
    }

    /// Registered, still the same process, and neither a zombie nor dead.
    pub(crate) fn is_ours_and_running(&self, pid: u32) -> bool {
        self.is_ours(pid) && testkit::is_running(pid)
    }

    /// Sends `signal` to `pid` if it is ours and running; whether it was sent.
    pub(crate) fn signal(&self, pid: u32, signal: Signal) -> bool {
        let Ok(raw) = i32::try_from(pid) else {
            return false;
        };
        self.is_ours_and_running(pid) && kill(Pid::from_raw(raw), signal).is_ok()
    }

    /// The processes of the run still running.
    pub(crate) fn running(&self) -> Vec<u32> {
        self.pids()
            .into_iter()
            .filter(|&p| self.is_ours_and_running(p))
            .collect()
    }

    /// The processes of the run that are zombies now.
    fn zombies(&self) -> Vec<u32> {
        self.pids()
            .into_iter()
            .filter(|&p| {
                self.is_ours(p) && testkit::ProcStat::read(p).is_some_and(|s| s.state == 'Z')
            })
            .collect()
    }

    /// SIGKILL to every process of the run still running.
    pub(crate) fn kill_all(&self) {
        for pid in self.running() {
            self.signal(pid, Signal::SIGKILL);
        }
    }
}

/// Field 22 of `/proc/PID/stat`, the start time in clock ticks after boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(19)?.parse().ok()
}

/// The registry of the target running now, for the Ctrl-C handler.
static CURRENT: Mutex<Option<Arc<Registry>>> = Mutex::new(None);
/// `net.ipv4.tcp_migrate_req` as it was before this run changed it.
static MIGRATE_REQ_BEFORE: Mutex<Option<String>> = Mutex::new(None);
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
static HANDLER: Once = Once::new();

fn install_handler() {
    HANDLER.call_once(|| {
        let installed = ctrlc::set_handler(|| {
            testkit::kill_all_groups();
            if let Some(registry) = CURRENT
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
            {
                registry.kill_all();
            }
            restore_migrate_req();
            std::process::exit(130);
        });
        if let Err(err) = installed {
            println!("warning: no Ctrl-C handler ({err}); an interrupt may leave processes");
        }
    });
}

/// Under reuseport, a removed worker's socket resets the connections in its queue unless
/// `net.ipv4.tcp_migrate_req=1` moves them to the group's other sockets: the setting the
/// README tells operators to use. Set for the reuseport target when this may (root) and
/// put back after; `false` if it could not be set.
fn enable_migrate_req() -> bool {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(value) if value.trim() == "1" => true,
        Ok(value) => {
            *MIGRATE_REQ_BEFORE
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(value);
            std::fs::write(MIGRATE_REQ, "1").is_ok()
        }
        Err(_) => false,
    }
}

fn restore_migrate_req() {
    if let Some(value) = MIGRATE_REQ_BEFORE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
    {
        let _ = std::fs::write(MIGRATE_REQ, value);
    }
}

/// Runs the chaos targets and checks them.
pub(crate) fn run(options: ChaosOptions) -> Result<()> {
    let seed = options.seed.unwrap_or(if options.quick {
        QUICK_SEED
    } else {
        drawn_seed()
    });
    println!(
        "== chaos seed {seed} (replay: cargo xtask chaos --seed {seed}{})",
        if options.quick { " --quick" } else { "" }
    );
    let specs = specs(options.target);
    if specs.iter().any(|s| s.program == Program::Node) && !testkit::node_available() {
        bail!(
            "node is needed for the node targets: {}",
            testkit::NODE_INSTALL_HINT
        );
    }
    let total =
        Duration::from_secs(
            options
                .seconds
                .unwrap_or(if options.quick { 55 } else { 300 }),
        );
    let per_target = (total / specs.len() as u32).max(MIN_TARGET);
    println!("== building httpd-demo and the cluster command (release)");
    let binaries = build()?;
    let out_dir = crate::bench::target_dir(&crate::workspace_root()).join("chaos");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    install_handler();
    raise_own_nofile();
    nix::sys::prctl::set_child_subreaper(true).context("becoming the child subreaper")?;

    let mut outcomes = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let target_seed = seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut kinds = spec.kinds();
        if spec.program == Program::Node && spec.policy == "shared" {
            // libuv's answer to EMFILE on a listening socket is to accept and close every
            // connection waiting in its queue; on a shared socket those are connections
            // the other workers would have served. Nothing outside the worker can change
            // that (README, "Chaos"), so the limit is not lowered on Node's shared workers.
            kinds.retain(|k| *k != schedule::FaultKind::WorkerFds);
        }
        if spec.policy == "reuseport" && !enable_migrate_req() {
            println!(
                "  note: net.ipv4.tcp_migrate_req cannot be set: no SIGTTIN/SIGTTOU under reuseport"
            );
            kinds.retain(|k| *k != schedule::FaultKind::Scale);
        }
        let result = run_target(spec, &binaries, &out_dir, target_seed, &kinds, per_target);
        restore_migrate_req();
        let (run, verdict) = result?;
        outcomes.push(Outcome {
            name: spec.name(),
            seed: target_seed,
            run,
            verdict,
        });
    }
    println!("\n{}", report::table(&outcomes));
    let json_path = out_dir.join("report.json");
    std::fs::write(&json_path, report::json(seed, &outcomes)?)?;
    let svg_path = out_dir.join("timeline.svg");
    std::fs::write(&svg_path, report::svg(seed, &outcomes))?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.verdict.passed()).collect();
    for o in &failed {
        for problem in &o.verdict.problems {
            println!("  {}: {problem}", o.name);
        }
    }
    if !failed.is_empty() {
        bail!("chaos failed for seed {seed}");
    }
    println!("== chaos passed (seed {seed})");
    Ok(())
}

fn specs(which: Which) -> Vec<Spec> {
    let mut specs = Vec::new();
    if which != Which::Node {
        for policy in ["rr", "shared", "reuseport"] {
            specs.push(Spec {
                program: Program::HttpdDemo,
                policy,
            });
        }
    }
    if which != Which::HttpdDemo {
        for policy in ["rr", "shared"] {
            specs.push(Spec {
                program: Program::Node,
                policy,
            });
        }
    }
    specs
}

fn drawn_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    schedule::Rng::new(nanos ^ u64::from(std::process::id())).next() % 1_000_000_000
}

fn build() -> Result<Binaries> {
    let root = crate::workspace_root();
    let status = crate::bench::cargo(&root)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "httpd-demo",
            "-p",
            "cluster",
        ])
        .status()
        .context("running cargo build")?;
    anyhow::ensure!(status.success(), "cargo build failed");
    let release = crate::bench::target_dir(&root).join("release");
    Ok(Binaries {
        httpd_demo: release.join("httpd-demo"),
        cluster: release.join("cluster"),
        node_app: root.join("xtask/peers/node_chaos_app.js"),
    })
}

/// A burst opens 1,000 connections at once: the soft descriptor limit goes to the hard one.
fn raise_own_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(65_536), hard);
    }
}

/// The primary's RSS (kB, `VmRSS`) and descriptor count.
fn usage(pid: u32) -> Usage {
    let rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    Usage {
        rss_kb,
        fds: faults::open_fds(pid).unwrap_or(0),
    }
}

fn run_target(
    spec: &Spec,
    binaries: &Binaries,
    out_dir: &std::path::Path,
    seed: u64,
    kinds: &[schedule::FaultKind],
    duration: Duration,
) -> Result<(Run, check::Verdict)> {
    let name = spec.name();
    let registry = Arc::new(Registry::default());
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&registry));
    let until = duration.saturating_sub(schedule::MAX_HOLD + SETTLE);
    let plan = schedule::plan(seed, kinds, WARMUP, until);
    println!(
        "\n== {name}: {} s, {} faults (seed {seed})",
        duration.as_secs(),
        plan.len()
    );
    let mut target = Target::start(spec, binaries, out_dir, &registry)?;
    let started = Instant::now();
    let wall_start_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let load = Load::start(target.addr, started);
    // Each primary's usage once it has run for WARMUP (a primary started by an upgrade
    // is compared with itself, not with the one it replaced).
    let mut warm: BTreeMap<u32, (Duration, Option<Usage>)> = BTreeMap::new();
    let mut zombies = BTreeSet::new();
    let records: Mutex<Vec<FaultRecord>> = Mutex::new(Vec::new());
    let progress = Progress::new(&name);
    thread::scope(|scope| {
        let mut next = 0;
        let mut previous_zombies = Vec::new();
        while load.now() < duration {
            let now = load.now();
            let primary = target.primary();
            let (seen, sample) = warm.entry(primary).or_insert((now, None));
            if sample.is_none() && now >= *seen + WARMUP {
                *sample = Some(usage(primary));
            }
            while next < plan.len() && plan[next].at <= now {
                let (planned, target, registry, records) =
                    (&plan[next], &target, &registry, &records);
                scope.spawn(move || {
                    let record = faults::perform(planned, target, registry, started);
                    records
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(record);
                });
                next += 1;
            }
            target.reap();
            let now_zombies = registry.zombies();
            zombies.extend(now_zombies.iter().filter(|p| previous_zombies.contains(*p)));
            previous_zombies = now_zombies;
            let (requests, failed) = load.counts();
            progress.show(now, duration, requests, failed, next, plan.len());
            thread::sleep(TICK);
        }
    });
    progress.done();
    let whole = wait_whole(&target);
    let last_primary = target.primary();
    let end = usage(last_primary);
    let warm = match warm.get(&last_primary) {
        Some((_, Some(sample))) => *sample,
        // Started too late in the run for a warm-up of its own: compared after the run.
        _ => end,
    };
    let history = load.stop();
    let stop = target.stop();
    target.finish_logs();
    let left: Vec<u32> = registry
        .pids()
        .into_iter()
        .filter(|&p| registry.is_ours(p))
        .collect();
    let port_open_after = std::net::TcpStream::connect(target.addr).is_ok();
    let mut faults = records.into_inner().unwrap_or_else(PoisonError::into_inner);
    faults.sort_by_key(|f| f.start);
    let run = Run {
        requests: history.requests,
        faults,
        events: target.events(),
        wall_start_ms,
        warm,
        end,
        zombies: zombies.into_iter().collect(),
        left,
        port_open_after,
        capped: history.capped,
        dropped_events: target.dropped_events(),
    };
    let mut verdict = check::check(&run);
    if let Err(err) = whole {
        verdict.problems.push(format!("{err:#}"));
    }
    match stop {
        Ok(took) => println!("  stopped in {:.1} s", took.as_secs_f64()),
        Err(err) => verdict.problems.push(format!("{err:#}")),
    }
    drop(target);
    *CURRENT.lock().unwrap_or_else(PoisonError::into_inner) = None;
    Ok((run, verdict))
}

/// Waits until one primary runs with every slot's worker (after an upgrade or a scale
/// step, the cluster takes a moment to be whole again).
fn wait_whole(target: &Target) -> Result<()> {
    let deadline = Instant::now() + WHOLE_TIMEOUT;
    loop {
        target.reap();
        if target.primaries().len() == 1 && target.workers().len() == target::WORKERS {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not whole {WHOLE_TIMEOUT:?} after the faults: primaries {:?}, workers {:?}",
                target.primaries(),
                target.workers()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The progress line: rewritten in place on a terminal, every 5 s otherwise.
struct Progress {
    name: String,
    terminal: bool,
    last: Mutex<Option<Instant>>,
}

impl Progress {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            terminal: std::io::stdout().is_terminal(),
            last: Mutex::new(None),
        }
    }

    fn show(
        &self,
        now: Duration,
        of: Duration,
        requests: u64,
        failed: u64,
        faults: usize,
        planned: usize,
    ) {
        let every = if self.terminal {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(5)
        };
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|l| l.elapsed() < every) {
            return;
        }
        *last = Some(Instant::now());
        let line = format!(
            "  {} {:5.1}/{:.0} s  requests {requests}  failed {failed}  faults {faults}/{planned}",
            self.name,
            now.as_secs_f64(),
            of.as_secs_f64()
        );
        let mut out = std::io::stdout().lock();
        if self.terminal {
            let _ = write!(out, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }

    fn done(&self) {
        if self.terminal {
            println!();
        }
    }
}
