//! [`WorkerInfo`]: which `httpd-demo` worker answered or started, as the tests and
//! `cargo xtask demo` read it from `GET /worker` and from the primary's log.

use serde::Deserialize;

/// A worker of `httpd-demo`: its cluster id and its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WorkerInfo {
    /// The cluster's worker id (1, 2, ...; never reused).
    pub id: u64,
    /// The worker process's pid.
    pub pid: u32,
}

/// The body of `GET /worker`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    id: u64,
    pid: u32,
    #[serde(default)]
    build: Option<String>,
}

impl WorkerInfo {
    /// Parses the body of `GET /worker`: a JSON object with `id`, `pid` and optionally
    /// `build`, nothing else.
    pub fn from_json(body: &str) -> Result<Self, serde_json::Error> {
        Self::with_build(body).map(|(info, _)| info)
    }

    /// Parses the body of `GET /worker` with its `build` (which code the worker runs:
    /// httpd-demo's version and its binary's mtime), `None` if the body has none.
    pub fn with_build(body: &str) -> Result<(Self, Option<String>), serde_json::Error> {
        // An object first: a derived `Deserialize` would also take `[id, pid]`.
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(body)?;
        let Body { id, pid, build } = serde_json::from_value(object.into())?;
        Ok((Self { id, pid }, build))
    }

    /// Parses the `id=N` and `pid=P` fields of the primary's `worker started` log line.
    pub fn from_log_line(line: &str) -> Option<Self> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
        };
        Some(Self {
            id: field("id")?.parse().ok()?,
            pid: field("pid")?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_worker_body() {
        let expected = WorkerInfo { id: 4, pid: 1234 };
        assert_eq!(
            WorkerInfo::from_json("{\"id\": 4, \"pid\": 1234}\n").unwrap(),
            expected
        );
        assert_eq!(
            WorkerInfo::with_build("{\"id\": 4, \"pid\": 1234, \"build\": \"0.1.0+ab\"}").unwrap(),
            (expected, Some("0.1.0+ab".to_owned()))
        );
        for bad in [
            "{\"id\": 4}",
            "{\"id\": 4, \"pid\": 1234, \"x\": 1}",
            "[4, 1234]",
            "",
        ] {
            assert!(WorkerInfo::from_json(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_the_started_line() {
        let line = "2025-01-01T00:00:00Z  INFO httpd_demo: worker started id=3 pid=4242";
        assert_eq!(
            WorkerInfo::from_log_line(line),
            Some(WorkerInfo { id: 3, pid: 4242 })
        );
        assert_eq!(WorkerInfo::from_log_line("worker started id=3"), None);
        assert_eq!(WorkerInfo::from_log_line("worker started id=x pid=1"), None);
    }
}
