//! The primary's settings: what to run, how many, how connections are scheduled, how
//! dead workers are replaced and how long a stopping worker may drain.

use std::ffi::OsString;
use std::str::FromStr;
use std::time::Duration;

/// The environment variable that overrides [`Settings::policy`]: `rr`, `shared` or
/// `reuseport` (Node's `NODE_CLUSTER_SCHED_POLICY`, which knows `rr` and `none`; `none`
/// is accepted as `shared`).
pub const SCHED_POLICY_ENV: &str = "CLUSTER_SCHED_POLICY";

/// How connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Policy {
    /// The primary accepts and hands each connection to the worker idle the longest
    /// (Node's `SCHED_RR`, the default).
    #[default]
    RoundRobin,
    /// The primary binds one socket; every worker accepts on it (Node's `SCHED_NONE`).
    Shared,
    /// The primary creates one `SO_REUSEPORT` socket per worker slot, kept across
    /// restarts of that slot; the kernel spreads connections over them.
    ReusePort,
}

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rr" | "round-robin" => Ok(Self::RoundRobin),
            "shared" | "none" => Ok(Self::Shared),
            "reuseport" => Ok(Self::ReusePort),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

impl Policy {
    /// `rr`, `shared` or `reuseport`, as the `cluster` command spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RoundRobin => "rr",
            Self::Shared => "shared",
            Self::ReusePort => "reuseport",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scheduling policy name that is not `rr`, `shared`, `none` or `reuseport`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduling policy {0:?} (expected rr, shared or reuseport)")]
pub struct UnknownPolicy(pub String);

/// When and how fast dead workers are replaced.
///
/// A worker that dies without being asked to stop is replaced at once if it had run for
/// [`stable_after`](RestartPolicy::stable_after) or if it is the slot's first crash within
/// the window; each further crash in a row waits a delay that starts at
/// [`backoff_min`](RestartPolicy::backoff_min) and doubles up to
/// [`backoff_max`](RestartPolicy::backoff_max). A stable run resets the delay. More than
/// the [`crash_loop_limit`](RestartPolicy::crash_loop_limit) of crashes of one slot within
/// its window mark the slot failed: it is no longer restarted.
///
/// A crash is an exit the primary did not ask for with a failure (a non-zero code or a
/// signal). A worker that leaves on its own without failing (it exits 0, or calls
/// [`Worker::disconnect`](crate::Worker::disconnect) or Node's `disconnect()`) after at
/// least [`min_uptime`](RestartPolicy::min_uptime) is being recycled: it is replaced at
/// once and not counted. One that leaves sooner counts as a crash, with the same backoff
/// and limit (PM2's `min_uptime`): a worker that returns `Ok(())` or disconnects right
/// after it starts, again and again, is a crash loop too. Exits the primary asked for
/// (disconnect, stop, reload, removal) are not crashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    pub(crate) enabled: bool,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) stable_after: Duration,
    pub(crate) min_uptime: Duration,
    pub(crate) max_restarts: u32,
    pub(crate) window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            enabled: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
            min_uptime: Duration::from_secs(1),
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// Restart with 100 ms growing to 10 s, reset after 10 s up, at most 10 crashes a
    /// minute per slot, recycling (an exit 0 or a worker's own disconnect) after 1 s up.
    pub fn new() -> Self {
        Self::default()
    }

    /// Never replace a dead worker (Node's behaviour).
    pub fn never() -> Self {
        Self {
            enabled: false,
            ..Self::default()
        }
    }

    /// The first delay before a replacement.
    pub fn backoff_min(mut self, delay: Duration) -> Self {
        self.backoff_min = delay;
        self
    }

    /// The largest delay before a replacement.
    pub fn backoff_max(mut self, delay: Duration) -> Self {
        self.backoff_max = delay;
        self
    }

    /// How long a worker must run for its crash not to count as a crash loop.
    pub fn stable_after(mut self, uptime: Duration) -> Self {
        self.stable_after = uptime;
        self
    }

    /// How long a worker that leaves on its own without failing must have run for its exit
    /// to be recycling rather than a crash (default 1 s, PM2's `min_uptime`).
    pub fn min_uptime(mut self, uptime: Duration) -> Self {
        self.min_uptime = uptime;
        self
    }

    /// At most `restarts` crashes within `window` before the slot is marked failed.
    pub fn crash_loop_limit(mut self, restarts: u32, window: Duration) -> Self {
        self.max_restarts = restarts;
        self.window = window;
        self
    }
}

/// Everything the primary needs to run its workers. Built with chained setters.
///
/// ```
/// use std::time::Duration;
/// let settings = cluster::Settings::new()
///     .workers(4)
///     .policy(cluster::Policy::ReusePort)
///     .drain_deadline(Duration::from_secs(5));
/// assert_eq!(settings.worker_count(), 4);
/// ```
#[derive(Debug, Clone)]
pub struct Settings {
    pub(crate) program: Option<OsString>,
    /// `None`: the primary's own arguments (Node's `process.argv.slice(2)`).
    pub(crate) args: Option<Vec<OsString>>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) workers: usize,
    pub(crate) policy: Policy,
    pub(crate) restart: RestartPolicy,
    pub(crate) drain_deadline: Duration,
    pub(crate) hold_connections: Duration,
    pub(crate) reload_timeout: Duration,
    pub(crate) handoff_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) wait_ready: bool,
    pub(crate) silent: bool,
    pub(crate) inherit_listeners: bool,
    pub(crate) upgrade_timeout: Duration,
    /// `Some(node)`: workers are Node programs run by `node`, spoken to in Node's protocol.
    pub(crate) node: Option<OsString>,
    /// Node's `execArgv` for Node workers (`--max-old-space-size=512`, ...).
    pub(crate) node_args: Vec<OsString>,
    /// Load the keep-alive-safe drain into Node workers.
    pub(crate) node_keepalive_drain: bool,
    /// Where the control socket is created, if anywhere.
    pub(crate) control_socket: Option<std::path::PathBuf>,
    /// Where `/metrics`, `/status` and `/readyz` are served, if anywhere.
    pub(crate) metrics: Option<std::net::SocketAddr>,
    /// How long a stop serves on, not ready, before the workers drain.
    pub(crate) stop_delay: Duration,
    /// The resident set size past which a worker is replaced.
    pub(crate) max_worker_rss: Option<u64>,
    /// How many warm spares to keep.
    pub(crate) warm_spares: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            program: None,
            args: None,
            env: Vec::new(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            policy: Policy::default(),
            restart: RestartPolicy::default(),
            drain_deadline: Duration::from_secs(30),
            hold_connections: Duration::from_secs(10),
            reload_timeout: Duration::from_secs(60),
            handoff_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            wait_ready: false,
            silent: false,
            inherit_listeners: true,
            upgrade_timeout: Duration::from_secs(60),
            node: None,
            node_args: Vec::new(),
            node_keepalive_drain: true,
            control_socket: None,
            metrics: None,
            stop_delay: Duration::ZERO,
            max_worker_rss: None,
            warm_spares: 0,
        }
    }
}

impl Settings {
    /// The defaults: the current executable with no arguments, one worker per CPU,
    /// round-robin, [`RestartPolicy::new`], a 30 s drain deadline, connections held 10 s
    /// while no worker can take them.
    pub fn new() -> Self {
        Self::default()
    }

    /// The program workers run (default: this executable's path, resolved once at
    /// [`Primary::start`](crate::Primary::start); see [`executable_path`]).
    pub fn program(mut self, program: impl Into<OsString>) -> Self {
        self.program = Some(program.into());
        self
    }

    /// The workers' arguments. By default workers get the primary's own arguments (all
    /// but the program name), as Node passes `process.argv.slice(2)`, so the one-binary
    /// pattern parses the same flags in both roles; set them (even to none) to override.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Adds a variable to the workers' environment (on top of this process's).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// How many workers to keep running.
    pub fn workers(mut self, count: usize) -> Self {
        self.workers = count;
        self
    }

    /// The configured number of workers.
    pub fn worker_count(&self) -> usize {
        self.workers
    }

    /// The scheduling policy, unless [`SCHED_POLICY_ENV`] says otherwise.
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// How dead workers are replaced.
    pub fn restart(mut self, restart: RestartPolicy) -> Self {
        self.restart = restart;
        self
    }

    /// How long a stopping worker may drain before it is killed.
    pub fn drain_deadline(mut self, deadline: Duration) -> Self {
        self.drain_deadline = deadline;
        self
    }

    /// How long a round-robin connection waits for a worker before it is closed (while no
    /// worker is alive, for instance between a crash and its replacement).
    pub fn hold_connections(mut self, hold: Duration) -> Self {
        self.hold_connections = hold;
        self
    }

    /// How long a rolling reload waits for a new worker to listen on as many servers as
    /// the one it replaces (default 60 s). Past it, the new worker is stopped, the old one
    /// keeps serving, [`Event::ReloadFailed`](crate::Event::ReloadFailed) says why, and the
    /// reload goes on with the next slot.
    pub fn reload_timeout(mut self, timeout: Duration) -> Self {
        self.reload_timeout = timeout;
        self
    }

    /// How long a worker with round-robin hand-offs in flight may answer none of them
    /// (default 10 s). Past it the worker counts as hung (frozen by `SIGSTOP`, a blocked
    /// event loop): it is killed ([`Event::Misbehaved`](crate::Event::Misbehaved)) and
    /// replaced, and its hand-offs go to other workers, so no client waits on it. Killing
    /// it first is what makes that safe: a frozen process that woke later would serve a
    /// connection another worker already served.
    pub fn handoff_timeout(mut self, timeout: Duration) -> Self {
        self.handoff_timeout = timeout;
        self
    }

    /// How long a new worker may take to connect to its channel and report online
    /// (default 10 s). Past it, [`Event::NotConnected`](crate::Event::NotConnected) says
    /// so (the program may not speak the protocol at all: neither a Node script nor built
    /// on this crate) and the worker is left running; if it is then asked to stop, it is
    /// sent `SIGTERM` as well as the disconnect it cannot read.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Whether a worker counts as ready only once it says so (PM2's `wait_ready`; default
    /// `false`): a Node worker with `process.send('ready')`, a Rust worker with
    /// [`Worker::ready`](crate::Worker::ready). Until then it is not counted by
    /// [`Stats::ready`](crate::Stats::ready), and a rolling reload waits for it (within
    /// [`reload_timeout`](Self::reload_timeout)) before it stops the worker it replaces.
    /// Without it, a worker is ready once it listens.
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = wait;
        self
    }

    /// Pipes the workers' stdin, stdout and stderr to nowhere instead of inheriting them.
    pub fn silent(mut self, silent: bool) -> Self {
        self.silent = silent;
        self
    }

    /// Whether the primary adopts the listening sockets passed to this process the systemd
    /// way (`LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`; default true): a worker's
    /// `listen(addr)` on an inherited socket's address uses that socket, under every policy.
    /// Only the first primary of a process can adopt them.
    pub fn inherit_listeners(mut self, inherit: bool) -> Self {
        self.inherit_listeners = inherit;
        self
    }

    /// How long [`Primary::upgrade`](crate::Primary::upgrade) waits for the new primary to
    /// be ready (default 60 s) before it kills it and keeps this one.
    pub fn upgrade_timeout(mut self, timeout: Duration) -> Self {
        self.upgrade_timeout = timeout;
        self
    }

    /// Workers are unmodified Node programs: [`program`](Self::program) is the script,
    /// run as `exec_path program args` (`exec_path` is `node`, or a path to it). The
    /// primary speaks Node's cluster protocol to them (`NODE_UNIQUE_ID`, a JSON channel):
    /// each `server.listen()` in the script asks this primary for its handle, and user
    /// messages are JSON both ways (`process.send` arrives as an
    /// [`Event::Message`](crate::Event::Message) to decode as a `serde_json::Value`).
    pub fn node(mut self, exec_path: impl Into<OsString>) -> Self {
        self.node = Some(exec_path.into());
        self
    }

    /// Node's `execArgv` for [`node`](Self::node) workers: options placed between the
    /// Node executable and the script (`node --max-old-space-size=512 app.js`).
    pub fn node_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.node_args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Whether Node workers drain keep-alive connections safely (default `true`). Node's
    /// own `server.close()`, which its cluster code calls when the primary disconnects a
    /// worker, destroys idle keep-alive connections at once, so a client whose next
    /// request is already on its way sees its connection drop: a failed request on every
    /// rolling reload under keep-alive load. With this on, each Node worker starts with a
    /// small module (`node --require` of a file written once under the temporary directory, or `--import data:...` when it cannot be; the program itself unchanged) by which a
    /// server closed while its worker disconnects answers every later request with
    /// `Connection: close` and destroys only the connections still idle after 1 s
    /// (`CLUSTER_DRAIN_IDLE_MS` in the worker's environment). Any other `close()` keeps
    /// Node's behaviour.
    pub fn node_keepalive_drain(mut self, on: bool) -> Self {
        self.node_keepalive_drain = on;
        self
    }

    /// Creates a control socket at `path` (a Unix stream socket, mode 0600, in a
    /// directory this process's user owns and nobody else may write; created 0700 if
    /// missing): `cluster status`, `reload`, `scale` and `stop` talk to it. A peer
    /// whose uid is neither this process's nor root is refused. A socket file left by a
    /// primary that was killed is replaced; one a running primary answers on is an
    /// error ([`Error::Control`](crate::Error::Control)). The file is removed when the
    /// primary stops. The protocol is described in the crate docs (*Control socket*).
    pub fn control_socket(mut self, path: impl Into<std::path::PathBuf>) -> Self {
        self.control_socket = Some(path.into());
        self
    }

    /// Serves `/metrics` (for Prometheus, in the OpenMetrics text format), `/status` (an
    /// HTML status page), `/readyz` (200 while the cluster is ready, else 503) and
    /// `/healthz` over HTTP/1 on `address` (port 0: any free port, see
    /// [`Primary::metrics_address`](crate::Primary::metrics_address)). Off by default.
    /// The address is bound by [`Primary::start`](crate::Primary::start), which fails
    /// with [`Error::Metrics`](crate::Error::Metrics) when it cannot be. The `metrics`
    /// feature (default).
    #[cfg(feature = "metrics")]
    pub fn metrics(mut self, address: std::net::SocketAddr) -> Self {
        self.metrics = Some(address);
        self
    }

    /// On a stop, the cluster turns not ready at once (`/readyz` answers 503,
    /// [`Stats::ready`](crate::Stats::ready) is false) and keeps serving for `delay`
    /// before the workers are asked to drain, so that a balancer whose health checks
    /// see the change stops sending first (Kubernetes' `preStop` sleep). Zero (the
    /// default): the drain begins at once.
    pub fn stop_delay(mut self, delay: Duration) -> Self {
        self.stop_delay = delay;
        self
    }

    /// Replaces a worker whose resident set size stays above `bytes` (two samples in
    /// a row, a second apart) gracefully: a new worker listening first, then the old
    /// one drains, one slot at a time (PM2's `max_memory_restart`). Its exit has the
    /// cause [`ExitCause::MemoryLimit`](crate::ExitCause::MemoryLimit).
    pub fn max_worker_rss(mut self, bytes: u64) -> Self {
        self.max_worker_rss = Some(bytes);
        self
    }

    /// Keeps `count` extra workers booted (PM2 and Node have no such thing): a spare runs
    /// the program up to its first `listen()`, whose query the primary holds unanswered
    /// until a slot needs a worker (a crash, a scale-up, a reload step); then the spare
    /// takes the slot and serves at once instead of after a boot, and a new spare is
    /// started. A spare is never handed connections; a reload replaces the spares by
    /// ones running the new code (old code is never promoted after a reload began); a
    /// slot with an environment of its own ([`Primary::fork_with_env`]) is never given
    /// a spare. Spares count in the events ([`Event::SparePromoted`]) and the stats
    /// ([`WorkerStats::spare`]). Zero (the default): none.
    ///
    /// [`Primary::fork_with_env`]: crate::Primary::fork_with_env
    /// [`Event::SparePromoted`]: crate::Event::SparePromoted
    /// [`WorkerStats::spare`]: crate::WorkerStats::spare
    pub fn warm_spares(mut self, count: usize) -> Self {
        self.warm_spares = count;
        self
    }

    /// Whether anything reads the workers' memory and CPU (so the primary samples them).
    pub(crate) fn samples_usage(&self) -> bool {
        self.control_socket.is_some() || self.metrics.is_some() || self.max_worker_rss.is_some()
    }

    /// The program workers run: [`program`](Self::program) if set, else
    /// [`executable_path`].
    pub(crate) fn resolved_program(&self) -> OsString {
        self.program.clone().unwrap_or_else(executable_path)
    }

    /// The policy in force: [`SCHED_POLICY_ENV`] if set and valid, else the configured one.
    pub(crate) fn effective_policy(&self) -> Policy {
        match std::env::var(SCHED_POLICY_ENV) {
            Ok(value) => value.parse().unwrap_or_else(|e: UnknownPolicy| {
                tracing::warn!(error = %e, "ignoring {SCHED_POLICY_ENV}");
                self.policy
            }),
            Err(_) => self.policy,
        }
    }
}

/// This executable's path on disk, resolved from `/proc/self/exe` when called.
///
/// A primary resolves it once, at start, and starts every worker (and an upgrade's new
/// primary) from that path, never from `/proc/self/exe`: once the file is replaced (a
/// `cargo build`, a package upgrade), `/proc/self/exe` still names the old, deleted
/// inode, while the path names the new file, which is what a reload should run. If the
/// file was already deleted at start, the kernel's ` (deleted)` suffix is dropped, so the
/// path is that of whatever file is installed there by the time a worker starts.
pub fn executable_path() -> OsString {
    match std::env::current_exe() {
        Ok(path) => {
            let path = path.into_os_string();
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
            match bytes.strip_suffix(b" (deleted)") {
                Some(live) => {
                    <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(live).to_owned()
                }
                None => path,
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot resolve this executable's path; using /proc/self/exe");
            "/proc/self/exe".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(name: &str, expected: Option<Policy>) {
        assert_eq!(name.parse::<Policy>().ok(), expected);
    }

    #[test]
    fn policy_names() {
        check("rr", Some(Policy::RoundRobin));
        check("shared", Some(Policy::Shared));
        check("none", Some(Policy::Shared));
        check("reuseport", Some(Policy::ReusePort));
        check("RR", None);
        check("", None);
    }

    #[test]
    fn unknown_policy_message_is_lowercase() {
        let err = "x".parse::<Policy>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown scheduling policy \"x\" (expected rr, shared or reuseport)"
        );
    }
}
