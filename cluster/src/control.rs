//! The control socket: how a running primary is seen and steered from outside
//! (`cluster status | reload | scale | stop`). The server side runs in the primary
//! ([`Settings::control_socket`](crate::Settings::control_socket)); this module is the
//! protocol both sides share, where the socket lives by default, and a blocking
//! [`Client`].
//!
//! # Protocol
//!
//! A Unix stream socket (mode 0600, in a directory only its owner may write). The client
//! writes one request, a JSON object on one line of at most [`MAX_REQUEST`] bytes; the
//! primary answers with one JSON line and closes the connection:
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"status":{"pid":4242,"policy":"rr","ready":true,...,"workers":[...]}}
//! -> {"cmd":"reload"}                         (answered once every slot was dealt with)
//! <- {"ok":true,"reload":{"replaced":[0,1],"failed":[],"took_ms":812,"interrupted":false}}
//! -> {"cmd":"scale","workers":4}              (answered once the count is reached)
//! <- {"ok":true,"scale":{"workers":4}}
//! -> {"cmd":"stop","grace_ms":5000}           (answered once every worker has exited)
//! <- {"ok":true}
//! <- {"ok":false,"error":"..."}               (any request that could not be done)
//! ```
//!
//! `reload` answers `"ok":false` with the report when a slot kept its old worker. A
//! peer whose uid is neither the primary's nor root is answered `"ok":false` and
//! closed. At most [`MAX_CLIENTS`] connections are served at once (more are answered
//! `busy`); a request must arrive within [`REQUEST_TIMEOUT`] and an answer is written
//! within it too, so no client can hold the primary's memory or its loop.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The most workers `scale` asks for (the `cluster` command's `--workers` cap too).
pub const MAX_WORKERS: usize = 1024;

/// The longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 << 10;

/// How many control connections are served at once.
pub const MAX_CLIENTS: usize = 16;

/// How long a client may take to send its request, and the primary to write an answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest answer a [`Client`] reads, in bytes (a status of 1024 workers fits).
pub const MAX_RESPONSE: usize = 8 << 20;

/// A request to a running primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// The status table.
    Status,
    /// A rolling reload, answered when it has ended.
    Reload,
    /// Add or remove workers until there are this many, answered when they listen (or
    /// have exited).
    Scale {
        /// The count wanted.
        workers: usize,
    },
    /// A graceful stop, answered when every worker has exited.
    Stop {
        /// How long the workers may drain (default: the primary's drain deadline).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grace_ms: Option<u64>,
    },
}

/// The primary's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Response {
    /// Whether the request was done (a reload: every slot replaced).
    pub ok: bool,
    /// Why not, when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The answer to `reload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<Reload>,
    /// The answer to `scale`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<Scale>,
}

impl Response {
    /// A request that was done, with nothing to say.
    pub fn done() -> Self {
        Self {
            ok: true,
            error: None,
            status: None,
            reload: None,
            scale: None,
        }
    }

    /// A request that could not be done.
    pub fn failed(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(error.into()),
            ..Self::done()
        }
    }
}

/// A running primary's status (`cluster status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// The primary's process id.
    pub pid: u32,
    /// `rr`, `shared` or `reuseport`.
    pub policy: String,
    /// How long the primary has run, in milliseconds.
    pub uptime_ms: u64,
    /// Every slot has a worker listening and no stop has begun.
    pub ready: bool,
    /// A stop has begun.
    pub stopping: bool,
    /// The reload in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reload: Option<ReloadProgress>,
    /// How the last reload ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<Reload>,
    /// One row per live worker (a slot being reloaded has two), then one per slot
    /// without a worker, ordered by slot.
    pub workers: Vec<WorkerRow>,
    /// Connections waiting in the primary for a worker (round-robin).
    pub queued: usize,
}

/// A reload in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReloadProgress {
    /// Slots dealt with so far.
    pub done: usize,
    /// Slots in all.
    pub total: usize,
    /// The slot being replaced now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Reload {
    /// The slots replaced.
    pub replaced: Vec<usize>,
    /// The slots that kept their old worker.
    pub failed: Vec<ReloadFailure>,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
    /// A stop cut it short.
    pub interrupted: bool,
}

/// A slot a reload could not replace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReloadFailure {
    /// The slot.
    pub slot: usize,
    /// The new worker that failed (none when none could start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u64>,
    /// The old worker, still serving.
    pub kept: u64,
    /// Why, in words.
    pub reason: String,
}

/// The answer to `scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Scale {
    /// The worker count reached.
    pub workers: usize,
}

/// One row of the status table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerRow {
    /// The slot (`None` for a warm spare, which has none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<usize>,
    /// The worker's id, if the slot has a worker (not while it waits to restart one, or
    /// once given up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<u64>,
    /// Its process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `starting`, `online`, `listening`, `draining`, `spare` (a warm spare, booted and
    /// waiting to take a slot); for a slot without a worker, `restarting` or `failed`.
    pub state: String,
    /// How long the worker has run, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// How many times the slot started a worker after its first.
    pub restarts: u32,
    /// Why the slot's last worker ended (`crash`, `signal`, `asked`, `disconnect`,
    /// `memory limit`), with its status (`exit code 1`, `signal 9`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// CPU use over the last second, percent of one core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Resident set size, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Connections handed to it by round-robin (`None` under other policies, where the
    /// workers accept themselves and the primary does not see them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handed: Option<u64>,
    /// Where it listens.
    pub listening: Vec<String>,
    /// Which build of the program it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
}

/// Why talking to a primary failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No primary answers there (no socket file, or a stale one).
    #[error("no running cluster answers on {path}")]
    NotRunning {
        /// The socket's path.
        path: PathBuf,
    },
    /// The socket is there but this user may not use it.
    #[error("permission denied on {path} (the control socket is its owner's and root's only)")]
    PermissionDenied {
        /// The socket's path.
        path: PathBuf,
    },
    /// Reading or writing failed.
    #[error("control socket {path}")]
    Io {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not the protocol's.
    #[error("control socket {path}: malformed answer: {reason}")]
    Protocol {
        /// The socket's path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// A blocking client of a primary's control socket: one connection per request.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    /// How long an answer may take (a reload's or a stop's is long).
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the socket at `path`. Answers are awaited without a time limit
    /// (a reload lasts as long as its workers take to listen): see
    /// [`timeout`](Client::timeout).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            timeout: None,
        }
    }

    /// Gives up on an answer after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and returns the answer (which may say `ok: false`).
    pub fn call(&self, request: &Request) -> Result<Response, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ControlError::NotRunning {
                    path: self.path.clone(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ControlError::PermissionDenied {
                path: self.path.clone(),
            },
            _ => io(e),
        })?;
        stream
            .set_write_timeout(Some(REQUEST_TIMEOUT))
            .map_err(io)?;
        stream.set_read_timeout(self.timeout).map_err(io)?;
        let mut line = serde_json::to_vec(request).map_err(|e| io(e.into()))?;
        line.push(b'\n');
        match stream.write_all(&line) {
            // Refused at once (another user), the answer already sent: read it.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) => {}
            other => other.map_err(io)?,
        }
        let mut reader = BufReader::new(std::io::Read::take(stream, MAX_RESPONSE as u64));
        let mut answer = String::new();
        reader.read_line(&mut answer).map_err(io)?;
        if answer.is_empty() {
            return Err(ControlError::Protocol {
                path: self.path.clone(),
                reason: "the primary closed the connection without an answer".into(),
            });
        }
        serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }
}

/// The directory control sockets go in by default: `/run/cluster` for root,
/// `$XDG_RUNTIME_DIR/cluster` for anyone else, or `/tmp/cluster-UID` when
/// `XDG_RUNTIME_DIR` is not set.
pub fn default_dir() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/cluster");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| Path::new(d).is_absolute()) {
        Some(dir) => Path::new(&dir).join("cluster"),
        None => PathBuf::from(format!("/tmp/cluster-{uid}")),
    }
}

/// The default control socket of the cluster named `name`: `DIR/NAME.sock` in
/// [`default_dir`].
pub fn default_path(name: &str) -> PathBuf {
    default_dir().join(format!("{name}.sock"))
}

/// Whether `name` can name a control socket: 1 to 64 of `[A-Za-z0-9._-]`, not starting
/// with a dot.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_object_tagged_by_cmd() {
        let line = serde_json::to_string(&Request::Scale { workers: 4 }).expect("encode");
        assert_eq!(line, r#"{"cmd":"scale","workers":4}"#);
        let stop: Request = serde_json::from_str(r#"{"cmd":"stop"}"#).expect("decode");
        assert_eq!(stop, Request::Stop { grace_ms: None });
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"scale"}"#).is_err());
    }

    #[test]
    fn names_are_file_names_that_stay_in_their_directory() {
        assert!(valid_name("app") && valid_name("my-app.v2_1"));
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_client_of_a_socket_that_is_not_there_says_nothing_runs() {
        let dir = std::env::temp_dir().join(format!("cluster-control-{}", std::process::id()));
        let error = Client::new(dir.join("none.sock"))
            .call(&Request::Status)
            .expect_err("nothing there");
        assert!(matches!(error, ControlError::NotRunning { .. }), "{error}");
    }
}
