//! [`SpawnOptions`] and [`Stdio`]: everything Node's `spawn` options cover, as a builder.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::signal::Signal;

/// What a child's stdio slot is connected to (one entry of Node's `stdio` array).
///
/// Slots 0, 1 and 2 are stdin, stdout and stderr; slots past 2 become fds 3, 4, ... in the
/// child. A slot that is not set past 2 is closed in the child.
#[derive(Debug)]
#[non_exhaustive]
pub enum Stdio {
    /// A new pipe (slots 0-2) or a Unix stream socket pair (slots past 2); the parent's end
    /// is available on the [`Child`](crate::Child). Node's `'pipe'`.
    Pipe,
    /// The parent's own fd of the same number. Node's `'inherit'`.
    Inherit,
    /// `/dev/null`. Node's `'ignore'` for slots 0-2.
    Null,
    /// This fd, placed at the slot (the parent's copy is closed after spawning).
    Fd(OwnedFd),
    /// The IPC channel (at most one slot): a socket pair whose child end is at this slot and
    /// whose number the child finds in the `ipc::CHANNEL_FD_ENV` variable, or in Node's
    /// `NODE_CHANNEL_FD` with [`SpawnOptions::serialization`] `Json`. Node's `'ipc'`.
    Ipc,
}

impl From<OwnedFd> for Stdio {
    fn from(fd: OwnedFd) -> Self {
        Self::Fd(fd)
    }
}

/// Changes to the environment the child starts with.
#[derive(Debug, Clone, Default)]
pub(crate) struct EnvChanges {
    /// Start from an empty environment instead of this process's.
    pub(crate) clear: bool,
    /// In order: `Some` sets, `None` removes.
    pub(crate) vars: Vec<(OsString, Option<OsString>)>,
}

/// Options for [`spawn`](crate::spawn), as a builder. Defaults match Node: stdio
/// `[pipe, pipe, pipe]`, the parent's environment and working directory, kill signal
/// `SIGTERM`, no timeout.
///
/// ```
/// use std::time::Duration;
/// use child::{SpawnOptions, Stdio};
///
/// let options = SpawnOptions::new()
///     .cwd("/tmp")
///     .env("GREETING", "hi")
///     .stdin(Stdio::Null)
///     .timeout(Duration::from_secs(5));
/// # drop(options);
/// ```
#[derive(Debug)]
pub struct SpawnOptions {
    pub(crate) cwd: Option<PathBuf>,
    pub(crate) env: EnvChanges,
    pub(crate) argv0: Option<OsString>,
    pub(crate) stdio: Vec<Option<Stdio>>,
    pub(crate) detached: bool,
    pub(crate) own_group: bool,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) shell: Option<PathBuf>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) kill_signal: Signal,
    pub(crate) cancel: Option<Cancel>,
    pub(crate) kill_on_drop: bool,
    /// Set by `fork`: passed to the child in the environment (see `fork::channel`).
    pub(crate) parent_death_signal: Option<Signal>,
    /// The format of the `Stdio::Ipc` channel.
    pub(crate) serialization: ipc::Format,
    /// The limits of the `Stdio::Ipc` channel (its format is `serialization`).
    pub(crate) channel_config: ipc::Config,
}

impl Default for SpawnOptions {
    fn default() -> Self {
        Self {
            cwd: None,
            env: EnvChanges::default(),
            argv0: None,
            stdio: vec![Some(Stdio::Pipe), Some(Stdio::Pipe), Some(Stdio::Pipe)],
            detached: false,
            own_group: false,
            uid: None,
            gid: None,
            shell: None,
            timeout: None,
            kill_signal: Signal::SIGTERM,
            cancel: None,
            kill_on_drop: false,
            parent_death_signal: None,
            serialization: ipc::Format::Postcard,
            channel_config: ipc::Config::new(),
        }
    }
}

impl SpawnOptions {
    /// Node's defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// The child's working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Sets one environment variable (on top of the inherited environment, unless
    /// [`SpawnOptions::env_clear`] was called).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .vars
            .push((key.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Sets several environment variables.
    pub fn envs<K: AsRef<OsStr>, V: AsRef<OsStr>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// Removes one variable from the child's environment.
    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.env.vars.push((key.as_ref().to_owned(), None));
        self
    }

    /// Starts from an empty environment: only variables set after this call are passed
    /// (Node's `env: {...}`, which replaces the environment).
    pub fn env_clear(mut self) -> Self {
        self.env = EnvChanges {
            clear: true,
            vars: Vec::new(),
        };
        self
    }

    /// The child's `argv[0]` (defaults to the program as given).
    pub fn argv0(mut self, argv0: impl AsRef<OsStr>) -> Self {
        self.argv0 = Some(argv0.as_ref().to_owned());
        self
    }

    /// Slot 0.
    pub fn stdin(self, stdio: Stdio) -> Self {
        self.stdio(0, stdio)
    }

    /// Slot 1.
    pub fn stdout(self, stdio: Stdio) -> Self {
        self.stdio(1, stdio)
    }

    /// Slot 2.
    pub fn stderr(self, stdio: Stdio) -> Self {
        self.stdio(2, stdio)
    }

    /// Any slot: past 2 it becomes that fd number in the child. Slots past 2 that are never
    /// set are closed in the child.
    pub fn stdio(mut self, slot: usize, stdio: Stdio) -> Self {
        if self.stdio.len() <= slot {
            self.stdio.resize_with(slot + 1, || None);
        }
        self.stdio[slot] = Some(stdio);
        self
    }

    /// Starts the child in a new session and process group (`setsid`), so it is not killed
    /// with the parent's terminal or group and can outlive the parent. Node's `detached`.
    pub fn detached(mut self, detached: bool) -> Self {
        self.detached = detached;
        self
    }

    /// Starts the child in a process group of its own, in this process's session (std's
    /// `process_group(0)`): a signal to this process's group (a terminal's Ctrl-C) does
    /// not reach it and [`Child::kill_group`](crate::Child::kill_group) works, while it
    /// stays in this session, and so in this session's scheduling group (with Linux's
    /// autogroup, each session shares the CPU as one: children that start sessions of
    /// their own each get a share as large as everything else this session runs).
    /// [`detached`](Self::detached) implies it.
    pub fn process_group(mut self, own: bool) -> Self {
        self.own_group = own;
        self
    }

    /// Runs the child as this user id (uses the slower fork path).
    pub fn uid(mut self, uid: u32) -> Self {
        self.uid = Some(uid);
        self
    }

    /// Runs the child with this group id (uses the slower fork path).
    pub fn gid(mut self, gid: u32) -> Self {
        self.gid = Some(gid);
        self
    }

    /// Runs the program through this shell as `<shell> -c "<program> <args...>"` (the
    /// program and arguments are joined with spaces, unquoted, as Node does). Use `/bin/sh`
    /// for Node's `shell: true`.
    pub fn shell(mut self, shell: impl Into<PathBuf>) -> Self {
        self.shell = Some(shell.into());
        self
    }

    /// Kills the child with the kill signal if it is still running after this long.
    /// `Duration::ZERO` means no timeout, as `timeout: 0` (the default) does in Node.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// The signal used by the timeout, cancellation and `max_buffer` (default `SIGTERM`).
    pub fn kill_signal(mut self, signal: Signal) -> Self {
        self.kill_signal = signal;
        self
    }

    /// Kills the child with the kill signal once `cancelled` completes (Node's `signal`
    /// option with an `AbortController`). Any future does: with tokio-util's
    /// `CancellationToken`, pass `token.clone().cancelled_owned()`; with a oneshot channel,
    /// `async move { let _ = rx.await; }`.
    pub fn cancel_on(mut self, cancelled: impl Future<Output = ()> + Send + 'static) -> Self {
        self.cancel = Some(Cancel::new(cancelled));
        self
    }

    /// Sends `SIGKILL` when the [`Child`](crate::Child) handle is dropped while the process
    /// still runs (it is reaped in the background either way).
    pub fn kill_on_drop(mut self, kill_on_drop: bool) -> Self {
        self.kill_on_drop = kill_on_drop;
        self
    }

    /// The format of the [`Stdio::Ipc`] channel (Node's `serialization` option): this
    /// workspace's postcard frames (the default, with `IPC_CHANNEL_FD` in the child's
    /// environment) or [`ipc::Format::Json`], Node's own, with `NODE_CHANNEL_FD` and
    /// `NODE_CHANNEL_SERIALIZATION_MODE=json`, so that a Node program finds its
    /// `process.send`.
    pub fn serialization(mut self, format: ipc::Format) -> Self {
        self.serialization = format;
        self
    }

    /// The limits and buffers of the [`Stdio::Ipc`] channel on this side (frame size,
    /// descriptors per message, hold-back of a JSON channel...; default
    /// [`ipc::Config::new`]). Its format is always [`serialization`](Self::serialization)'s.
    pub fn channel_config(mut self, config: ipc::Config) -> Self {
        self.channel_config = config;
        self
    }

    /// Takes the fields used by the capture loops (`exec`, `spawn_sync`), which enforce
    /// timeout and cancellation themselves.
    pub(crate) fn take_deadlines(&mut self) -> (Option<Duration>, Option<Cancel>) {
        (self.timeout.take(), self.cancel.take())
    }
}

/// The future of [`SpawnOptions::cancel_on`]. In a `Mutex` so that the options stay
/// `Sync` whatever the future is; it is only ever polled by one owner.
pub(crate) struct Cancel(Mutex<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Cancel {
    fn new(cancelled: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(Mutex::new(Box::pin(cancelled)))
    }

    /// Completes when the caller's future does.
    pub(crate) async fn cancelled(self) {
        self.0
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
            .await;
    }
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cancel(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_past_two_leave_gaps_unset() {
        let options = SpawnOptions::new()
            .stdio(5, Stdio::Null)
            .stdin(Stdio::Inherit);
        assert_eq!(options.stdio.len(), 6);
        assert!(matches!(options.stdio[0], Some(Stdio::Inherit)));
        assert!(matches!(options.stdio[1], Some(Stdio::Pipe)));
        assert!(options.stdio[3].is_none() && options.stdio[4].is_none());
        assert!(matches!(options.stdio[5], Some(Stdio::Null)));
    }

    #[test]
    fn env_clear_drops_earlier_changes() {
        let options = SpawnOptions::new()
            .env("A", "1")
            .env_clear()
            .env("B", "2")
            .env_remove("C");
        assert!(options.env.clear);
        assert_eq!(
            options.env.vars,
            vec![("B".into(), Some("2".into())), ("C".into(), None)]
        );
    }
}
