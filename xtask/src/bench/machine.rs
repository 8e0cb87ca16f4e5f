//! The machine a report was measured on: CPU, cores, kernel, memory and peer versions.

use std::process::{Command, Stdio};

use serde::Serialize;

use super::Ctx;

/// What the top of the report says about the machine.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) kernel: String,
    pub(crate) os: String,
    pub(crate) memory_gib: f64,
    pub(crate) quick: bool,
    pub(crate) node: String,
    pub(crate) nginx: String,
    pub(crate) wrk: String,
}

impl Machine {
    pub(crate) fn probe(ctx: &Ctx) -> Self {
        let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = field(&cpuinfo, "model name", ':').unwrap_or_else(|| "unknown".to_owned());
        let meminfo = read("/proc/meminfo");
        let memory_kb: f64 = field(&meminfo, "MemTotal", ':')
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        let os = field(&read("/etc/os-release"), "PRETTY_NAME", '=')
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            os,
            memory_gib: (memory_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            quick: ctx.quick,
            node: version(ctx.node.installed, "node", "--version"),
            nginx: version(ctx.nginx.installed, "nginx", "-v"),
            wrk: version(ctx.wrk.installed, "wrk", "--version"),
        }
    }

    /// `(label, value)` pairs for the Markdown report.
    pub(crate) fn rows(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CPU", self.cpu.clone()),
            ("cores", self.cores.to_string()),
            ("kernel", self.kernel.clone()),
            ("OS", self.os.clone()),
            ("memory", format!("{} GiB", self.memory_gib)),
            (
                "mode",
                if self.quick { "--quick" } else { "full" }.to_owned(),
            ),
            ("node", self.node.clone()),
            ("nginx", self.nginx.clone()),
            ("wrk", self.wrk.clone()),
        ]
    }
}

/// The value of the first `key<sep>value` line.
fn field(text: &str, key: &str, sep: char) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(sep)?;
        (k.trim() == key).then(|| v.trim().to_owned())
    })
}

/// The first line a tool prints for its version (nginx prints it on stderr).
fn version(installed: bool, tool: &str, arg: &str) -> String {
    if !installed {
        return "not installed".to_owned();
    }
    Command::new(tool)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|out| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // wrk's line goes on with a copyright notice.
            let first = text.lines().next()?.split(" Copyright").next()?;
            Some(first.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
