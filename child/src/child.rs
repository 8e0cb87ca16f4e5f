//! [`spawn`] and the async [`Child`] handle: pid, stdio streams, kill, wait, IPC.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::error::{Error, SpawnError};
use crate::launch::launch;
use crate::options::SpawnOptions;
use crate::pipes::{ChildStderr, ChildStdin, ChildStdout};
use crate::process::{ProcessHandle, Target};
use crate::reaper;
use crate::signal::Signal;
use crate::status::{ExitStatus, Output};
use crate::sys::SharedFd;

/// A process's pidfd registered with the tokio reactor.
#[derive(Debug)]
pub(crate) struct AsyncProcess {
    readiness: AsyncFd<SharedFd>,
    handle: Arc<ProcessHandle>,
}

impl AsyncProcess {
    fn new(handle: Arc<ProcessHandle>) -> io::Result<Self> {
        let readiness = crate::sys::register_pidfd(handle.shared_pidfd())?;
        Ok(Self { readiness, handle })
    }

    /// Waits for the exit (the pidfd becomes readable) and reaps.
    pub(crate) async fn wait(&self) -> io::Result<ExitStatus> {
        // No reap attempt before the first readiness: registering the pidfd reports an
        // exit that already happened, and skipping it saves a syscall per poll of a
        // `select!` that includes this future.
        loop {
            if let Some(status) = self.handle.status() {
                return Ok(status);
            }
            let mut ready = self.readiness.readable().await?;
            if let Some(status) = self.handle.try_reap()? {
                return Ok(status);
            }
            ready.clear_ready();
        }
    }
}

/// A running (or exited) child process started by [`spawn`] or [`fork`](crate::fork()).
///
/// The stdio fields hold the parent's ends of `Stdio::Pipe` slots 0-2; take them to read
/// and write concurrently with waiting. Waiting and killing take `&self`, so a task can
/// wait while another kills. See the crate's `# Caveats` for what dropping promises.
#[derive(Debug)]
pub struct Child {
    process: Arc<AsyncProcess>,
    /// The child's stdin, if slot 0 was `Stdio::Pipe`.
    pub stdin: Option<ChildStdin>,
    /// The child's stdout, if slot 1 was `Stdio::Pipe`.
    pub stdout: Option<ChildStdout>,
    /// The child's stderr, if slot 2 was `Stdio::Pipe`.
    pub stderr: Option<ChildStderr>,
    extra: Vec<(usize, OwnedFd)>,
    channel: Option<Channel>,
    /// The channel's limits and format (from [`SpawnOptions::channel_config`] and
    /// [`SpawnOptions::serialization`]).
    channel_config: ipc::Config,
    /// The signal a still-running child gets when this handle is dropped.
    pub(crate) kill_on_drop: Option<Signal>,
}

/// The parent's end of the IPC channel, registered with the reactor on first use.
#[derive(Debug)]
enum Channel {
    Fd(OwnedFd),
    Ready(Box<ipc::Channel>),
    /// The child closed its end: `recv` saw the end of the stream or a send found it closed.
    Disconnected,
}

/// Starts `program` with `args`: Node's `child_process.spawn`.
///
/// Returns once the process exists (before it has printed anything); an error means no
/// process was left behind. Needs a tokio runtime with IO enabled ([`spawn_sync`](crate::spawn_sync)
/// does not).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), child::Error> {
/// let child = child::spawn("/bin/sh", ["-c", "exit 3"], child::SpawnOptions::new())?;
/// assert_eq!(child.wait().await?.code(), Some(3));
/// # Ok(())
/// # }
/// ```
pub fn spawn<I, S>(
    program: impl AsRef<OsStr>,
    args: I,
    options: SpawnOptions,
) -> Result<Child, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    spawn_with(program.as_ref(), &args, options)
}

pub(crate) fn spawn_with(
    program: &OsStr,
    args: &[OsString],
    mut options: SpawnOptions,
) -> Result<Child, Error> {
    if !io_driver_available() {
        return Err(Error::NoRuntime);
    }
    let launched = launch(program, args, &mut options)?;
    let handle = Arc::new(ProcessHandle::new(launched.pid, launched.pidfd));
    let wrapped = Child::wrap(
        Arc::clone(&handle),
        launched.stdin,
        launched.stdout,
        launched.stderr,
        launched.extra,
        launched.ipc,
    );
    let mut child = match wrapped {
        Ok(child) => child,
        Err(e) => {
            // Never leave a half-started process: end and reap it before reporting.
            let _ = handle.kill(libc::SIGKILL, Target::Process);
            let _ = handle.wait_blocking();
            return Err(SpawnError::new(program, args, e).into());
        }
    };
    child.kill_on_drop = options.kill_on_drop.then_some(Signal::SIGKILL);
    child.channel_config = (options.channel_config.clone()).format(options.serialization);
    let (timeout, cancel) = options.take_deadlines();
    if timeout.is_some() || cancel.is_some() {
        tokio::spawn(enforce_deadline(
            Arc::clone(&child.process),
            timeout,
            cancel,
            options.kill_signal,
        ));
    }
    Ok(child)
}

/// Whether a tokio runtime with IO enabled is current, which a `Child` needs for its pidfd.
/// Checked before anything is started, once per runtime and thread.
fn io_driver_available() -> bool {
    thread_local! {
        static CHECKED: std::cell::Cell<Option<(tokio::runtime::Id, bool)>> =
            const { std::cell::Cell::new(None) };
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    let id = runtime.id();
    if let Some((checked, available)) = CHECKED.get()
        && checked == id
    {
        return available;
    }
    let available = std::panic::catch_unwind(crate::sys::probe_io_driver).is_ok_and(|r| r.is_ok());
    CHECKED.set(Some((id, available)));
    available
}

/// Kills the child with `signal` at the timeout or on cancellation, unless it exits first.
async fn enforce_deadline(
    process: Arc<AsyncProcess>,
    timeout: Option<Duration>,
    cancel: Option<crate::options::Cancel>,
    signal: Signal,
) {
    let timer = async {
        match timeout {
            Some(timeout) => tokio::time::sleep(timeout).await,
            None => std::future::pending().await,
        }
    };
    let cancelled = async {
        match cancel {
            Some(cancel) => cancel.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = process.wait() => return,
        () = timer => {}
        () = cancelled => {}
    }
    if let Err(e) = process.handle.kill(signal as i32, Target::Process) {
        tracing::warn!(pid = process.handle.pid(), error = %e, "failed to kill child at its deadline");
    }
}

impl Child {
    fn wrap(
        handle: Arc<ProcessHandle>,
        stdin: Option<OwnedFd>,
        stdout: Option<OwnedFd>,
        stderr: Option<OwnedFd>,
        extra: Vec<(usize, OwnedFd)>,
        ipc: Option<OwnedFd>,
    ) -> io::Result<Self> {
        let process = Arc::new(AsyncProcess::new(handle)?);
        let channel = ipc.map(Channel::Fd);
        Ok(Self {
            process,
            stdin: stdin.map(ChildStdin::from_owned_fd).transpose()?,
            stdout: stdout.map(ChildStdout::from_owned_fd).transpose()?,
            stderr: stderr.map(ChildStdout::from_owned_fd).transpose()?,
            extra,
            channel,
            kill_on_drop: None,
            channel_config: ipc::Config::new(),
        })
    }

    /// The child's process id. Prefer [`Child::kill`] to signalling the pid yourself: the pid
    /// may be reused once the child is reaped, the pidfd never is.
    pub fn pid(&self) -> u32 {
        self.process.handle.pid()
    }

    /// The child's pidfd (valid as long as this handle lives).
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.process.handle.pidfd()
    }

    /// Takes the parent's end of a `Stdio::Pipe` slot past 2: one end of a Unix stream socket
    /// pair, readable and writable.
    pub fn take_stdio(&mut self, slot: usize) -> Option<OwnedFd> {
        let index = self.extra.iter().position(|(s, _)| *s == slot)?;
        Some(self.extra.swap_remove(index).1)
    }

    /// Sends `signal` to the child through its pidfd, so a reused pid is never signalled.
    /// Returns `Ok(false)` if the child had already exited. Node's `subprocess.kill()`.
    pub fn kill(&self, signal: Signal) -> Result<bool, Error> {
        self.process
            .handle
            .kill(signal as i32, Target::Process)
            .map_err(|source| Error::Kill {
                pid: self.pid(),
                source,
            })
    }

    /// Sends `signal` to the child's whole process group (Node's `process.kill(-pid)`); the
    /// child must lead a group, which a `detached` child does. `Ok(false)` if it had exited
    /// and was reaped; [`Error::NotGroupLeader`] if it runs (or is an unreaped zombie) but
    /// leads no group (`ESRCH` from `kill(-pid)`), in which case nothing was signalled.
    pub fn kill_group(&self, signal: Signal) -> Result<bool, Error> {
        let pid = self.pid();
        self.process
            .handle
            .kill(signal as i32, Target::Group)
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ESRCH) => Error::NotGroupLeader { pid },
                _ => Error::Kill { pid, source },
            })
    }

    /// Whether a signal from [`Child::kill`], [`Child::kill_group`], a timeout or a
    /// cancellation was delivered. Node's `subprocess.killed`.
    pub fn killed(&self) -> bool {
        self.process.handle.killed()
    }

    /// Waits for the process to exit (Node's `'exit'` event) and reaps it. Cancel-safe;
    /// may be called again and returns the same status.
    pub async fn wait(&self) -> Result<ExitStatus, Error> {
        self.process.wait().await.map_err(|source| Error::Wait {
            pid: self.pid(),
            source,
        })
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>, Error> {
        self.process
            .handle
            .try_reap()
            .map_err(|source| Error::Wait {
                pid: self.pid(),
                source,
            })
    }

    /// Closes stdin, then waits for the exit AND the end of the stdout and stderr pipes still
    /// held by this handle, discarding their data (Node's `'close'` event).
    pub async fn wait_closed(&mut self) -> Result<ExitStatus, Error> {
        self.stdin = None;
        let (out, err) = (self.stdout.take(), self.stderr.take());
        let pid = self.pid();
        let drain = |pipe: Option<ChildStdout>| async move {
            if let Some(mut pipe) = pipe {
                tokio::io::copy(&mut pipe, &mut tokio::io::sink()).await?;
            }
            Ok::<_, io::Error>(())
        };
        let (status, out, err) = tokio::join!(self.wait(), drain(out), drain(err));
        out.and(err).map_err(|source| Error::Wait { pid, source })?;
        status
    }

    /// Closes stdin, collects stdout and stderr to their end and waits for the exit.
    pub async fn wait_with_output(mut self) -> Result<Output, Error> {
        self.stdin = None;
        let (out, err) = (self.stdout.take(), self.stderr.take());
        let pid = self.pid();
        let (status, stdout, stderr) = tokio::join!(self.wait(), read_all(out), read_all(err));
        let status = status?;
        let map = |source| Error::Wait { pid, source };
        Ok(Output {
            status,
            stdout: stdout.map_err(map)?,
            stderr: stderr.map_err(map)?,
        })
    }

    /// Sends one message on the IPC channel (Node's `subprocess.send`). Once the child has
    /// disconnected this is [`ipc::Error::Closed`].
    pub async fn send<T: serde::Serialize + ?Sized>(&mut self, message: &T) -> Result<(), Error> {
        self.send_with_fds(message, Vec::new()).await
    }

    /// Sends one message with descriptors attached (Node's `subprocess.send(message,
    /// sendHandle)`); the child gets its own copies and these are closed once sent.
    pub async fn send_with_fds<T: serde::Serialize + ?Sized>(
        &mut self,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        let sent = self.channel()?.send_with_fds(message, fds).await;
        if let Err(ipc::Error::Closed) = sent {
            self.channel = Some(Channel::Disconnected);
        }
        Ok(sent?)
    }

    /// Receives the next message on the IPC channel; `None` once the child disconnected
    /// (Node's `'disconnect'` event), and from then on.
    pub async fn recv(&mut self) -> Result<Option<ipc::Received>, Error> {
        if let Some(Channel::Disconnected) = self.channel {
            return Ok(None);
        }
        let received = self.channel()?.recv().await?;
        if received.is_none() {
            self.channel = Some(Channel::Disconnected);
        }
        Ok(received)
    }

    /// The IPC channel itself, to split it or use it from another task (`NoChannel` if
    /// there is none or it was taken or disconnected).
    pub fn take_channel(&mut self) -> Result<ipc::Channel, Error> {
        self.channel()?;
        match self.channel.take() {
            Some(Channel::Ready(channel)) => Ok(*channel),
            _ => Err(Error::NoChannel),
        }
    }

    /// The channel, registered with the reactor.
    fn channel(&mut self) -> Result<&mut ipc::Channel, Error> {
        if let Some(Channel::Fd(_)) = &self.channel
            && let Some(Channel::Fd(fd)) = self.channel.take()
        {
            let channel = ipc::Channel::from_fd_with(fd, &self.channel_config)?;
            self.channel = Some(Channel::Ready(Box::new(channel)));
        }
        match &mut self.channel {
            Some(Channel::Ready(channel)) => Ok(channel),
            Some(Channel::Disconnected) => Err(Error::Ipc(ipc::Error::Closed)),
            _ => Err(Error::NoChannel),
        }
    }

    /// Whether this handle holds an IPC channel that is still open (Node's
    /// `subprocess.connected`): false after [`disconnect`](Child::disconnect),
    /// [`take_channel`](Child::take_channel), or once the child has closed its end, which
    /// this handle learns when [`recv`](Child::recv) sees the end of the stream or a send
    /// finds the channel closed.
    pub fn connected(&self) -> bool {
        matches!(self.channel, Some(Channel::Fd(_) | Channel::Ready(_)))
    }

    /// Closes the IPC channel; the child sees end-of-stream (Node's `subprocess.disconnect`).
    /// [`Error::NoChannel`] if it is not connected.
    pub fn disconnect(&mut self) -> Result<(), Error> {
        match self.channel.take() {
            Some(Channel::Fd(_) | Channel::Ready(_)) => Ok(()),
            _ => Err(Error::NoChannel),
        }
    }

    pub(crate) fn process(&self) -> &Arc<AsyncProcess> {
        &self.process
    }
}

async fn read_all(pipe: Option<impl AsyncRead + Unpin>) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut buf).await?;
    }
    Ok(buf)
}

impl Drop for Child {
    fn drop(&mut self) {
        let handle = &self.process.handle;
        if handle.status().is_some() {
            return;
        }
        if let Some(signal) = self.kill_on_drop {
            let _ = handle.kill(signal as i32, Target::Process);
        }
        reaper::adopt(Arc::clone(handle));
    }
}
