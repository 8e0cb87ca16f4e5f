//! [`KillOnDrop`], the one guard for every process a test, a bench or xtask starts: the
//! process is killed and reaped on every path, a failed assertion or a `?` included.
//!
//! # Caveats
//!
//! - A guard reaps only its own child. Processes that are not our children (a detached
//!   grandchild, the workers of a primary) can be [adopted](KillOnDrop::adopt): they are
//!   sent SIGKILL on drop and reaped by their parent or by init.
//! - A [group](KillOnDrop::spawn_group) guard kills the whole process group, so helpers
//!   that do not pass signals on (nginx's and Node's workers) go with their leader. It
//!   reaps the leader, then waits up to three seconds for the rest of the group (reaped
//!   by whoever adopted them) to be gone.
//! - Signals go to a pid only while it is unreaped, so never to a recycled pid. Wait
//!   through the guard, not through [`KillOnDrop::child_mut`], so that it knows.
//! - Ctrl-C ends a process without running destructors: a signal handler calls
//!   [`kill_all_groups`] to kill every group a guard still owns.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;

/// Process groups owned by a live group guard, for [`kill_all_groups`].
static GROUPS: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

/// How long a group guard's drop waits for the group's other members to be gone.
const GROUP_GONE_TIMEOUT: Duration = Duration::from_secs(3);

/// Sends SIGKILL to every process group a [group guard](KillOnDrop::spawn_group) still
/// owns: for a Ctrl-C or SIGTERM handler, which ends the process without running `Drop`.
pub fn kill_all_groups() {
    let groups = GROUPS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// What a guard signals: its child alone, or the process group the child leads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Process,
    Group,
}

/// Our child, and its exit status once a wait through the guard has reaped it.
#[derive(Debug)]
struct Owned {
    child: Child,
    scope: Scope,
    status: Option<ExitStatus>,
}

impl Owned {
    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits in pid_t"))
    }

    /// Signals the child (or its group) unless it has been reaped: its pid may be reused.
    /// A group this guard made may still be signalled: its id stays taken while any
    /// member lives.
    fn signal(&self, scope: Scope, signal: Signal) -> nix::Result<()> {
        let group_of_ours = scope == Scope::Group && self.scope == Scope::Group;
        if self.status.is_some() && !group_of_ours {
            return Err(Errno::ESRCH);
        }
        match scope {
            Scope::Process => kill(self.pid(), signal),
            Scope::Group => killpg(self.pid(), signal),
        }
    }

    fn kill_and_reap(&mut self) {
        let _ = self.signal(self.scope, Signal::SIGKILL);
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
        if self.scope == Scope::Group {
            let pgid = self.pid();
            // The rest of the group is not ours to wait for: poll until it is empty.
            let deadline = Instant::now() + GROUP_GONE_TIMEOUT;
            while killpg(pgid, None) != Err(Errno::ESRCH) && Instant::now() < deadline {
                let _ = killpg(pgid, Signal::SIGKILL);
                thread::sleep(Duration::from_millis(10));
            }
            GROUPS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&pgid.as_raw());
        }
    }
}

/// A guard that kills and reaps its child, and kills the processes it adopted, when it is
/// dropped.
///
/// `Default` is a guard with no child, for adopting processes that are not ours.
#[derive(Debug, Default)]
pub struct KillOnDrop {
    owned: Option<Owned>,
    adopted: Vec<u32>,
}

impl KillOnDrop {
    /// Guards `child`: dropping the guard sends it SIGKILL and reaps it.
    pub fn new(child: Child) -> Self {
        Self::owning(child, Scope::Process)
    }

    /// Spawns `command` and guards the child (see [`KillOnDrop::new`]).
    pub fn spawn(command: &mut Command) -> io::Result<Self> {
        command.spawn().map(Self::new)
    }

    /// Spawns `command` as the leader of a new process group; dropping the guard kills the
    /// whole group, reaps the leader and waits (bounded) until the group is empty.
    pub fn spawn_group(command: &mut Command) -> io::Result<Self> {
        let child = command.process_group(0).spawn()?;
        GROUPS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(i32::try_from(child.id()).expect("a pid fits in pid_t"));
        Ok(Self::owning(child, Scope::Group))
    }

    fn owning(child: Child, scope: Scope) -> Self {
        Self {
            owned: Some(Owned {
                child,
                scope,
                status: None,
            }),
            adopted: Vec::new(),
        }
    }

    /// Also kills `pid`, a process that is not our child, when the guard is dropped.
    pub fn adopt(&mut self, pid: u32) {
        self.adopted.push(pid);
    }

    /// The processes adopted so far, in the order they were adopted.
    pub fn adopted(&self) -> &[u32] {
        &self.adopted
    }

    fn owned(&self) -> &Owned {
        self.owned.as_ref().expect("this guard owns no child")
    }

    fn owned_mut(&mut self) -> &mut Owned {
        self.owned.as_mut().expect("this guard owns no child")
    }

    /// The child's pid.
    ///
    /// # Panics
    ///
    /// If the guard owns no child (it was made with `default`). So do the other methods
    /// about the child.
    pub fn pid(&self) -> u32 {
        self.owned().child.id()
    }

    /// The child, for its pipes. Wait through the guard, not through this.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.owned_mut().child
    }

    /// Sends `signal` to the child; fails with `ESRCH` once it has been reaped.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        self.owned().signal(Scope::Process, signal)
    }

    /// Sends `signal` to the process group whose id is the child's pid (the child must lead
    /// it, as after [`KillOnDrop::spawn_group`] or `process_group(0)`). After the child
    /// has been reaped this fails with `ESRCH`, except for a group made by `spawn_group`,
    /// whose other members may live on.
    pub fn signal_group(&self, signal: Signal) -> nix::Result<()> {
        self.owned().signal(Scope::Group, signal)
    }

    /// Waits for the child to exit and reaps it.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        let owned = self.owned_mut();
        let status = owned.child.wait()?;
        owned.status = Some(status);
        Ok(status)
    }

    /// Reaps the child if it has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        let owned = self.owned_mut();
        let status = owned.child.try_wait()?;
        owned.status = owned.status.or(status);
        Ok(status)
    }

    /// Waits up to `timeout` for the child to exit and reaps it; `None` if it still runs.
    ///
    /// A thread waits for the exit without reaping (`waitid` with `WNOWAIT`), so the pid
    /// stays ours until this reaps it; on a timeout the thread ends with the child.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.try_wait()? {
            return Ok(Some(status));
        }
        let pid = self.owned().pid();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            while waitid(Id::Pid(pid), flags) == Err(Errno::EINTR) {}
            let _ = tx.send(());
        });
        match rx.recv_timeout(timeout) {
            Ok(()) => self.wait().map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Closes the child's stdin, collects its piped stdout and stderr until they end, then
    /// waits for it and reaps it.
    pub fn wait_with_output(&mut self) -> io::Result<Output> {
        let child = self.child_mut();
        drop(child.stdin.take());
        let stdout = read_all(child.stdout.take());
        let stderr = read_all(child.stderr.take());
        let status = self.wait()?;
        let join = |reader: thread::JoinHandle<io::Result<Vec<u8>>>| {
            reader
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("reader thread panicked")))
        };
        Ok(Output {
            status,
            stdout: join(stdout)?,
            stderr: join(stderr)?,
        })
    }
}

/// Reads `stream` to its end in a thread (nothing when it is not piped).
fn read_all(stream: Option<impl Read + Send + 'static>) -> thread::JoinHandle<io::Result<Vec<u8>>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut stream) = stream {
            stream.read_to_end(&mut bytes)?;
        }
        Ok(bytes)
    })
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.adopted {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if let Some(owned) = self.owned.as_mut() {
            owned.kill_and_reap();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;
    use crate::ProcStat;

    fn sleeper() -> Command {
        let mut command = Command::new("sleep");
        command.arg("30").stdin(Stdio::null());
        command
    }

    #[test]
    fn dropping_kills_and_reaps() {
        let guard = KillOnDrop::spawn(&mut sleeper()).expect("spawn sleep");
        let pid = guard.pid();
        assert!(crate::is_running(pid));
        drop(guard);
        assert_eq!(ProcStat::read(pid), None, "reaped, not a zombie");
    }

    #[test]
    fn dropping_a_group_guard_kills_the_group() {
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut guard = KillOnDrop::spawn_group(&mut command).expect("spawn sh");
        let mut line = String::new();
        let stdout = guard.child_mut().stdout.take().expect("piped");
        io::BufRead::read_line(&mut io::BufReader::new(stdout), &mut line).expect("read");
        let sleep: u32 = line.trim().parse().expect("a pid");
        let leader = guard.pid();
        drop(guard);
        assert_eq!(ProcStat::read(leader), None);
        assert!(
            !crate::is_running(sleep),
            "the group's other member died too"
        );
        assert!(!GROUPS.lock().unwrap().contains(&(leader as i32)));
    }

    #[test]
    fn waits_with_and_without_a_timeout() {
        let mut guard = KillOnDrop::spawn(&mut sleeper()).expect("spawn sleep");
        assert_eq!(guard.wait_timeout(Duration::from_millis(1)).unwrap(), None);
        guard.signal(Signal::SIGTERM).expect("signal");
        let status = guard.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(status.is_some_and(|s| !s.success()));
        assert_eq!(guard.signal(Signal::SIGTERM), Err(Errno::ESRCH), "reaped");
    }

    #[test]
    fn collects_output() {
        let mut command = Command::new("/bin/sh");
        command
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let output = KillOnDrop::spawn(&mut command)
            .unwrap()
            .wait_with_output()
            .unwrap();
        assert_eq!(output.status.code(), Some(3));
        assert_eq!(
            (&output.stdout[..], &output.stderr[..]),
            (&b"out\n"[..], &b"err\n"[..])
        );
    }

    #[test]
    fn adopted_processes_are_killed() {
        let mut child = sleeper().spawn().expect("spawn sleep");
        let mut guard = KillOnDrop::default();
        guard.adopt(child.id());
        drop(guard);
        let status = child.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
    }
}
