//! The demo's deploy step: `httpd-demo` runs from a copy of the binary; under a steady
//! keep-alive load the file is replaced and `SIGHUP` reloads the workers onto it, then
//! replaced again and `SIGUSR2` upgrades the primary itself. Every request must succeed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, KillOnDrop, LineLog, LoadConfig, TempDir, WorkerInfo, http_get};

use super::{Printer, STEP_TIMEOUT, WORKERS};

/// Installs a copy of `source` at `path` as a package manager does (a new file renamed
/// over the old one), with a later mtime, so the build id changes.
fn install(source: &Path, path: &Path, generation: u64) -> Result<()> {
    let staged = path.with_extension("new");
    std::fs::copy(source, &staged).context("copying httpd-demo")?;
    let file = std::fs::File::options().write(true).open(&staged)?;
    file.set_modified(SystemTime::now() + Duration::from_secs(generation))?;
    drop(file);
    std::fs::rename(&staged, path).context("installing the copy")?;
    Ok(())
}

/// `GET /worker` on new connections until every worker answered; their pids and builds.
fn serving(addr: SocketAddr) -> Result<(BTreeSet<u32>, BTreeSet<String>)> {
    let (mut pids, mut builds) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..200 {
        let (status, body) = http_get(addr, "/worker")?;
        ensure!(status == 200, "GET /worker: {status}");
        let (worker, build): (WorkerInfo, _) = WorkerInfo::with_build(&body)?;
        pids.insert(worker.pid);
        builds.extend(build);
        if pids.len() == WORKERS {
            return Ok((pids, builds));
        }
    }
    anyhow::bail!("only {} workers answered", pids.len())
}

/// The pid in a log line's `field=N`.
fn field(line: &str, name: &str) -> Option<u32> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
        .and_then(|pid| pid.parse().ok())
}

/// Runs the step; returns every pid it saw, for the final check that none is left.
pub(super) fn run(out: &Printer, binary: &Path) -> Result<Vec<u32>> {
    // A directory of the demo's own, removed on every path.
    let dir = TempDir::new("httpd-demo-deploy");
    let installed = dir.path().join("httpd-demo");
    install(binary, &installed, 0)?;
    let mut process = KillOnDrop::spawn_group(
        Command::new(&installed)
            .args([
                "--workers",
                &WORKERS.to_string(),
                "--port",
                "0",
                "--grace",
                "5",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .context("starting the installed httpd-demo")?;
    let child = process.child_mut();
    let log = LineLog::of(child.stderr.take().expect("piped"));
    let stdout = LineLog::of(child.stdout.take().expect("piped"));
    let line = stdout.wait_for(0, "", STEP_TIMEOUT)?.text;
    let addr: SocketAddr = line
        .strip_prefix("listening on http://")
        .and_then(|a| a.trim().parse().ok())
        .with_context(|| format!("unexpected first line {line:?}"))?;
    log.wait_for(0, "cluster ready", STEP_TIMEOUT)?;
    let old_primary = process.pid();
    let (first_pids, first_builds) = serving(addr)?;
    let mut seen: Vec<u32> = first_pids.iter().copied().chain([old_primary]).collect();

    let mut config = LoadConfig::new(16, "/");
    config.max_duration = 4 * STEP_TIMEOUT;
    let load = KeepAliveLoad::start(addr, config);
    ensure!(load.wait_until(STEP_TIMEOUT, |s| s.len() >= 300), "no load");

    install(binary, &installed, 1)?;
    let mark = log.mark();
    process.signal(Signal::SIGHUP)?;
    log.wait_for(mark, "rolling reload complete", STEP_TIMEOUT)?;
    let (reload_pids, reload_builds) = serving(addr)?;
    ensure!(
        reload_builds.is_disjoint(&first_builds),
        "the reload kept the old build"
    );
    let reload_failed = load.samples_from(0).iter().filter(|s| !s.is_ok()).count();
    seen.extend(&reload_pids);

    install(binary, &installed, 2)?;
    let mark = log.mark();
    process.signal(Signal::SIGUSR2)?;
    let started = log
        .wait_for(mark, "upgrade: new primary started", STEP_TIMEOUT)?
        .text;
    let new_primary = field(&started, "pid").context("no pid in the upgrade line")?;
    process.adopt(new_primary);
    seen.push(new_primary);
    let status = process
        .wait_timeout(STEP_TIMEOUT)?
        .context("the old primary did not exit")?;
    ensure!(status.success(), "the old primary exited with {status}");
    let done = load.count() + 300;
    ensure!(
        load.wait_until(STEP_TIMEOUT, |s| s.len() >= done),
        "load stalled"
    );
    let samples = load.stop();
    let failed = samples.iter().filter(|s| !s.is_ok()).count();
    let (upgrade_pids, upgrade_builds) = serving(addr)?;
    seen.extend(&upgrade_pids);
    out.table(
        &["", "primary", "workers' build"],
        [
            vec![
                "started".into(),
                old_primary.to_string(),
                first_builds.iter().cloned().collect(),
            ],
            vec![
                "SIGHUP".into(),
                old_primary.to_string(),
                reload_builds.iter().cloned().collect(),
            ],
            vec![
                "SIGUSR2".into(),
                new_primary.to_string(),
                upgrade_builds.iter().cloned().collect(),
            ],
        ],
    );
    out.table(
        &["", "count"],
        [
            vec!["requests sent".into(), samples.len().to_string()],
            vec!["failed during SIGHUP".into(), reload_failed.to_string()],
            vec!["failed in all".into(), failed.to_string()],
        ],
    );
    ensure!(failed == 0, "{failed} requests failed while deploying");
    ensure!(
        upgrade_pids.is_disjoint(&reload_pids),
        "a worker survived the upgrade"
    );
    ensure!(
        upgrade_builds.is_disjoint(&reload_builds),
        "the upgrade kept the old build"
    );
    out.ok(&format!(
        "reloaded onto a new build, then upgraded the primary ({old_primary} -> {new_primary}): 0 of {} requests failed",
        samples.len()
    ));
    let mark = log.mark();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_primary as i32),
        Signal::SIGTERM,
    )?;
    log.wait_for(mark, "primary exiting", STEP_TIMEOUT)?;
    // The log ends once every process of the new primary has closed it, that is exited.
    if let Err(testkit::LogError::Timeout { .. }) = log.wait_for(mark, "\0", STEP_TIMEOUT) {
        anyhow::bail!("the new primary's processes did not exit");
    }
    out.log(&log.lines_from(mark));
    Ok(seen)
}
