//! `cargo xtask fleet`: three `httpd-demo` hosts (a primary and two workers each, one
//! network namespace each) behind a real nginx, under a steady keep-alive client load
//! through nginx, taken through a rolling deploy, a graceful stop, the death of a host and
//! its recovery. Fails unless the rolling deploy and the graceful stop lose no request.
//!
//! ```text
//!   load (8 keep-alive connections) -> nginx 127.0.0.1:P -> h1, h2, h3 (httpd-demo :8000)
//!   rolling-deploy  SIGHUP h1, h2, h3 in turn, each waited for until ready
//!   graceful-stop   SIGTERM h3; it exits 0, traffic moves to h1, h2 (h3 then restarts)
//!   kill-host       SIGKILL of h2's primary and workers; failures until nginx stops
//!                   sending to it, and how long that took
//!   recover         h2 starts again; the time until nginx sends it traffic
//! ```
//!
//! Writes `<target>/fleet/report.json` and `<target>/fleet/fleet.svg`. Every namespace,
//! process and runtime file is removed on every path, Ctrl-C included.

#![allow(clippy::print_stdout)]

mod host;
mod net;
mod report;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, LoadConfig, Sample};

use self::host::{Balancer, Host, TIMEOUT};
use self::net::Network;
use self::report::Window;

/// Options of `cargo xtask fleet`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FleetOptions {
    /// Shorter observation windows (well under two minutes in all).
    #[arg(long)]
    pub(crate) quick: bool,
    /// Put the hosts on 127.0.0.2-4 even where network namespaces could be made.
    #[arg(long)]
    pub(crate) loopback: bool,
}

const HOSTS: usize = 3;
/// The port every host listens on (each on its own address).
const NAMESPACE_PORT: u16 = 8000;
/// nginx's `fail_timeout`: how long a failed host is left alone.
const FAIL_TIMEOUT: Duration = Duration::from_secs(2);
const NGINX_CONF: &str = include_str!("../peers/nginx-fleet.conf");

static HANDLER: Once = Once::new();

/// Ctrl-C and SIGTERM: kill every process group, undo the network, remove runtime files.
fn install_handler(runtime_dir: PathBuf) {
    HANDLER.call_once(|| {
        let installed = ctrlc::set_handler(move || {
            testkit::kill_all_groups();
            net::cleanup_now();
            let _ = std::fs::remove_dir_all(&runtime_dir);
            std::process::exit(130);
        });
        if let Err(err) = installed {
            println!("warning: no Ctrl-C handler ({err}); an interrupt may leave namespaces");
        }
    });
}

/// Removes a directory when dropped.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn require(program: &str, version_arg: &str, package: &str) -> Result<()> {
    let found = Command::new(program)
        .arg(version_arg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    ensure!(
        found,
        "{program} is not installed: `apt-get install -y {package}` (cargo xtask fleet needs it)"
    );
    Ok(())
}

/// Runs the whole fleet walk-through.
pub(crate) fn run(options: FleetOptions) -> Result<()> {
    require("nginx", "-v", "nginx-light")?;
    let started = Instant::now();
    println!("== building httpd-demo (release)");
    let binary = crate::demo::build_release()?;
    let out_dir = crate::bench::target_dir(&crate::workspace_root()).join("fleet");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let runtime = RemoveDir(out_dir.join("nginx"));
    install_handler(runtime.0.clone());
    let settle = if options.quick {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(4)
    };

    let network = Network::create(HOSTS, options.loopback);
    let port = match network.mode {
        net::Mode::Namespaces => NAMESPACE_PORT,
        net::Mode::Loopback => testkit::free_port(),
    };
    println!("== starting {HOSTS} hosts ({} workers each)", host::WORKERS);
    let mut hosts = Vec::new();
    for net in &network.hosts {
        let h = Host::start(&network, net, &binary, port)?;
        println!("  {} http://{} primary pid {}", net.name, h.addr, h.pid());
        hosts.push(h);
    }
    let upstreams: Vec<_> = hosts.iter().map(|h| h.addr).collect();
    let names: BTreeMap<String, String> = hosts
        .iter()
        .map(|h| (h.addr.to_string(), h.net.name.clone()))
        .collect();
    let _ = std::fs::remove_dir_all(&runtime.0);
    let balancer = Balancer::start(NGINX_CONF, &runtime.0, &upstreams)?;
    println!("== nginx on http://{} in front of them", balancer.addr);

    let mut config = LoadConfig::new(8, "/");
    config.pace = Some(Duration::from_millis(2));
    config.tag_header = Some("x-upstream".into());
    config.max_duration = Duration::from_secs(if options.quick { 100 } else { 300 });
    config.max_requests = 2_000_000;
    let load = KeepAliveLoad::start(balancer.addr, config);
    let fleet = Fleet {
        load: &load,
        settle,
    };
    for h in &hosts {
        fleet.wait_for_traffic(h, fleet.now())?;
    }
    println!("== load: 8 keep-alive connections through nginx, every host answering");

    let mut windows = Vec::new();
    let result = steps(&fleet, &network, &binary, port, &mut hosts, &mut windows);
    let samples = load.stop();
    if let Err(err) = result {
        println!("nginx error log:\n{}", balancer.error_log());
        return Err(err);
    }
    let steps: Vec<report::Step> = windows
        .iter()
        .map(|w| report::step(&samples, w, &names))
        .collect();
    println!("\n== results (requests through nginx; share = successful responses per host)");
    for step in &steps {
        print!("{}", report::table(step));
    }
    let json_path = out_dir.join("report.json");
    std::fs::write(&json_path, report::json(&steps)?)?;
    let svg_path = out_dir.join("fleet.svg");
    report::svg(&svg_path, &samples, &windows, &names)?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());
    drop(hosts);
    drop(balancer);
    drop(network);
    for step in &steps {
        let must_hold = matches!(step.name, "rolling-deploy" | "graceful-stop");
        if must_hold && step.failures > 0 {
            bail!("{}: {} failed requests (goal: 0)", step.name, step.failures);
        }
    }
    println!(
        "== fleet passed in {:.0} s (namespaces, processes and runtime files removed)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The load and how long each step keeps watching it.
struct Fleet<'a> {
    load: &'a KeepAliveLoad,
    settle: Duration,
}

impl Fleet<'_> {
    fn now(&self) -> Duration {
        self.load.elapsed()
    }

    /// Waits until a successful response from `host` ends after `since`.
    fn wait_for_traffic(&self, host: &Host, since: Duration) -> Result<Duration> {
        let addr = host.addr.to_string();
        let mut at = None;
        let seen = self.load.wait_until(TIMEOUT, |samples| {
            at = samples
                .iter()
                .rev()
                .take_while(|s| s.at > since)
                .filter(|s| s.is_ok() && report::answered_by(s) == Some(addr.as_str()))
                .map(|s| s.at)
                .last();
            at.is_some()
        });
        ensure!(seen, "host {} got no traffic through nginx", host.net.name);
        Ok(at.unwrap_or(since))
    }

    /// Lets the load run for `settle` more.
    fn observe(&self) {
        let until = self.now() + self.settle;
        self.load
            .wait_until(self.settle * 2, |_| self.now() >= until);
    }
}

fn window(name: &'static str, start: Duration, end: Duration) -> Window {
    Window {
        name,
        start,
        end,
        extra: BTreeMap::new(),
    }
}

fn ms(d: Duration) -> serde_json::Value {
    serde_json::Value::from(d.as_millis() as u64)
}

fn steps(
    fleet: &Fleet<'_>,
    network: &Network,
    binary: &std::path::Path,
    port: u16,
    hosts: &mut [Host],
    windows: &mut Vec<Window>,
) -> Result<()> {
    // 1. Rolling deploy: one host at a time, each waited for until ready.
    println!("\n[1/4] rolling-deploy: SIGHUP each host in turn, waiting until it is ready");
    let start = fleet.now();
    for h in hosts.iter() {
        let mark = h.log.mark();
        h.signal(Signal::SIGHUP)?;
        h.log
            .wait_for(mark, "rolling reload complete", TIMEOUT)
            .with_context(|| format!("host {} never completed its reload", h.net.name))?;
        h.wait_readyz()?;
        println!("  {} reloaded and ready", h.net.name);
    }
    fleet.observe();
    windows.push(window("rolling-deploy", start, fleet.now()));

    // 2. Graceful stop of h3.
    let h3 = HOSTS - 1;
    println!("[2/4] graceful-stop: SIGTERM {}", hosts[h3].net.name);
    let start = fleet.now();
    hosts[h3].signal(Signal::SIGTERM)?;
    let code = hosts[h3].wait_exit()?;
    ensure!(
        code == Some(0),
        "{} exited with {code:?}",
        hosts[h3].net.name
    );
    let exited = fleet.now();
    fleet.observe();
    let mut w = window("graceful-stop", start, fleet.now());
    w.extra.insert("stop_ms", ms(exited - start));
    windows.push(w);
    println!(
        "  {} exited 0 after {:?}",
        hosts[h3].net.name,
        exited - start
    );
    // Back in service before the next step, untimed.
    hosts[h3] = Host::start(network, &hosts[h3].net.clone(), binary, port)?;
    fleet.wait_for_traffic(&hosts[h3], fleet.now())?;

    // 3. Kill h2 outright.
    let h2 = 1;
    let dead = hosts[h2].addr.to_string();
    println!(
        "[3/4] kill-host: SIGKILL {} (primary and workers)",
        hosts[h2].net.name
    );
    let start = fleet.now();
    hosts[h2].kill_all()?;
    let killed = fleet.now();
    println!("  {} dead after {:?}", hosts[h2].net.name, killed - start);
    // nginx tries the dead host until max_fails marks it down; it probes again once
    // fail_timeout has passed, so only the first burst is what detection took.
    let probe_free = FAIL_TIMEOUT.min(fleet.settle.max(Duration::from_millis(1000)));
    let until = killed + probe_free;
    fleet
        .load
        .wait_until(probe_free * 2, |_| fleet.now() >= until);
    let samples = fleet.load.samples_from(0);
    let touched: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= start && s.at < until && report::tried(s, &dead))
        .filter(|s| s.tag.as_deref().is_some_and(|t| t.contains(", ")) || !s.is_ok())
        .collect();
    let detected = touched.last().map_or(Duration::ZERO, |s| s.at - start);
    let failed = samples
        .iter()
        .filter(|s| s.at >= start && s.at < until && !s.is_ok())
        .count();
    let mut w = window("kill-host", start, until);
    w.extra.insert("nginx_stopped_sending_ms", ms(detected));
    w.extra.insert("failed_on_dead_host", touched.len().into());
    windows.push(w);
    println!(
        "  {} requests failed on the dead host ({} retried by nginx on another, {failed} failed \
         for the client); the last {detected:?} after the SIGKILL",
        touched.len(),
        touched.iter().filter(|s| s.is_ok()).count()
    );

    // 4. Recover h2.
    println!("[4/4] recover: start {} again", hosts[h2].net.name);
    let start = fleet.now();
    hosts[h2] = Host::start(network, &hosts[h2].net.clone(), binary, port)?;
    let ready = fleet.now();
    let back = fleet.wait_for_traffic(&hosts[h2], ready)?;
    fleet.observe();
    let mut w = window("recover", start, fleet.now());
    w.extra.insert("ready_ms", ms(ready - start));
    w.extra
        .insert("traffic_back_ms", ms(back.saturating_sub(start)));
    windows.push(w);
    println!(
        "  {} ready after {:?}, traffic back after {:?}",
        hosts[h2].net.name,
        ready - start,
        back.saturating_sub(start)
    );
    Ok(())
}
