//! The metrics endpoint (`--metrics`) against the real tools it is for, run by the test
//! on loopback: Prometheus 2.42 scrapes `/metrics` (Debian `prometheus`), headless
//! Chromium renders `/status` (Debian `chromium`), and HAProxy (Debian `haproxy`) checks
//! `/readyz` in front of two hosts while one stops with `--stop-delay`. A missing tool
//! fails the test with the package to install (`.ci/run` installs them); Node apps are
//! skipped without Node, like the rest of this suite.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::{KeepAliveLoad, KillOnDrop, LineLog, LoadConfig, TempDir, assert_none_failed};

use crate::command::{Cluster, TIMEOUT, pids};
use crate::{node_or_skip, node_script};

/// Prometheus' scrape interval in these tests.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// How long Prometheus may take to start (its TSDB) and scrape, on a loaded machine.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);

/// How often a test polls a tool's HTTP API while it waits for a state.
const POLL: Duration = Duration::from_millis(100);

/// HAProxy's health-check interval; one failed check marks a server down.
const CHECK_INTER: Duration = Duration::from_millis(200);

/// The `--stop-delay` of the hosts behind HAProxy: ten check intervals.
const STOP_DELAY: &str = "2s";

/// The path of `name` (on `PATH` or in `/usr/sbin`), or a failure that names the Debian
/// package to install.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|file| file.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: apt-get install {package} (the Debian package; \
                 .ci/run installs it when missing)"
            )
        })
}

/// `target/`, where the screenshot goes.
fn target_dir() -> PathBuf {
    // target/debug/deps/cli-<hash>
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .expect("the target directory")
        .to_owned()
}

/// `text` percent-encoded for a URL's query.
fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// `GET target` in HTTP/1.0 (so no chunked body): the status and the body, or why not.
fn get(addr: SocketAddr, target: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {target} HTTP/1.0\r\nHost: test\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| e.to_string())?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    Ok((status.ok_or("no status")?, body.to_owned()))
}

/// Polls `check` every [`POLL`] until it returns `Some`, or fails after `deadline` with
/// what it saw last.
#[track_caller]
fn poll<T>(deadline: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let until = Instant::now() + deadline;
    loop {
        let last = match check() {
            Ok(found) => return found,
            Err(last) => last,
        };
        assert!(
            Instant::now() < until,
            "{what} not within {deadline:?}; last: {last}"
        );
        std::thread::sleep(POLL);
    }
}

/// Where the command serves its metrics (`metrics on http://ADDRESS`).
fn metrics_address(cluster: &Cluster) -> SocketAddr {
    let line = cluster
        .log
        .wait_for(0, "metrics on http://", TIMEOUT)
        .unwrap_or_else(|e| panic!("no metrics address: {e}"));
    let address = line.text.rsplit("http://").next().expect("an address");
    address
        .parse()
        .unwrap_or_else(|_| panic!("{:?}", line.text))
}

/// Runs the Node HTTP app as `workers` workers with `--metrics 127.0.0.1:0` and `extra`
/// flags; returns the command and its metrics address.
fn node_cluster(workers: usize, extra: &[&str]) -> (Cluster, SocketAddr) {
    let script = node_script("http_server.js");
    let mut args: Vec<OsString> = ["--metrics", "127.0.0.1:0"].map(OsString::from).into();
    args.extend(extra.iter().map(OsString::from));
    args.extend([OsString::from("--"), script.into(), OsString::from("0")]);
    let cluster = Cluster::start(workers, &args);
    let metrics = metrics_address(&cluster);
    (cluster, metrics)
}

/// A Prometheus server on loopback that scrapes `target` every [`SCRAPE_INTERVAL`].
struct Prometheus {
    _guard: KillOnDrop,
    log: LineLog,
    api: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let program = tool("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let config = dir.path().join("prometheus.yml");
        let interval = SCRAPE_INTERVAL.as_secs();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {interval}s\n  scrape_timeout: {interval}s\n\
                 scrape_configs:\n  - job_name: cluster\n    static_configs:\n\
                 \x20     - targets: ['{target}']\n"
            ),
        )
        .expect("write the configuration");
        let api = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
        let mut command = Command::new(program);
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut guard = KillOnDrop::spawn(&mut command).expect("start prometheus");
        let log = LineLog::new();
        log.collect(guard.child_mut().stdout.take().expect("stdout"));
        log.collect(guard.child_mut().stderr.take().expect("stderr"));
        Prometheus {
            _guard: guard,
            log,
            api,
            _dir: dir,
        }
    }

    /// `GET path` on the HTTP API: its `data` (the status must be `success`).
    fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (status, body) = get(self.api, path)?;
        let value: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{status} {e}: {body}"))?;
        match value["status"].as_str() {
            Some("success") => Ok(value["data"].clone()),
            _ => Err(format!("{status}: {body}")),
        }
    }

    /// The single value of an instant query, if it has exactly one series.
    fn value(&self, promql: &str) -> Result<f64, String> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql)))?;
        let result = data["result"].as_array().ok_or("no result")?;
        match result.as_slice() {
            [series] => (series["value"][1].as_str())
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no value in {series}")),
            other => Err(format!("{} series: {data}", other.len())),
        }
    }

    /// Waits until `promql`'s value satisfies `holds`; returns it.
    #[track_caller]
    fn wait_value(&self, promql: &str, holds: impl Fn(f64) -> bool) -> f64 {
        poll(PROMETHEUS_DEADLINE, promql, || {
            let value = self
                .value(promql)
                .map_err(|e| format!("{e}\nprometheus:\n{}", self.log.tail(10)))?;
            match holds(value) {
                true => Ok(value),
                false => Err(format!("{promql} = {value}")),
            }
        })
    }
}

#[test]
fn prometheus_scrapes_the_worker_count_and_a_counter_rate() {
    if !node_or_skip() {
        return;
    }
    let (mut cluster, metrics) = node_cluster(3, &[]);
    let prometheus = Prometheus::start(metrics);
    prometheus.wait_value("up", |up| up == 1.0);
    let targets = prometheus.api("/api/v1/targets").expect("the targets");
    let active = targets["activeTargets"].as_array().expect("active targets");
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["scrapeUrl"], format!("http://{metrics}/metrics"));
    assert_eq!(active[0]["health"], "up", "{targets}");
    assert_eq!(
        active[0]["lastError"], "",
        "scraped without a warning: {targets}"
    );
    prometheus.wait_value("sum(cluster_workers)", |n| n == 3.0);
    assert_eq!(
        prometheus.value(r#"cluster_workers{state="listening"}"#),
        Ok(3.0)
    );
    // Prometheus keeps the counters' type (OpenMetrics), and so `rate` applies.
    let metadata = prometheus
        .api("/api/v1/metadata?metric=cluster_worker_exits")
        .expect("metadata");
    assert_eq!(
        metadata["cluster_worker_exits"][0]["type"], "counter",
        "{metadata}"
    );

    // A worker killed from outside: its exit (cause signal) and its replacement's start.
    let victim = cluster.started_from(0)[0].pid;
    let mark = cluster.log.mark();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), Signal::SIGKILL)
        .expect("kill a worker");
    cluster.wait_listening(mark, 1);
    let rate = r#"rate(cluster_worker_exits_total{cause="signal"}[1m])"#;
    prometheus.wait_value(rate, |rate| rate > 0.0);
    prometheus.wait_value("increase(cluster_worker_starts_total[1m])", |n| n > 0.0);
    prometheus.wait_value("sum(cluster_workers)", |n| n == 3.0);
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

#[test]
fn headless_chromium_renders_the_status_page_with_every_worker() {
    if !node_or_skip() {
        return;
    }
    let chromium = tool("chromium", "chromium");
    let (mut cluster, metrics) = node_cluster(3, &[]);
    let workers = pids(&cluster.started_from(0));
    assert_eq!(workers.len(), 3);
    let dir = TempDir::new("chromium");
    let screenshot = target_dir().join("metrics-status.png");
    let _ = std::fs::remove_file(&screenshot);
    let url = format!("http://{metrics}/status");
    // Its own profile in the temporary directory; a group guard for its helper processes.
    let browse = |flag: &str, out: &Path| {
        let mut command = Command::new(&chromium);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.path().join("profile").display()
            ))
            .args(["--window-size=1200,800", flag, &url])
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(out).expect("an output file"))
            .stderr(Stdio::null());
        let mut guard = KillOnDrop::spawn_group(&mut command).expect("start chromium");
        let status = guard.wait_timeout(3 * TIMEOUT).expect("wait for chromium");
        assert!(
            status.is_some_and(|s| s.success()),
            "chromium {flag}: {status:?}"
        );
    };
    browse(
        &format!("--screenshot={}", screenshot.display()),
        &dir.path().join("screenshot.out"),
    );
    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let dom_file = dir.path().join("dom.html");
    browse("--dump-dom", &dom_file);
    let dom = std::fs::read_to_string(&dom_file).expect("the DOM");
    for pid in &workers {
        assert!(
            dom.contains(&format!("<td class=\"pid\">{pid}</td>")),
            "worker {pid} in the page:\n{dom}"
        );
    }
    let primary = cluster.guard.pid();
    assert!(
        dom.contains(&format!("<b id=\"primary-pid\">{primary}</b>")),
        "{dom}"
    );
    assert!(dom.contains("<svg id=\"chart\""), "{dom}");
    cluster.signal(Signal::SIGTERM);
    assert!(cluster.wait_exit().success(), "{}", cluster.log.tail(20));
}

#[test]
fn readyz_behind_haproxy_with_a_stop_delay_loses_no_request_when_a_host_stops() {
    if !node_or_skip() {
        return;
    }
    let haproxy = tool("haproxy", "haproxy");
    let flags = ["--stop-delay", STOP_DELAY, "--grace", "10s"];
    let (mut stopped, stopped_metrics) = node_cluster(2, &flags);
    let (mut kept, kept_metrics) = node_cluster(2, &flags);
    let dir = TempDir::new("haproxy");
    let frontend = SocketAddr::from(([127, 0, 0, 1], testkit::free_port()));
    let inter = CHECK_INTER.as_millis();
    let server = |name: &str, host: &Cluster, metrics: SocketAddr| {
        format!(
            "    server {name} {} check port {} inter {inter}ms fall 1 rise 2\n",
            host.addr(),
            metrics.port()
        )
    };
    let config = dir.path().join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n    maxconn 256\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n\
             \x20   timeout server 30s\n    retries 3\n    option redispatch\n\
             frontend web\n    bind {frontend}\n    default_backend hosts\n\
             backend hosts\n    balance roundrobin\n    option httpchk GET /readyz\n\
             \x20   http-check expect status 200\n{}{}",
            server("stopped", &stopped, stopped_metrics),
            server("kept", &kept, kept_metrics),
        ),
    )
    .expect("write the configuration");
    let mut command = Command::new(haproxy);
    command
        .arg("-db")
        .arg("-f")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = KillOnDrop::spawn(&mut command).expect("start haproxy");
    let log = LineLog::new();
    log.collect(guard.child_mut().stdout.take().expect("stdout"));
    log.collect(guard.child_mut().stderr.take().expect("stderr"));
    // Both hosts answer through it: the pids behind it are all four workers'.
    let all = &pids(&stopped.started_from(0)) | &pids(&kept.started_from(0));
    let mut seen = std::collections::BTreeSet::new();
    poll(TIMEOUT, "every worker through haproxy", || {
        let (status, body) = get(frontend, "/")?;
        let value: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        if status == 200
            && let Some(pid) = value["pid"].as_u64()
        {
            seen.insert(pid as u32);
        }
        match seen == all {
            true => Ok(()),
            false => Err(format!("{status}, {seen:?} of {all:?}\n{}", log.tail(10))),
        }
    });

    let load = KeepAliveLoad::start(frontend, LoadConfig::new(4, "/"));
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= 200),
        "the load runs"
    );
    stopped.signal(Signal::SIGTERM);
    // Not ready at once; the drain begins after the delay, when haproxy's checks (every
    // 200 ms, one failure enough) have taken the host out.
    poll(TIMEOUT, "/readyz 503 on the stopped host", || {
        match get(stopped_metrics, "/readyz")? {
            (503, body) if body == "not ready\n" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(stopped.wait_exit().success(), "{}", stopped.log.tail(20));
    let after = load.count();
    assert!(
        load.wait_until(TIMEOUT, |s| s.len() >= after + 200),
        "the load goes on after the host is gone"
    );
    let samples = load.stop();
    assert_none_failed(&samples);
    drop(guard);
    kept.signal(Signal::SIGTERM);
    assert!(kept.wait_exit().success(), "{}", kept.log.tail(20));
}
