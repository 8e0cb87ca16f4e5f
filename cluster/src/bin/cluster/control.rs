//! `cluster status | reload | scale | stop`: the subcommands that talk to a running
//! cluster over its control socket (`cluster::control`), and how the running command
//! names its socket (`--name`, `--control`, `--no-control`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use cluster::control::{self, Client, Request, Response, Status};

/// Which running cluster a subcommand talks to.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Target {
    /// The cluster's name (its --name, or its program's file name without the
    /// extension). Not needed when only one cluster runs.
    #[arg(long)]
    name: Option<String>,
    /// The control socket's path (the running cluster's --control).
    #[arg(long, value_name = "PATH", conflicts_with = "name")]
    control: Option<PathBuf>,
}

/// A subcommand for a running cluster.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum ControlCommand {
    /// Show a running cluster's workers: slot, id, pid, state, uptime, restarts and the
    /// last exit's cause, CPU, memory, connections handed over (rr), addresses, build.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the status as JSON (the control protocol's `status` object).
        #[arg(long)]
        json: bool,
    },
    /// Reload a running cluster (each worker replaced by a new one that listens first)
    /// and wait for the end: exit 0 when every slot was replaced, 1 and the reason when
    /// a slot kept its old worker.
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Add or remove workers of a running cluster until there are N, and wait until the
    /// new ones listen (or the removed ones have exited).
    Scale {
        /// The worker count wanted.
        workers: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Stop a running cluster gracefully and wait until every worker has exited.
    Stop {
        /// How long workers may finish their requests (default: the cluster's --grace).
        #[arg(long, value_parser = super::parse_duration)]
        grace: Option<Duration>,
        #[command(flatten)]
        target: Target,
    },
}

/// Runs a subcommand; `Ok(false)` when the cluster said no (exit 1).
pub(crate) fn run(command: ControlCommand) -> anyhow::Result<bool> {
    let (target, request, json) = match command {
        ControlCommand::Status { target, json } => (target, Request::Status, json),
        ControlCommand::Reload { target } => (target, Request::Reload, false),
        ControlCommand::Scale { workers, target } => (target, Request::Scale { workers }, false),
        ControlCommand::Stop { grace, target } => {
            let grace_ms = grace.map(|g| u64::try_from(g.as_millis()).unwrap_or(u64::MAX));
            (target, Request::Stop { grace_ms }, false)
        }
    };
    let path = resolve(&target)?;
    let response = Client::new(&path).call(&request)?;
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock<'_>, text: &str| {
        use std::io::Write;
        let _ = writeln!(out, "{text}");
    };
    match (&request, &response) {
        (
            Request::Status,
            Response {
                status: Some(status),
                ..
            },
        ) if json => {
            say(&mut out, &serde_json::to_string_pretty(status)?);
        }
        (
            Request::Status,
            Response {
                status: Some(status),
                ..
            },
        ) => {
            say(&mut out, &render(status));
        }
        (
            Request::Reload,
            Response {
                reload: Some(reload),
                ok,
                ..
            },
        ) => {
            let took = reload.took_ms as f64 / 1000.0;
            let replaced = reload.replaced.len();
            match ok {
                true => say(
                    &mut out,
                    &format!("reloaded: {replaced} workers replaced in {took:.1}s"),
                ),
                false => {
                    for failed in &reload.failed {
                        say(
                            &mut out,
                            &format!(
                                "slot {}: kept worker {}: {}",
                                failed.slot, failed.kept, failed.reason
                            ),
                        );
                    }
                    let what = match reload.interrupted {
                        true => " (cut short by a stop)",
                        false => "",
                    };
                    say(
                        &mut out,
                        &format!(
                            "reload failed{what}: {replaced} replaced, {} kept their old worker in {took:.1}s",
                            reload.failed.len()
                        ),
                    );
                }
            }
        }
        (
            Request::Scale { .. },
            Response {
                scale: Some(scale), ..
            },
        ) => {
            say(&mut out, &format!("scaled to {} workers", scale.workers));
        }
        (Request::Stop { .. }, Response { ok: true, .. }) => say(&mut out, "stopped"),
        _ => {}
    }
    if !response.ok {
        let reason = response.error.as_deref().unwrap_or("refused");
        bail!("{reason}");
    }
    Ok(true)
}

/// The socket a subcommand talks to: `--control`, `--name`'s default path, or the only
/// socket in the default directory.
fn resolve(target: &Target) -> anyhow::Result<PathBuf> {
    if let Some(path) = &target.control {
        return Ok(path.clone());
    }
    if let Some(name) = &target.name {
        if !control::valid_name(name) {
            bail!("--name {name:?}: a name is 1 to 64 of A-Z a-z 0-9 . _ -");
        }
        return Ok(control::default_path(name));
    }
    let dir = control::default_dir();
    let names = running(&dir);
    match names.as_slice() {
        [only] => Ok(control::default_path(only)),
        [] => bail!(
            "no running cluster found in {} (give --name NAME or --control PATH)",
            dir.display()
        ),
        several => bail!(
            "several clusters run ({}): pick one with --name",
            several.join(", ")
        ),
    }
}

/// The names of the sockets in `dir` that a primary answers on.
fn running(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let name = name.strip_suffix(".sock")?.to_owned();
            std::os::unix::net::UnixStream::connect(e.path()).ok()?;
            Some(name)
        })
        .collect();
    names.sort();
    names
}

/// The name a running cluster goes by when `--name` is not given: its program's file
/// name without the extension (`app.js` is `app`), made a valid name.
pub(crate) fn default_name(program: &Path) -> String {
    let stem = program
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cleaned: String = stem
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                true => c,
                false => '-',
            },
        )
        .take(48)
        .collect();
    let cleaned = cleaned.trim_start_matches('.').to_owned();
    match cleaned.is_empty() {
        true => "cluster".to_owned(),
        false => cleaned,
    }
}

/// Where the running command's control socket goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SocketPath {
    /// `--control PATH` or `--name NAME`: that path or none.
    Chosen(PathBuf),
    /// The program's name: `DIR/NAME.sock`, or `DIR/NAME-PID.sock` when a cluster of
    /// that name already runs (`cluster status` without `--name` lists both).
    Default { path: PathBuf, fallback: PathBuf },
}

impl SocketPath {
    pub(crate) fn new(
        explicit: Option<&Path>,
        name: Option<&str>,
        program: &Path,
    ) -> anyhow::Result<Self> {
        if let Some(path) = explicit {
            return Ok(Self::Chosen(path.to_owned()));
        }
        if let Some(name) = name {
            if !control::valid_name(name) {
                bail!("--name {name:?}: a name is 1 to 64 of A-Z a-z 0-9 . _ -");
            }
            return Ok(Self::Chosen(control::default_path(name)));
        }
        let name = default_name(program);
        remove_stale(&control::default_dir());
        Ok(Self::Default {
            path: control::default_path(&name),
            fallback: control::default_path(&format!("{name}-{}", std::process::id())),
        })
    }

    /// The path to try first.
    pub(crate) fn first(&self) -> &Path {
        match self {
            Self::Chosen(path) | Self::Default { path, .. } => path,
        }
    }

    /// The path to try when a running cluster answers on the first one.
    pub(crate) fn fallback(&self) -> Option<&Path> {
        match self {
            Self::Chosen(_) => None,
            Self::Default { fallback, .. } => Some(fallback),
        }
    }
}

/// Removes the sockets in the default directory that nobody answers on: left by
/// clusters that were killed (a running primary always answers).
fn remove_stale(dir: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let stale = entry.file_type().is_ok_and(|t| t.is_socket())
            && entry.file_name().to_string_lossy().ends_with(".sock")
            && matches!(
                std::os::unix::net::UnixStream::connect(entry.path()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The status table.
pub(crate) fn render(status: &Status) -> String {
    let mut text = format!(
        "cluster pid {} · policy {} · up {} · {}",
        status.pid,
        status.policy,
        duration(status.uptime_ms),
        match (status.stopping, status.ready) {
            (true, _) => "stopping",
            (false, true) => "ready",
            (false, false) => "not ready",
        }
    );
    if let Some(reload) = &status.reload {
        text += &format!(" · reloading {}/{}", reload.done, reload.total);
    }
    if let Some(last) = &status.last_reload {
        text += &match last.failed.is_empty() && !last.interrupted {
            true => format!(" · last reload ok in {:.1}s", last.took_ms as f64 / 1000.0),
            false => format!(" · last reload FAILED for {} slots", last.failed.len()),
        };
    }
    if status.queued > 0 {
        text += &format!(" · {} connections waiting", status.queued);
    }
    text.push('\n');
    let header = [
        "SLOT",
        "WORKER",
        "PID",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "LAST EXIT",
        "CPU",
        "RSS",
        "HANDED",
        "LISTENING",
        "BUILD",
    ];
    let dash = || "-".to_owned();
    let rows: Vec<[String; 12]> = status
        .workers
        .iter()
        .map(|r| {
            [
                r.slot.map_or_else(|| "spare".to_owned(), |s| s.to_string()),
                r.worker.map_or_else(dash, |w| w.to_string()),
                r.pid.map_or_else(dash, |p| p.to_string()),
                r.state.clone(),
                r.uptime_ms.map_or_else(dash, duration),
                r.restarts.to_string(),
                r.last_exit.clone().unwrap_or_else(dash),
                r.cpu_percent.map_or_else(dash, |c| format!("{c:.1}%")),
                r.rss_bytes.map_or_else(dash, bytes),
                r.handed.map_or_else(dash, |h| h.to_string()),
                match r.listening.is_empty() {
                    true => dash(),
                    false => r.listening.join(","),
                },
                r.build.clone().unwrap_or_else(dash),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut line = String::new();
        for (cell, width) in cells.iter().zip(widths) {
            line += &format!("{cell:<width$}  ");
        }
        line.trim_end().to_owned() + "\n"
    };
    text += &line(&header.map(str::to_owned));
    for row in &rows {
        text += &line(row);
    }
    text.trim_end().to_owned()
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn bytes(b: u64) -> String {
    match b {
        0..1024 => format!("{b} B"),
        1024..1_048_576 => format!("{:.0} KiB", b as f64 / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", b as f64 / 1_048_576.0),
        _ => format!("{:.2} GiB", b as f64 / 1_073_741_824.0),
    }
}

/// `64M`, `1.5G`, `512K`, `1000000` (bytes): the size of `--max-memory-restart`.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (64M, 1.5G, 512K)"))?;
    let scale: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KB" | "KIB" => 1024.0,
        "M" | "MB" | "MIB" => 1024.0 * 1024.0,
        "G" | "GB" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (K, M, G)")),
    };
    let size = value * scale;
    if !(size.is_finite() && size >= 1.0 && size < 2f64.powi(63)) {
        return Err(format!("{text:?} is not a size of at least one byte"));
    }
    Ok(size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in ["", "M", "-1M", "64X", "0", "1e30G"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_names_come_from_the_program_file() {
        assert_eq!(default_name(Path::new("/srv/app.js")), "app");
        assert_eq!(
            default_name(Path::new("./target/release/my-server")),
            "my-server"
        );
        assert_eq!(default_name(Path::new("we ird$.mjs")), "we-ird-");
        assert_eq!(default_name(Path::new("/")), "cluster");
        assert!(control::valid_name(&default_name(Path::new(".hidden.js"))));
    }

    #[test]
    fn the_table_has_a_row_per_worker_under_the_header() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "pid": 10, "policy": "rr", "uptime_ms": 61000, "ready": true, "stopping": false,
            "queued": 0,
            "workers": [
                {"slot": 0, "worker": 4, "pid": 4321, "state": "listening", "uptime_ms": 1500,
                 "restarts": 1, "last_exit": "signal (signal 9)", "cpu_percent": 0.5,
                 "rss_bytes": 47_185_920u64, "handed": 12, "listening": ["127.0.0.1:3000"],
                 "build": "0badf00d"},
                {"slot": 1, "state": "restarting", "restarts": 2, "listening": []}
            ]
        }))
        .expect("status");
        let table = render(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("pid 10") && lines[0].contains("up 1m01s"));
        assert!(lines[1].starts_with("SLOT  WORKER  PID"));
        assert!(lines[2].contains("4321") && lines[2].contains("45.0 MiB"));
        assert!(lines[2].contains("signal (signal 9)") && lines[2].contains("0badf00d"));
        assert!(lines[3].contains("restarting"));
    }
}
