//! The only module with `unsafe`: posix_spawn, pidfd syscalls, `waitid` and the fork path's child-side setup.
//!
//! Every function here is a thin, safe wrapper over one operating-system facility. Errors
//! are `io::Error`s built from `errno` by [`cvt`]; callers attach context.

use std::ffi::{CStr, c_int};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::ptr;

use crate::envp::CPointers;
use crate::status::ExitStatus;

/// Turns a `-1`-on-error return value into an `io::Result`.
fn cvt<T: PartialOrd + Default>(ret: T) -> io::Result<T> {
    if ret < T::default() {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Turns a pthread-style return value (the error number itself) into an `io::Result`.
fn cvt_errno(ret: c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(ret))
    }
}

/// What the fast path hands to `posix_spawn`.
#[derive(Debug)]
pub(crate) struct SpawnRequest<'a> {
    pub(crate) path: &'a CStr,
    pub(crate) argv: &'a CPointers<'a>,
    pub(crate) envp: &'a CPointers<'a>,
    pub(crate) cwd: Option<&'a CStr>,
    /// `(source, target)`: every source is `>= close_from`, so no placement clobbers another.
    pub(crate) dup2s: &'a [(RawFd, RawFd)],
    /// The child closes every fd from this number up (after the `dup2`s).
    pub(crate) close_from: RawFd,
    /// `(target)` slots between 3 and `close_from` that the child must not have open.
    pub(crate) closes: &'a [RawFd],
    pub(crate) setsid: bool,
    /// A process group of its own (`setsid` makes one too).
    pub(crate) setpgid: bool,
}

/// `posix_spawn_file_actions_t` with its destructor.
struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid placeholder; `init` fully initialises it.
        let mut raw = unsafe { std::mem::zeroed() };
        // SAFETY: `raw` is a valid, writable posix_spawn_file_actions_t.
        cvt_errno(unsafe { libc::posix_spawn_file_actions_init(&mut raw) })?;
        Ok(Self(raw))
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised by `new` and destroyed exactly once.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

/// `posix_spawnattr_t` with its destructor.
struct SpawnAttr(libc::posix_spawnattr_t);

impl SpawnAttr {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero value is a valid placeholder; `init` fully initialises it.
        let mut raw = unsafe { std::mem::zeroed() };
        // SAFETY: `raw` is a valid, writable posix_spawnattr_t.
        cvt_errno(unsafe { libc::posix_spawnattr_init(&mut raw) })?;
        Ok(Self(raw))
    }
}

impl Drop for SpawnAttr {
    fn drop(&mut self) {
        // SAFETY: initialised by `new` and destroyed exactly once.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

/// Starts a process with `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`, no fork).
///
/// The child gets an empty signal mask and every signal at its default disposition
/// (`POSIX_SPAWN_SETSIGDEF` with a full set), as Node (libuv) and this crate's fork path do:
/// signals this process ignores (`SIGPIPE` in Rust programs, `SIGINT` under `nohup`-like
/// hosts) are not ignored in the child. glibc resets them in the child before exec, one
/// `sigaction` each, a few microseconds. Its fds are placed by `dup2` (which clears
/// close-on-exec on the target), and every
/// other fd closed. Exec failures (`ENOENT`, `EACCES`, ...) come back as the error.
pub(crate) fn posix_spawn(req: &SpawnRequest<'_>) -> io::Result<libc::pid_t> {
    let mut actions = FileActions::new()?;
    let mut attr = SpawnAttr::new()?;
    if let Some(cwd) = req.cwd {
        // SAFETY: `actions` is initialised; `cwd` is a valid C string that glibc copies.
        cvt_errno(unsafe {
            libc::posix_spawn_file_actions_addchdir_np(&mut actions.0, cwd.as_ptr())
        })?;
    }
    for &(source, target) in req.dup2s {
        // SAFETY: `actions` is initialised; the fds are plain integers recorded for the child.
        cvt_errno(unsafe {
            libc::posix_spawn_file_actions_adddup2(&mut actions.0, source, target)
        })?;
    }
    for &target in req.closes {
        // SAFETY: as above.
        cvt_errno(unsafe { libc::posix_spawn_file_actions_addclose(&mut actions.0, target) })?;
    }
    // SAFETY: as above; glibc >= 2.34 turns this into close_range in the child.
    cvt_errno(unsafe {
        libc::posix_spawn_file_actions_addclosefrom_np(&mut actions.0, req.close_from)
    })?;

    let mut flags = (libc::POSIX_SPAWN_SETSIGMASK | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short;
    if req.setsid {
        flags |= libc::POSIX_SPAWN_SETSID;
    } else if req.setpgid {
        // Group 0: the child's own pid.
        flags |= libc::POSIX_SPAWN_SETPGROUP as libc::c_short;
    }
    // SAFETY: all-zero is a valid sigset_t to pass to sigemptyset.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the sets and `attr` are valid and initialised; the setters copy the sets.
    unsafe {
        cvt(libc::sigemptyset(&mut empty))?;
        cvt(libc::sigfillset(&mut all))?;
        cvt_errno(libc::posix_spawnattr_setsigmask(&mut attr.0, &empty))?;
        cvt_errno(libc::posix_spawnattr_setsigdefault(&mut attr.0, &all))?;
        cvt_errno(libc::posix_spawnattr_setflags(&mut attr.0, flags))?;
    }

    let mut pid: libc::pid_t = 0;
    // SAFETY: `path`, `argv` and `envp` are NUL-terminated and outlive the call; `actions`
    // and `attr` are initialised. glibc's posix_spawn does not return before the child has
    // exec'd or failed, so nothing it borrowed is used afterwards.
    cvt_errno(unsafe {
        libc::posix_spawn(
            &mut pid,
            req.path.as_ptr(),
            &actions.0,
            &attr.0,
            req.argv.as_ptr(),
            req.envp.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// One more than the highest signal number on Linux.
const NSIG: c_int = 65;

/// Registers the slow path's child-side setup on a `std::process::Command` (fork + exec).
///
/// The closure runs between fork and exec, so it only makes async-signal-safe calls:
/// `setsid`, `prctl`, `getppid`, `kill`, `signal`, `sigprocmask`, `dup2`, `close_range`
/// (or `getrlimit` and `fcntl` where it cannot mark descriptors close-on-exec).
///
/// `parent_death`: the signal the child gets when the spawning thread ends, and the pid of
/// this process; if this process is already gone when the child sets it (the child was
/// re-parented), the child sends itself the signal at once.
pub(crate) fn install_child_setup(
    command: &mut std::process::Command,
    dup2s: Vec<(RawFd, RawFd)>,
    closes: Vec<RawFd>,
    close_from: RawFd,
    setsid: bool,
    setpgid: bool,
    parent_death: Option<(c_int, libc::pid_t)>,
) {
    let setup = move || -> io::Result<()> {
        // SAFETY: each call is async-signal-safe and only touches this (forked) process.
        unsafe {
            if setsid {
                cvt(libc::setsid())?;
            } else if setpgid {
                cvt(libc::setpgid(0, 0))?;
            }
            if let Some((signal, parent)) = parent_death {
                cvt(libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    signal as libc::c_ulong,
                    0,
                    0,
                    0,
                ))?;
                if libc::getppid() != parent {
                    libc::kill(libc::getpid(), signal);
                }
            }
            for sig in 1..NSIG {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            cvt(libc::sigprocmask(
                libc::SIG_SETMASK,
                &empty,
                ptr::null_mut(),
            ))?;
            for &(source, target) in &dup2s {
                cvt(libc::dup2(source, target))?;
            }
            for &target in &closes {
                libc::close(target);
            }
            // Everything from `close_from` on is marked close-on-exec rather than closed:
            // std's own pipe for reporting a failed exec must stay open until the exec.
            let marked = libc::syscall(
                libc::SYS_close_range,
                close_from as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if marked != 0 {
                // Before Linux 5.11: one fcntl per possible descriptor, up to the limit.
                let mut limit: libc::rlimit = std::mem::zeroed();
                let top = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) {
                    0 => limit.rlim_cur.min(1 << 20) as RawFd,
                    _ => 1 << 16,
                };
                for fd in close_from..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
        }
        Ok(())
    };
    // SAFETY: `setup` is async-signal-safe (see above) and allocates nothing.
    unsafe { command.pre_exec(setup) };
}

/// `pidfd_open(2)`: a close-on-exec fd that refers to `pid` for as long as it is open.
///
/// Race-free only while `pid` is our un-reaped child, which is how this crate calls it.
pub(crate) fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    let fd = cvt(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(2)`: signals exactly the process the pidfd refers to (never a reused pid).
pub(crate) fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: c_int) -> io::Result<()> {
    // SAFETY: a valid pidfd, a signal number and a null siginfo, as the man page allows.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            ptr::null::<libc::siginfo_t>(),
            0,
        )
    })?;
    Ok(())
}

/// How [`pidfd_wait`] waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitHow {
    /// Reap if exited, else return `None` at once.
    TryReap,
    /// Block until exited, but leave the process to be reaped by [`WaitHow::TryReap`].
    BlockNoReap,
}

/// `waitid(P_PIDFD, ...)` for one child.
pub(crate) fn pidfd_wait(pidfd: BorrowedFd<'_>, how: WaitHow) -> io::Result<Option<ExitStatus>> {
    let options = match how {
        WaitHow::TryReap => libc::WEXITED | libc::WNOHANG,
        WaitHow::BlockNoReap => libc::WEXITED | libc::WNOWAIT,
    };
    loop {
        // SAFETY: all-zero is valid for siginfo_t; waitid fills it in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is writable; the pidfd is valid for the call.
        let ret = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                options,
            )
        };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded, so the SIGCHLD fields of `info` are initialised (or
        // zero under WNOHANG when nothing has exited yet).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitStatus::Exited(status),
            libc::CLD_DUMPED => ExitStatus::Signaled {
                signal: status,
                core_dumped: true,
            },
            _ => ExitStatus::Signaled {
                signal: status,
                core_dumped: false,
            },
        }));
    }
}

/// `fcntl(F_DUPFD_CLOEXEC, min)`: a close-on-exec duplicate numbered at least `min`.
pub(crate) fn dup_at_least(fd: BorrowedFd<'_>, min: RawFd) -> io::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(min))
        .map_err(io::Error::from)?;
    // SAFETY: fcntl just returned this new fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Borrows an fd of this process by number (for `Stdio::Inherit` at slots past 2), if open.
pub(crate) fn dup_inherited(number: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: the borrow lasts only for the fcntl call, which fails with EBADF if `number`
    // is not open; the duplicate is owned independently of the original.
    let fd = unsafe { BorrowedFd::borrow_raw(number) };
    dup_at_least(fd, min)
}

/// Makes an end of a pipe from [`pipe`] non-blocking with one `F_SETFL`: a fresh pipe has
/// no other status flag to keep (its access mode is not a settable flag), so there is
/// nothing to read first.
pub(crate) fn set_fresh_pipe_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// A close-on-exec pipe: `(read end, write end)`.
pub(crate) fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Grows a pipe's kernel buffer (best effort; used for output capture).
pub(crate) fn grow_pipe(fd: BorrowedFd<'_>, size: i32) {
    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size));
}

/// `read(2)` into the spare capacity of `buf` (at most `limit` bytes); `Ok(0)` is EOF.
pub(crate) fn read_into(fd: BorrowedFd<'_>, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    let len = spare.len().min(limit);
    // SAFETY: `spare` is writable memory of at least `len` bytes owned by `buf`.
    let n = cvt(unsafe { libc::read(fd.as_raw_fd(), spare.as_mut_ptr().cast(), len) })? as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// `open("/dev/null", O_RDWR | O_CLOEXEC)`.
pub(crate) fn open_null() -> io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

/// Sends `signal` to process group `pgid` (`killpg`); `ESRCH` means no such group exists.
pub(crate) fn kill_group(pgid: libc::pid_t, signal: c_int) -> io::Result<()> {
    // SAFETY: a plain syscall with integer arguments.
    cvt(unsafe { libc::kill(-pgid, signal) })?;
    Ok(())
}

/// `prctl(PR_SET_PDEATHSIG, signal)` for the calling thread's process.
pub(crate) fn set_parent_death_signal(signal: c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; the trailing arguments are ignored.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

/// A shared, never-replaced descriptor seen through `AsRawFd`, so an `AsyncFd` can own it.
#[derive(Debug)]
pub(crate) struct SharedFd(std::sync::Arc<OwnedFd>);

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Registers a child's pidfd with the current tokio reactor for readability (its exit).
pub(crate) fn register_pidfd(
    pidfd: std::sync::Arc<OwnedFd>,
) -> io::Result<tokio::io::unix::AsyncFd<SharedFd>> {
    // SAFETY: the `SharedFd` inside the `AsyncFd` keeps the `OwnedFd` alive, and an
    // `OwnedFd` behind an `Arc` can be neither closed nor replaced: the fd stays open and the
    // same for the whole life of the `AsyncFd`.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            SharedFd(pidfd),
            tokio::io::Interest::READABLE,
        )
    }
    .map_err(|e| e.into_parts().1)
}

/// Whether the current tokio runtime has its IO driver: registers a throw-away socket with
/// it. Without the driver tokio panics (it offers no other check), so the caller runs this
/// under `catch_unwind`, before anything is started.
pub(crate) fn probe_io_driver() -> io::Result<()> {
    let probe = OwnedFd::from(std::os::unix::net::UnixDatagram::unbound()?);
    // SAFETY: the `AsyncFd` owns `probe`, which stays open and the same until the
    // `AsyncFd` is dropped at the end of this statement.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(probe, tokio::io::Interest::READABLE)
    }
    .map(drop)
    .map_err(|e| e.into_parts().1)
}

/// `write(2)` that can never raise `SIGPIPE`, whatever the process's disposition for it, and
/// changes no disposition: `SIGPIPE` is blocked in this thread for the call, and a `SIGPIPE`
/// that the write itself raised (it failed with `EPIPE`) is taken off the thread's pending
/// set before the mask is restored. A closed reader is then only the `EPIPE` error.
pub(crate) fn write_no_sigpipe(fd: BorrowedFd<'_>, data: &[u8]) -> io::Result<usize> {
    // SAFETY: all-zero is valid for sigset_t before sigemptyset.
    let mut pipe_only: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut pending: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the sets are valid and writable; pthread_sigmask and sigpending only touch
    // this thread's mask and read the pending set.
    let was_pending = unsafe {
        cvt(libc::sigemptyset(&mut pipe_only))?;
        cvt(libc::sigaddset(&mut pipe_only, libc::SIGPIPE))?;
        cvt_errno(libc::pthread_sigmask(libc::SIG_BLOCK, &pipe_only, &mut old))?;
        cvt(libc::sigpending(&mut pending))?;
        libc::sigismember(&pending, libc::SIGPIPE) == 1
    };
    // SAFETY: `data` is readable for its length; the fd is borrowed for the call.
    let written = cvt(unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) });
    let written = written.map(|n| n as usize);
    if !was_pending && matches!(&written, Err(e) if e.raw_os_error() == Some(libc::EPIPE)) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `pipe_only` is a valid set, the timeout is zero and no siginfo is wanted;
        // SIGPIPE is blocked, so the SIGPIPE this write queued is consumed, not delivered.
        unsafe { libc::sigtimedwait(&pipe_only, ptr::null_mut(), &zero) };
    }
    // SAFETY: restores the mask saved above for this thread.
    cvt_errno(unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) })?;
    written
}
