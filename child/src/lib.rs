//! Node-style process launching for Rust: `spawn`, `exec`, `exec_file`, `fork` and their
//! blocking variants, with Node's semantics and at least std's speed.
//!
//! # Layer
//!
//! The middle of the workspace: it builds on `ipc` (the channel that [`fork`] gives a child)
//! and is used by `cluster`. It knows processes and file descriptors, nothing about HTTP or
//! clusters. Linux only (posix_spawn, pidfd; Linux 5.4 or later, glibc 2.34 or later).
//!
//! # How it works
//!
//! - [`spawn`] starts the program with `posix_spawn` (glibc: `clone(CLONE_VFORK)`, no copy of
//!   the parent). File actions place every stdio slot with `dup2` and close every other fd,
//!   then `pidfd_open` takes a handle on the un-reaped child. Only uid/gid need the slower
//!   `fork` + `exec` path (`std::process::Command`). An executable file that the kernel
//!   cannot run (`ENOEXEC`: a script without `#!`) is run with `/bin/sh`, as `execvp` and
//!   Node do.
//! - Waiting is the pidfd becoming readable in tokio's reactor, then `waitid(P_PIDFD)`. No
//!   `SIGCHLD` handler, no reaper thread until a handle is dropped before its child exits.
//! - Killing is `pidfd_send_signal`: a pid reused by another process is never signalled.
//! - [`exec`] and [`exec_file`] capture stdout and stderr with Node's max buffer, timeout and
//!   error rules; the `*_sync` variants do the same with one `poll(2)` loop and no runtime.
//!
//! # Invariants
//!
//! - No fd leaks: every fd this crate creates is close-on-exec, and a child sees exactly fds
//!   0, 1, 2 and the slots it was given, even fds this process inherited without
//!   close-on-exec.
//! - No half-started process: a spawn error means no process exists.
//! - The IPC channel variable ([`ipc::CHANNEL_FD_ENV`]) is removed from every child's
//!   environment except a child given a channel, so a grandchild never mistakes an unrelated
//!   fd 3 for its channel.
//! - No zombies: see `# Caveats`.
//! - No dependency's type is part of the API, so none's major version is: [`Signal`] is
//!   this crate's own enum (go through its number, `signal as i32`, to use another crate's),
//!   [`ChildStdin`] and [`ChildStdout`] wrap tokio's pipes and implement tokio 1's
//!   `AsyncWrite`/`AsyncRead`, and cancellation is any future
//!   ([`SpawnOptions::cancel_on`]).
//!
//! # Example
//!
//! ```
//! use child::{ExecOptions, SpawnOptions, Stdio};
//! use tokio::io::AsyncReadExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // spawn: streams and exit status.
//! let mut ls = child::spawn("ls", ["/"], SpawnOptions::new().stderr(Stdio::Null))?;
//! let mut listing = String::new();
//! ls.stdout.take().expect("piped").read_to_string(&mut listing).await?;
//! assert!(ls.wait().await?.success());
//! assert!(listing.lines().any(|l| l == "tmp"));
//!
//! // exec: a shell command, captured, with Node's errors.
//! let output = child::exec("echo hello world", ExecOptions::new()).await?;
//! assert_eq!(output.stdout_lossy(), "hello world\n");
//! let err = child::exec("echo hello world", ExecOptions::new().max_buffer(5)).await.unwrap_err();
//! assert_eq!((err.to_string().as_str(), err.stdout()), ("stdout maxBuffer length exceeded", &b"hello"[..]));
//!
//! // The blocking variants need no runtime.
//! let err = child::exec_sync("no-such-command-anywhere", ExecOptions::new()).unwrap_err();
//! assert_eq!(err.code(), Some(127));
//! # Ok(())
//! # }
//! ```
//!
//! # Caveats
//!
//! - Dropping a [`Child`] never leaves a zombie: if the child has not been reaped, it is
//!   handed to one background thread (started on first use) that polls the pidfds of such
//!   orphans and reaps each when it exits. The child itself keeps running unless
//!   [`SpawnOptions::kill_on_drop`] was set (then it gets `SIGKILL`). If this process exits
//!   first, the orphans are re-parented to init, which reaps them.
//! - A timeout or cancellation future ([`SpawnOptions::cancel_on`]) set on [`SpawnOptions`]
//!   is enforced by a tokio task that lives until the child exits, even if the handle is
//!   dropped, as long as the runtime runs.
//! - Dropping an [`exec`] or [`exec_file`] future before it completes ends its child: the
//!   child gets the kill signal (default `SIGTERM`) at once and is reaped in the background,
//!   so no child outlives its timeout or cancellation because its future went away.
//!   (A child that ignores the kill signal runs on until it exits, and is then reaped.)
//! - An async function on a runtime without IO enabled returns [`Error::NoRuntime`] before
//!   anything is started. tokio offers no way to ask, so the first spawn on each runtime
//!   and thread registers a throw-away socket under `catch_unwind`: on such a runtime a
//!   panic hook sees tokio's "IO is disabled" panic once, and with `panic = "abort"` the
//!   process aborts there (still before any child exists).
//! - The crate's own writes to a child (`exec`'s [`ExecOptions::input`], sync or async)
//!   never raise `SIGPIPE`, whatever this process's disposition for it, and change no
//!   disposition: a child that closes its stdin early just gets no more input. Writes you
//!   make yourself to [`ChildStdin`] are plain `write(2)`s: Rust programs ignore `SIGPIPE`,
//!   but a program that restores its default must expect it.
//! - Something else in the process that reaps children behind this crate's back
//!   (`waitpid(-1)`, `SIGCHLD` set to `SIG_IGN`) breaks the pidfd's race-freedom guarantee
//!   and makes waits fail with `ECHILD`.
//! - Cancelling [`Child::wait`] is safe: the status is cached once reaped.
//! - The parent-death signal of [`ForkOptions::parent_death_signal`] fires when the *thread*
//!   that spawned the child exits (Linux `PR_SET_PDEATHSIG` semantics): spawn from a
//!   long-lived thread (a runtime worker or the main thread), not from `spawn_blocking`.
//! - When we kill a child (timeout, cancellation, max buffer), `exec` waits for it to exit and
//!   keeps only the output already readable, rather than waiting for grandchildren that may
//!   hold the pipes open. Without a kill, it waits for the pipes to close, like Node.

#![warn(missing_docs)]

//!
//! # Logging
//!
//! Through `tracing` (target `child::...`), only for what no caller can be told through a
//! returned error:
//!
//! - `WARN` "failed to kill child at its deadline" (`pid`, `error`): a [`SpawnOptions`]
//!   timeout or token fired but the signal could not be sent.
//! - `WARN` "ignoring a malformed CHILD_PARENT_DEATH_SIGNAL" and "could not set the
//!   parent-death signal" (`error`), in a forked child's [`parent_channel`].
//! - `WARN` "orphan reaper unavailable" (`pid`): no reaper thread could be started; a plain
//!   thread reaps that child instead.
//! - `ERROR` "orphan reaper poll failed" (`error`): the reaper thread stopped; children
//!   dropped afterwards are reaped by init once this process exits.
//!
//! Spawns, exits and kills are not logged: they are the caller's results.

mod channel_env;
mod child;
mod envp;
mod error;
mod exec;
mod fork;
mod launch;
mod options;
mod pipes;
mod process;
mod reaper;
mod signal;
mod status;
mod sync;
mod sys;

pub use crate::child::{Child, spawn};
pub use crate::error::{Error, SpawnError, SpawnErrorKind};
pub use crate::exec::error::{ExecError, ExecErrorKind, StreamName};
pub use crate::exec::{DEFAULT_MAX_BUFFER, ExecOptions, exec, exec_file};
pub use crate::fork::{ForkOptions, fork, parent_channel};
pub use crate::options::{SpawnOptions, Stdio};
pub use crate::pipes::{ChildStderr, ChildStdin, ChildStdout};
pub use crate::signal::{Signal, UnknownSignal};
pub use crate::status::{ExitStatus, Output};
pub use crate::sync::{exec_file_sync, exec_sync, spawn_sync};
pub use ipc::{Format, HandleType, Received};

/// An empty argument list for [`spawn`], [`fork`] and the exec functions, so that no
/// `[] as [&str; 0]` is needed: `child::spawn("cat", child::NO_ARGS, options)`.
pub const NO_ARGS: [&str; 0] = [];
