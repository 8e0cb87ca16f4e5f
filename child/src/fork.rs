//! `fork`: Node's `child_process.fork`, that is starting a program with an IPC channel, never
//! `fork(2)`; and [`parent_channel`], the forked program's side.
//!
//! The channel is an `AF_UNIX` stream socket pair. The child's end is placed at fd 3 by a
//! posix_spawn file action and its number passed in [`ipc::CHANNEL_FD_ENV`]; the parent's
//! end becomes the [`Child`]'s channel.
//!
//! Parent-death signal: the parent passes `"<signal>:<parent pid>"` in
//! `CHILD_PARENT_DEATH_SIGNAL`, and [`parent_channel`] calls `prctl(PR_SET_PDEATHSIG)` and
//! then checks that its parent is still that pid (raising the signal if it is not). Doing it
//! child-side keeps the fast posix_spawn path; the price is that a child which never calls
//! [`parent_channel`] gets no parent-death signal.

use std::ffi::{OsStr, OsString};

use crate::signal::Signal;

use crate::channel_env::{PARENT_DEATH_ENV, ParentDeath};
use crate::child::{Child, spawn_with};
use crate::error::Error;
use crate::options::{SpawnOptions, Stdio};

/// Options for [`fork`]: Node's defaults are stdio `[inherit, inherit, inherit, ipc]`.
///
/// To fork a Node program as Node's `fork` does, set the JSON serialization and Node as
/// the program that runs it:
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let options = child::ForkOptions::new()
///     .serialization(child::Format::Json) // NODE_CHANNEL_FD, serialization 'json'
///     .exec_path("node");                 // runs `node worker.js`
/// let mut worker = child::fork("worker.js", child::NO_ARGS, options)?;
/// worker.send(&serde_json::json!({"job": 1})).await?; // process.on('message') in Node
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct ForkOptions {
    spawn: SpawnOptions,
    exec_path: Option<OsString>,
    exec_argv: Vec<OsString>,
}

impl Default for ForkOptions {
    fn default() -> Self {
        let spawn = SpawnOptions::new()
            .stdin(Stdio::Inherit)
            .stdout(Stdio::Inherit)
            .stderr(Stdio::Inherit);
        Self {
            spawn,
            exec_path: None,
            exec_argv: Vec::new(),
        }
    }
}

impl ForkOptions {
    /// Node's defaults (see the type's docs).
    pub fn new() -> Self {
        Self::default()
    }

    /// Pipes stdin, stdout and stderr instead of inheriting them (Node's `silent: true`).
    pub fn silent(mut self) -> Self {
        self.spawn = self
            .spawn
            .stdin(Stdio::Pipe)
            .stdout(Stdio::Pipe)
            .stderr(Stdio::Pipe);
        self
    }

    /// Asks the child to receive `signal` when this process dies (Linux `PR_SET_PDEATHSIG`;
    /// the parent is the thread that spawned, see the crate's `# Caveats`). It is set in
    /// the child before it executes the program, whatever the program is (one that never
    /// opens its channel, a busy loop), so such a child starts through fork + exec rather
    /// than posix_spawn. [`parent_channel`] sets it again in a child of this workspace
    /// (harmless), for a child started by an older parent.
    pub fn parent_death_signal(mut self, signal: Signal) -> Self {
        self.spawn.parent_death_signal = Some(signal);
        self
    }

    /// The channel's format (Node's `serialization`): [`ipc::Format::Json`] for a Node
    /// program, which then finds `NODE_CHANNEL_FD`. The default is this workspace's
    /// postcard frames. See [`SpawnOptions::serialization`].
    pub fn serialization(mut self, format: ipc::Format) -> Self {
        self.spawn = self.spawn.serialization(format);
        self
    }

    /// The executable that runs the program (Node's `execPath`): `fork(module, args)`
    /// then starts `exec_path <exec_argv...> module <args...>`, as Node runs
    /// `node module`. Unset, the program itself is executed.
    pub fn exec_path(mut self, path: impl AsRef<OsStr>) -> Self {
        self.exec_path = Some(path.as_ref().to_owned());
        self
    }

    /// Arguments for [`exec_path`](ForkOptions::exec_path) before the module (Node's
    /// `execArgv`, such as `--max-old-space-size=100`). Ignored without an exec path.
    pub fn exec_argv<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.exec_argv = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Changes any spawn option (environment, working directory, timeout, more stdio).
    /// Slot 3 stays the IPC channel.
    pub fn map_spawn_options(mut self, f: impl FnOnce(SpawnOptions) -> SpawnOptions) -> Self {
        self.spawn = f(self.spawn);
        self
    }
}

/// Starts `program` with an IPC channel at fd 3: Node's `child_process.fork` (never
/// `fork(2)`). The program gets its end with [`parent_channel`]; this side talks through
/// [`Child::send`] and [`Child::recv`].
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut worker = child::fork("./worker", ["--id", "1"], child::ForkOptions::new())?;
/// worker.send(&"ping".to_string()).await?;
/// let reply = worker.recv().await?.expect("a reply");
/// println!("{}", reply.decode::<String>()?);
/// # Ok(())
/// # }
/// ```
pub fn fork<I, S>(program: impl AsRef<OsStr>, args: I, options: ForkOptions) -> Result<Child, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let spawn = options.spawn.stdio(3, Stdio::Ipc);
    match options.exec_path {
        Some(exec_path) => {
            let mut argv = options.exec_argv;
            argv.push(program.as_ref().to_owned());
            argv.append(&mut args);
            spawn_with(&exec_path, &argv, spawn)
        }
        None => spawn_with(program.as_ref(), &args, spawn),
    }
}

/// The forked program's channel to its parent, or `None` when it was not started with one:
/// Node's `process.send` / `process.on('message')` side. A parent of this workspace gives a
/// postcard channel (`IPC_CHANNEL_FD`); a Node parent (`fork(.., {execPath})` or `spawn`
/// with an `'ipc'` slot) gives `NODE_CHANNEL_FD` and the channel speaks
/// [`ipc::Format::Json`] (see [`ipc::Channel::from_env`]). Call it once, early in `main`,
/// within a tokio runtime; it also applies the parent-death signal the parent asked for.
pub fn parent_channel() -> Result<Option<ipc::Channel>, Error> {
    apply_parent_death_signal();
    Ok(ipc::Channel::from_env()?)
}

/// Applies `CHILD_PARENT_DEATH_SIGNAL` if set. If the parent already died (we were
/// re-parented), the signal is raised at once, as if it had been delivered.
fn apply_parent_death_signal() {
    let Some(value) = std::env::var_os(PARENT_DEATH_ENV) else {
        return;
    };
    let Some(ParentDeath { signal, parent }) = ParentDeath::parse(&value) else {
        tracing::warn!(value = %value.to_string_lossy(), "ignoring a malformed {PARENT_DEATH_ENV}");
        return;
    };
    if let Err(e) = crate::sys::set_parent_death_signal(signal as i32) {
        tracing::warn!(error = %e, "could not set the parent-death signal");
        return;
    }
    if nix::unistd::getppid().as_raw() != parent {
        let _ = nix::sys::signal::raise(signal.to_nix());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_stdio_is_inherit_with_ipc_at_three() {
        let options = ForkOptions::new().silent();
        assert!(matches!(options.spawn.stdio[0], Some(Stdio::Pipe)));
        let spawn = options.spawn.stdio(3, Stdio::Ipc);
        assert!(matches!(spawn.stdio[3], Some(Stdio::Ipc)));
    }
}
