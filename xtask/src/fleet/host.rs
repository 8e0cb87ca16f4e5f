//! The fleet's processes: a host (one `httpd-demo` primary with its workers, in its
//! namespace) and the nginx balancer, each under a `testkit::KillOnDrop` group guard so
//! that it is killed and reaped on every path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::{KillOnDrop, LineLog, children_of, http_get, is_running};

use super::net::{HostNet, Network};

/// Workers per host.
pub(crate) const WORKERS: usize = 2;
/// How long one host or the balancer may take to start, stop or become ready.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// One running host.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) net: HostNet,
    pub(crate) addr: SocketAddr,
    pub(crate) log: LineLog,
    process: KillOnDrop,
}

impl Host {
    /// Starts `httpd-demo --workers 2` on the host's address and waits until it is ready.
    pub(crate) fn start(
        network: &Network,
        net: &HostNet,
        binary: &Path,
        port: u16,
    ) -> Result<Self> {
        let mut command = network.command(net, binary);
        command
            .args(["--workers", &WORKERS.to_string(), "--grace", "5"])
            .args(["--host", &net.ip.to_string(), "--port", &port.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = KillOnDrop::spawn_group(&mut command)
            .with_context(|| format!("starting host {}", net.name))?;
        let log = LineLog::of(process.child_mut().stderr.take().expect("piped"));
        let host = Self {
            net: net.clone(),
            addr: SocketAddr::new(net.ip, port),
            log,
            process,
        };
        host.wait_ready(0)?;
        Ok(host)
    }

    /// The primary's pid (`ip netns exec` execs it, so it is our child).
    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        self.process
            .signal(signal)
            .with_context(|| format!("kill -{signal} host {}", self.net.name))
    }

    /// Waits until the primary logs `cluster ready` (every slot listening) at line `mark`
    /// or later and the host's `/readyz` answers 200, as a balancer's probe would see it.
    pub(crate) fn wait_ready(&self, mark: usize) -> Result<()> {
        self.log
            .wait_for(mark, "cluster ready", TIMEOUT)
            .with_context(|| format!("host {} never became ready", self.net.name))?;
        self.wait_readyz()
    }

    /// Polls `GET /readyz` until it answers 200 (bounded by [`TIMEOUT`]).
    pub(crate) fn wait_readyz(&self) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if matches!(http_get(self.addr, "/readyz"), Ok((200, _))) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "host {}: /readyz not 200 within {TIMEOUT:?}",
                self.net.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the primary to exit by itself; returns its exit code.
    pub(crate) fn wait_exit(&mut self) -> Result<Option<i32>> {
        match self.process.wait_timeout(TIMEOUT)? {
            Some(status) => Ok(status.code()),
            None => bail!("host {} did not exit within {TIMEOUT:?}", self.net.name),
        }
    }

    /// SIGKILL of the primary and every worker at once, as a machine that dies; waits
    /// until they are all gone.
    pub(crate) fn kill_all(&mut self) -> Result<()> {
        let workers = children_of(self.pid());
        for &pid in &workers {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        self.signal(Signal::SIGKILL)?;
        self.wait_exit()?;
        let deadline = Instant::now() + TIMEOUT;
        while workers.iter().any(|&p| is_running(p)) {
            ensure!(
                Instant::now() < deadline,
                "workers {workers:?} outlived SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

/// The nginx balancer in front of the hosts.
#[derive(Debug)]
pub(crate) struct Balancer {
    pub(crate) addr: SocketAddr,
    prefix: PathBuf,
    process: KillOnDrop,
}

impl Balancer {
    /// Writes the configuration under `prefix` and starts nginx; returns once a request
    /// through it reaches a host.
    pub(crate) fn start(template: &str, prefix: &Path, upstreams: &[SocketAddr]) -> Result<Self> {
        let port = testkit::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::fs::create_dir_all(prefix.join("temp"))
            .with_context(|| format!("creating {}", prefix.display()))?;
        let servers: String = upstreams
            .iter()
            .map(|a| format!("        server {a} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let config = template
            .replace("@PREFIX@", &prefix.display().to_string())
            .replace("@LISTEN@", &addr.to_string())
            .replace("@SERVERS@", servers.trim_end());
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
        let mut command = std::process::Command::new("nginx");
        command
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = KillOnDrop::spawn_group(&mut command).context("starting nginx")?;
        let mut balancer = Self {
            addr,
            prefix: prefix.to_owned(),
            process,
        };
        let deadline = Instant::now() + TIMEOUT;
        while !matches!(http_get(addr, "/healthz"), Ok((200, _))) {
            if let Some(status) = balancer.process.try_wait()? {
                bail!("nginx exited ({status}): {}", balancer.error_log());
            }
            ensure!(
                Instant::now() < deadline,
                "nginx did not serve within {TIMEOUT:?}; its log: {}",
                std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(balancer)
    }

    /// nginx's error log so far.
    pub(crate) fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }
}
