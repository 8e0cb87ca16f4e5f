//! The fleet's network: one network namespace per host on a bridge, addresses in a private
//! /24 made for this run, or, where namespaces cannot be made (no root, no `ip`), the
//! loopback addresses 127.0.0.2, 127.0.0.3, ...
//!
//! ```text
//!   root namespace                         namespace flt<pid>h1
//!   nginx -> bridge flt<pid>br 10.213.N.1 --veth-- flt<pid>p1 10.213.N.11
//!                                          --veth-- (h2) 10.213.N.12, (h3) 10.213.N.13
//! ```
//!
//! Everything made is undone when the [`Network`] is dropped, by the Ctrl-C handler
//! ([`cleanup_now`]), and, for a run that was SIGKILLed, at the start of the next run
//! (names carry the pid of the run that made them).

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, bail};

/// Commands that undo what was made, run in reverse order.
static UNDO: Mutex<Vec<Vec<String>>> = Mutex::new(Vec::new());

/// Runs every pending undo command: for the Ctrl-C handler.
pub(crate) fn cleanup_now() {
    let commands = std::mem::take(&mut *UNDO.lock().unwrap_or_else(PoisonError::into_inner));
    for command in commands.iter().rev() {
        let _ = quiet(command);
    }
}

/// One host's place in the network.
#[derive(Debug, Clone)]
pub(crate) struct HostNet {
    /// `h1`, `h2`, ...
    pub(crate) name: String,
    /// Its namespace, if namespaces are used.
    pub(crate) netns: Option<String>,
    /// The address it listens on.
    pub(crate) ip: IpAddr,
}

/// How the hosts are separated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Namespaces,
    Loopback,
}

/// The hosts' addresses, and what to undo.
#[derive(Debug)]
pub(crate) struct Network {
    pub(crate) mode: Mode,
    pub(crate) hosts: Vec<HostNet>,
    undo: Vec<Vec<String>>,
}

impl Network {
    /// Namespaces for `count` hosts, or loopback addresses (with a message) where they
    /// cannot be made.
    /// `loopback` asks for the loopback addresses in any case.
    pub(crate) fn create(count: usize, loopback: bool) -> Self {
        remove_stale();
        let made = if loopback {
            Err(anyhow::anyhow!("--loopback"))
        } else {
            Self::namespaces(count)
        };
        match made {
            Ok(network) => network,
            Err(err) => {
                println!(
                    "note: network namespaces unavailable ({err:#}); the hosts use 127.0.0.2 to \
                     127.0.0.{} on loopback instead",
                    count + 1
                );
                Self {
                    mode: Mode::Loopback,
                    hosts: (0..count)
                        .map(|i| HostNet {
                            name: format!("h{}", i + 1),
                            netns: None,
                            ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8)),
                        })
                        .collect(),
                    undo: Vec::new(),
                }
            }
        }
    }

    fn namespaces(count: usize) -> Result<Self> {
        let pid = std::process::id();
        let subnet = free_subnet()?;
        let bridge = format!("flt{pid}br");
        let mut network = Self {
            mode: Mode::Namespaces,
            hosts: Vec::new(),
            undo: Vec::new(),
        };
        // On an error `network` is dropped, which undoes what was made so far.
        network.make(
            &["ip", "link", "add", &bridge, "type", "bridge"],
            &["ip", "link", "del", &bridge],
        )?;
        network.run(&[
            "ip",
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &bridge,
        ])?;
        network.run(&["ip", "link", "set", &bridge, "up"])?;
        for i in 1..=count {
            let netns = format!("flt{pid}h{i}");
            let (outer, inner) = (format!("flt{pid}v{i}"), format!("flt{pid}p{i}"));
            let ip = format!("{subnet}.{}", 10 + i);
            network.make(
                &["ip", "netns", "add", &netns],
                &["ip", "netns", "del", &netns],
            )?;
            network.make(
                &[
                    "ip", "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                ],
                &["ip", "link", "del", &outer],
            )?;
            network.run(&["ip", "link", "set", &inner, "netns", &netns])?;
            network.run(&["ip", "link", "set", &outer, "master", &bridge, "up"])?;
            network.run(&[
                "ip",
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &inner,
            ])?;
            network.run(&["ip", "-n", &netns, "link", "set", &inner, "up"])?;
            network.run(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
            network.hosts.push(HostNet {
                name: format!("h{i}"),
                netns: Some(netns),
                ip: ip.parse().context("host address")?,
            });
        }
        println!(
            "network: {count} namespaces on bridge {bridge}, {subnet}.0/24 (removed at the end)"
        );
        Ok(network)
    }

    /// Runs `command`; `undo` is run when the network goes away.
    fn make(&mut self, command: &[&str], undo: &[&str]) -> Result<()> {
        self.run(command)?;
        let undo: Vec<String> = undo.iter().map(|s| (*s).to_owned()).collect();
        UNDO.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(undo.clone());
        self.undo.push(undo);
        Ok(())
    }

    fn run(&self, command: &[&str]) -> Result<()> {
        let command: Vec<String> = command.iter().map(|s| (*s).to_owned()).collect();
        quiet(&command)
    }

    /// The command that runs `program` on `host`: inside its namespace, or as is.
    pub(crate) fn command(&self, host: &HostNet, program: &std::path::Path) -> Command {
        match &host.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(program);
                command
            }
            None => Command::new(program),
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        let mut pending = UNDO.lock().unwrap_or_else(PoisonError::into_inner);
        for command in self.undo.iter().rev() {
            let _ = quiet(command);
            pending.retain(|c| c != command);
        }
    }
}

/// Runs a command with no output unless it fails.
fn quiet(command: &[String]) -> Result<()> {
    let output = Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", command[0]))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}",
            command.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// A 10.213.N prefix that no address or route of this machine uses.
fn free_subnet() -> Result<String> {
    let taken = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let used = taken(&["-4", "addr"])? + &taken(&["-4", "route"])?;
    (20..250)
        .map(|n| format!("10.213.{n}"))
        .find(|prefix| !used.contains(&format!("{prefix}.")))
        .context("no free 10.213.N.0/24")
}

/// Removes namespaces and bridges of earlier runs whose process is gone (a SIGKILLed run
/// cannot clean up after itself).
fn remove_stale() {
    let listed = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let stale = |name: &str, suffix: char| -> bool {
        let Some(rest) = name.strip_prefix("flt") else {
            return false;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let pid: Option<u32> = digits.parse().ok();
        rest[digits.len()..].starts_with(suffix)
            && pid.is_some_and(|p| p != std::process::id() && !testkit::is_running(p))
    };
    for line in listed(&["netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if stale(name, 'h') {
            let _ = quiet(&["ip".into(), "netns".into(), "del".into(), name.into()]);
        }
    }
    for line in listed(&["-o", "link", "show", "type", "bridge"]).lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        if stale(name, 'b') {
            let _ = quiet(&["ip".into(), "link".into(), "del".into(), name.into()]);
        }
    }
}
