//! [`BenchLine`]: what a crate's side-by-side bench prints per subject in `--json` mode
//! and `cargo xtask bench` reads back, one JSON object per line:
//!
//! ```text
//! {"benchmark":"ipc_echo_64k","subject":"ipc_channel","unit":"msg/s","message_bytes":65536,"values":[41000.5,40877.1,41210.9]}
//! ```
//!
//! Benchmarks and subjects are enums with stable snake_case ids, so both sides name them
//! the same way; their labels (`ipc channel`, `node fork() IPC`) are for people only.
//! Other lines of a bench's output (notes such as `node: not installed`) do not start
//! with `{` and are skipped.

use serde::{Deserialize, Serialize};

/// The workloads of the crates' side-by-side benches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Benchmark {
    /// IPC echo of 16-byte messages (`ipc/benches/echo.rs`).
    #[serde(rename = "ipc_echo_16b")]
    IpcEcho16b,
    /// IPC echo of 64 KiB messages (`ipc/benches/echo.rs`).
    #[serde(rename = "ipc_echo_64k")]
    IpcEcho64k,
    /// Sequential spawn and wait of `/bin/true` (`child/benches/vs_node.rs`).
    #[serde(rename = "spawn_true")]
    SpawnTrue,
    /// Exec capturing 100 MB of stdout (`child/benches/vs_node.rs`).
    #[serde(rename = "exec_100mb")]
    Exec100mb,
}

impl Benchmark {
    /// The stable id, as in the JSON and in `cargo xtask bench`'s report.
    pub fn key(self) -> &'static str {
        match self {
            Benchmark::IpcEcho16b => "ipc_echo_16b",
            Benchmark::IpcEcho64k => "ipc_echo_64k",
            Benchmark::SpawnTrue => "spawn_true",
            Benchmark::Exec100mb => "exec_100mb",
        }
    }
}

/// The sides a bench measures: this workspace's code and its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Subject {
    /// An `ipc::Channel` between two processes.
    IpcChannel,
    /// A plain socketpair with a 4-byte length prefix.
    RawSocketpair,
    /// Node's `fork()` IPC channel.
    NodeForkIpc,
    /// An `ipc::Channel` speaking Node's JSON lines between two Rust processes.
    IpcJsonChannel,
    /// An `ipc::Channel` speaking Node's JSON lines with a Node child.
    IpcJsonNodeChild,
    /// `std::process::Command::status`.
    StdCommand,
    /// `child::spawn` and wait.
    ChildSpawn,
    /// `child::spawn` with an IPC slot at fd 3.
    ChildSpawnIpc,
    /// `child::spawn_sync`.
    ChildSpawnSync,
    /// Node's `child_process.spawn`.
    NodeSpawn,
    /// `std::process::Command::output`.
    StdOutput,
    /// `child::exec_file`.
    ChildExecFile,
    /// `child::exec` through `sh -c`.
    ChildExec,
    /// `child::exec_file_sync`.
    ChildExecFileSync,
    /// Node's `child_process.exec`.
    NodeExec,
}

impl Subject {
    /// The name shown in tables and reports.
    pub fn label(self) -> &'static str {
        match self {
            Subject::IpcChannel => "ipc channel",
            Subject::RawSocketpair => "raw socketpair",
            Subject::NodeForkIpc => "node fork() IPC",
            Subject::IpcJsonChannel => "ipc JSON, rust child",
            Subject::IpcJsonNodeChild => "ipc JSON, node child",
            Subject::StdCommand => "std::process::Command",
            Subject::ChildSpawn => "child::spawn",
            Subject::ChildSpawnIpc => "child::spawn + ipc slot",
            Subject::ChildSpawnSync => "child::spawn_sync",
            Subject::NodeSpawn => "node spawn",
            Subject::StdOutput => "std output()",
            Subject::ChildExecFile => "child::exec_file",
            Subject::ChildExec => "child::exec (sh -c)",
            Subject::ChildExecFileSync => "child::exec_file_sync",
            Subject::NodeExec => "node exec",
        }
    }

    /// Whether measuring it needs `node`.
    pub fn needs_node(self) -> bool {
        matches!(
            self,
            Subject::NodeForkIpc
                | Subject::IpcJsonNodeChild
                | Subject::NodeSpawn
                | Subject::NodeExec
        )
    }
}

/// The unit of a bench line's values. Higher is better for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Unit {
    /// Messages per second.
    #[serde(rename = "msg/s")]
    MessagesPerSec,
    /// Spawns (and waits) per second.
    #[serde(rename = "spawn/s")]
    SpawnsPerSec,
    /// Megabytes (10^6 bytes) per second.
    #[serde(rename = "MB/s")]
    MegabytesPerSec,
}

impl Unit {
    /// The unit as written in tables and in the JSON.
    pub fn label(self) -> &'static str {
        match self {
            Unit::MessagesPerSec => "msg/s",
            Unit::SpawnsPerSec => "spawn/s",
            Unit::MegabytesPerSec => "MB/s",
        }
    }
}

/// One subject's rounds of one benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchLine {
    /// The workload.
    pub benchmark: Benchmark,
    /// Who was measured.
    pub subject: Subject,
    /// The unit of `values`.
    pub unit: Unit,
    /// The message size, for workloads whose rate can also be read as bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_bytes: Option<u64>,
    /// One value per round, in the order the rounds ran.
    pub values: Vec<f64>,
}

impl BenchLine {
    /// The line as printed: one JSON object, no newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a bench line always serializes")
    }

    /// Every bench line in a bench's output; lines that do not start with `{` are notes
    /// and skipped, a line that starts with `{` and is not a bench line is an error.
    pub fn parse_all(output: &str) -> Result<Vec<Self>, serde_json::Error> {
        output
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(serde_json::from_str)
            .collect()
    }
}

/// The command-line flags every side-by-side bench takes after `--`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchArgs {
    /// `--quick`: fewer rounds.
    pub quick: bool,
    /// `--json`: print [`BenchLine`]s instead of a table.
    pub json: bool,
}

impl BenchArgs {
    /// Reads the flags from this process's arguments.
    pub fn from_env() -> Self {
        Self::parse(std::env::args())
    }

    /// Reads the flags from `args`, ignoring the others (cargo passes `--bench`).
    pub fn parse(args: impl IntoIterator<Item = String>) -> Self {
        let (mut quick, mut json) = (false, false);
        for arg in args {
            quick |= arg == "--quick";
            json |= arg == "--json";
        }
        Self { quick, json }
    }

    /// How many interleaved rounds to run: 3 with `--quick`, else 7.
    pub fn rounds(self) -> usize {
        if self.quick { 3 } else { 7 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_round_trips_through_json() {
        let line = BenchLine {
            benchmark: Benchmark::IpcEcho64k,
            subject: Subject::NodeForkIpc,
            unit: Unit::MessagesPerSec,
            message_bytes: Some(65536),
            values: vec![1000.5, 2000.25],
        };
        let json = line.to_json();
        assert_eq!(
            json,
            "{\"benchmark\":\"ipc_echo_64k\",\"subject\":\"node_fork_ipc\",\"unit\":\"msg/s\",\
             \"message_bytes\":65536,\"values\":[1000.5,2000.25]}"
        );
        assert_eq!(serde_json::from_str::<BenchLine>(&json).unwrap(), line);
    }

    #[test]
    fn message_bytes_are_optional() {
        let line = BenchLine {
            benchmark: Benchmark::SpawnTrue,
            subject: Subject::ChildSpawnIpc,
            unit: Unit::SpawnsPerSec,
            message_bytes: None,
            values: vec![],
        };
        assert!(!line.to_json().contains("message_bytes"));
        assert_eq!(BenchLine::parse_all(&line.to_json()).unwrap(), [line]);
    }

    #[test]
    fn keys_and_labels_match_the_json() {
        for b in [
            Benchmark::IpcEcho16b,
            Benchmark::IpcEcho64k,
            Benchmark::SpawnTrue,
            Benchmark::Exec100mb,
        ] {
            assert_eq!(
                serde_json::to_string(&b).unwrap(),
                format!("\"{}\"", b.key())
            );
        }
        for u in [
            Unit::MessagesPerSec,
            Unit::SpawnsPerSec,
            Unit::MegabytesPerSec,
        ] {
            assert_eq!(
                serde_json::to_string(&u).unwrap(),
                format!("\"{}\"", u.label())
            );
        }
    }

    #[test]
    fn notes_are_skipped_and_broken_lines_are_errors() {
        let out = "node: not installed\n\
            {\"benchmark\":\"exec_100mb\",\"subject\":\"std_output\",\"unit\":\"MB/s\",\"values\":[1.0]}\n";
        let lines = BenchLine::parse_all(out).unwrap();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].subject, Subject::StdOutput);
        assert!(BenchLine::parse_all("{\"benchmark\":\"nope\"}").is_err());
        assert!(BenchLine::parse_all("nothing").unwrap().is_empty());
    }

    #[test]
    fn flags() {
        let args = |a: &[&str]| BenchArgs::parse(a.iter().map(|s| s.to_string()));
        assert_eq!(
            args(&["echo", "--bench"]),
            BenchArgs {
                quick: false,
                json: false
            }
        );
        let both = args(&["echo", "--bench", "--quick", "--json"]);
        assert_eq!((both.quick, both.json, both.rounds()), (true, true, 3));
        assert_eq!(args(&[]).rounds(), 7);
    }
}
