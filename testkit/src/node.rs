//! Node 20 as a benchmark peer: whether it is installed, and running a peer script that
//! prints one JSON line `{"seconds": <elapsed>}`.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How to install the peer, for "not installed" notes.
pub const NODE_INSTALL_HINT: &str = "install Node.js 20, e.g. apt-get install nodejs";

/// Whether `node --version` runs and succeeds.
pub fn node_available() -> bool {
    Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why a Node peer script gave no timing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// `node` could not be started.
    #[error("cannot run node")]
    Spawn(#[source] std::io::Error),
    /// The script failed.
    #[error("node failed: {stderr}")]
    Failed {
        /// What it printed on standard error.
        stderr: String,
    },
    /// The script printed something else than its timing line.
    #[error("unexpected node output ({source}): {stdout}")]
    Output {
        /// What it printed.
        stdout: String,
        /// Why that is not a timing line.
        source: serde_json::Error,
    },
}

/// The one line a Node peer script prints.
#[derive(serde::Deserialize)]
struct NodeTiming {
    seconds: f64,
}

/// Runs `node <script> <args>` and returns the time the script reported.
pub fn node_timing<I, S>(script: &Path, args: I) -> Result<Duration, NodeError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new("node")
        .arg(script)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NodeError::Spawn)?;
    if !out.status.success() {
        return Err(NodeError::Failed {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    parse_timing(&out.stdout)
}

fn parse_timing(stdout: &[u8]) -> Result<Duration, NodeError> {
    let timing: NodeTiming =
        serde_json::from_slice(stdout).map_err(|source| NodeError::Output {
            stdout: String::from_utf8_lossy(stdout).into_owned(),
            source,
        })?;
    Duration::try_from_secs_f64(timing.seconds).map_err(|_| NodeError::Output {
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        source: serde::de::Error::custom("seconds is not a duration"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_timing_line() {
        let d = parse_timing(b"{\"seconds\": 1.5}\n").unwrap();
        assert_eq!(d, Duration::from_millis(1500));
        assert!(matches!(
            parse_timing(b"1.5"),
            Err(NodeError::Output { .. })
        ));
        assert!(matches!(
            parse_timing(b"{\"seconds\": -1}"),
            Err(NodeError::Output { .. })
        ));
    }
}
