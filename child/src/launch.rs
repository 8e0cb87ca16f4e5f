//! Starting a process: options to argv/envp/fd placements, then posix_spawn (or the fork
//! path for uid/gid), then a pidfd. Shared by the async and the blocking APIs.
//!
//! Fd placement: every fd handed to the child is first made to have a number `>= nslots`
//! (the number of stdio slots), then `dup2`-ed to its slot. No placement can clobber another
//! source, `dup2` clears close-on-exec on the target only, and the child closes every fd
//! from `nslots` up before exec, so it sees exactly its slots (Architecture invariant: no
//! fd leaks, even non-close-on-exec fds this process inherited).

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use crate::envp::{CStrings, environment};
use crate::error::SpawnError;
use crate::options::{SpawnOptions, Stdio};
use crate::sys;

/// A started process and the parent's ends of its stdio.
#[derive(Debug)]
pub(crate) struct Launched {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stdin: Option<OwnedFd>,
    pub(crate) stdout: Option<OwnedFd>,
    pub(crate) stderr: Option<OwnedFd>,
    /// Parent ends of `Stdio::Pipe` slots past 2, by slot.
    pub(crate) extra: Vec<(usize, OwnedFd)>,
    /// Parent end of the `Stdio::Ipc` slot.
    pub(crate) ipc: Option<OwnedFd>,
}

/// The parent ends, collected while the child ends are placed.
#[derive(Default)]
struct ParentEnds {
    stdio: [Option<OwnedFd>; 3],
    extra: Vec<(usize, OwnedFd)>,
    ipc: Option<OwnedFd>,
}

/// Starts `program` with `args` as `options` say. On error, no process exists.
pub(crate) fn launch(
    program: &OsStr,
    args: &[OsString],
    options: &mut SpawnOptions,
) -> Result<Launched, SpawnError> {
    let fail = |e: io::Error| SpawnError::new(program, args, e);
    let (file, argv) = command_line(program, args, options);

    let nslots = options.stdio.len().max(3);
    let min_fd = RawFd::try_from(nslots)
        .map_err(|_| SpawnError::invalid(program, args, "too many stdio slots"))?;
    let mut ends = ParentEnds::default();
    // The child ends, kept open until the child has them, and where each one goes.
    let mut placed: Vec<OwnedFd> = Vec::with_capacity(nslots);
    let mut dup2s: Vec<(RawFd, RawFd)> = Vec::with_capacity(nslots);
    let mut closes = Vec::new();
    let mut ipc_slot = None;
    // One `/dev/null` serves every `Stdio::Null` slot.
    let mut null: Option<RawFd> = None;
    for (slot, stdio) in options.stdio.iter_mut().enumerate() {
        let target = slot as RawFd;
        let is_null = matches!(stdio, Some(Stdio::Null));
        if let (true, Some(null)) = (is_null, null) {
            *stdio = None;
            dup2s.push((null, target));
            continue;
        }
        let child_end = match stdio.take() {
            None if slot < 3 => continue,
            None => {
                closes.push(target);
                continue;
            }
            Some(Stdio::Inherit) if slot < 3 => continue,
            Some(Stdio::Inherit) => sys::dup_inherited(target, min_fd).map_err(fail)?,
            Some(Stdio::Null) => sys::open_null().map_err(fail)?,
            Some(Stdio::Fd(fd)) => fd,
            Some(Stdio::Pipe) if slot < 3 => {
                let (read, write) = sys::pipe().map_err(fail)?;
                let (parent, child) = if slot == 0 {
                    (write, read)
                } else {
                    (read, write)
                };
                sys::set_fresh_pipe_nonblocking(parent.as_fd()).map_err(fail)?;
                ends.stdio[slot] = Some(parent);
                child
            }
            Some(Stdio::Pipe) => {
                let (parent, child) = UnixStream::pair().map_err(fail)?;
                ends.extra.push((slot, parent.into()));
                child.into()
            }
            Some(Stdio::Ipc) => {
                if ipc_slot.replace(slot).is_some() {
                    return Err(SpawnError::invalid(program, args, "more than one ipc slot"));
                }
                let (parent, child) = UnixStream::pair().map_err(fail)?;
                ends.ipc = Some(parent.into());
                child.into()
            }
        };
        let child_end = if child_end.as_raw_fd() < min_fd {
            sys::dup_at_least(child_end.as_fd(), min_fd).map_err(fail)?
        } else {
            child_end
        };
        if is_null {
            null = Some(child_end.as_raw_fd());
        }
        dup2s.push((child_end.as_raw_fd(), target));
        placed.push(child_end);
    }

    let env = environment(options, ipc_slot);
    let cwd = options.cwd.as_deref();
    let path = resolve(&file, &env, cwd).map_err(fail)?;

    // A failure to enter the working directory looks like the program's (ENOENT, ...):
    // say which it was.
    let fail = |e: io::Error| match cwd {
        Some(dir) if !cwd_usable(dir) => SpawnError::new(program, args, e).in_cwd(dir),
        _ => SpawnError::new(program, args, e),
    };
    // posix_spawn cannot set a parent-death signal: that, like uid and gid, takes the
    // fork path, so the signal is in place before the program runs a single instruction.
    let pid = if options.uid.is_none()
        && options.gid.is_none()
        && options.parent_death_signal.is_none()
    {
        let spawn = |path: &Path, argv: &[OsString]| {
            spawn_fast(
                path,
                argv,
                &env,
                cwd,
                &dup2s,
                &closes,
                min_fd,
                options.detached,
                options.own_group,
            )
        };
        match spawn(&path, &argv) {
            // An executable without `#!`: run it with the shell, as execvp (and so Node)
            // does. The fork path's exec already does this.
            Err(e) if e.raw_os_error() == Some(libc::ENOEXEC) => {
                spawn(Path::new(SHELL), &script_argv(&path, &argv)).map_err(fail)?
            }
            result => result.map_err(fail)?,
        }
    } else {
        spawn_slow(&path, &argv, &env, options, dup2s, closes, min_fd).map_err(fail)?
    };
    drop(placed);
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            // Without a pidfd we cannot manage the child: end it rather than leak it.
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(fail(e));
        }
    };
    let [stdin, stdout, stderr] = ends.stdio;
    Ok(Launched {
        pid: pid as u32,
        pidfd,
        stdin,
        stdout,
        stderr,
        extra: ends.extra,
        ipc: ends.ipc,
    })
}

/// Whether `dir` is a directory this process may enter.
fn cwd_usable(dir: &Path) -> bool {
    dir.is_dir() && nix::unistd::access(dir, nix::unistd::AccessFlags::X_OK).is_ok()
}

/// The shell that runs an executable file that is not a binary and has no `#!` line.
const SHELL: &str = "/bin/sh";

/// execvp's argv for running the script at `path` with [`SHELL`]: the shell, the script,
/// then the script's arguments (its argv0 is dropped).
fn script_argv(path: &Path, argv: &[OsString]) -> Vec<OsString> {
    let mut shell_argv = Vec::with_capacity(argv.len() + 1);
    shell_argv.push(OsString::from(SHELL));
    shell_argv.push(path.as_os_str().to_owned());
    shell_argv.extend(argv.iter().skip(1).cloned());
    shell_argv
}

/// The file to execute and the full argv (with argv0), applying `shell`.
fn command_line(
    program: &OsStr,
    args: &[OsString],
    options: &SpawnOptions,
) -> (OsString, Vec<OsString>) {
    let (file, mut argv) = match &options.shell {
        Some(shell) => {
            let mut command = program.to_owned();
            for arg in args {
                command.push(" ");
                command.push(arg);
            }
            let shell = shell.as_os_str().to_owned();
            (shell.clone(), vec![shell, "-c".into(), command])
        }
        None => {
            let mut argv = Vec::with_capacity(args.len() + 1);
            argv.push(program.to_owned());
            argv.extend(args.iter().cloned());
            (program.to_owned(), argv)
        }
    };
    if let Some(argv0) = &options.argv0 {
        argv[0] = argv0.clone();
    }
    (file, argv)
}

/// Finds `file` like `execvp` does, in the child's `PATH`, relative to its working directory.
fn resolve(file: &OsStr, env: &CStrings, cwd: Option<&Path>) -> io::Result<PathBuf> {
    if file.is_empty() {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    }
    if file.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(file));
    }
    let search = env
        .var("PATH")
        .unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    let mut denied = false;
    for dir in search.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(file);
        let checked = match cwd {
            Some(cwd) if candidate.is_relative() => cwd.join(&candidate),
            _ => candidate.clone(),
        };
        match nix::unistd::access(&checked, nix::unistd::AccessFlags::X_OK) {
            Ok(()) if !checked.is_dir() => return Ok(candidate),
            Ok(()) => {}
            Err(nix::errno::Errno::EACCES) => denied |= checked.exists(),
            Err(_) => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "nul byte in a string"))
}

fn nul_error() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "nul byte in a string")
}

/// The posix_spawn path.
#[allow(clippy::too_many_arguments)] // private plumbing between two functions of this file
fn spawn_fast(
    path: &Path,
    argv: &[OsString],
    env: &CStrings,
    cwd: Option<&Path>,
    dup2s: &[(RawFd, RawFd)],
    closes: &[RawFd],
    close_from: RawFd,
    setsid: bool,
    setpgid: bool,
) -> io::Result<libc::pid_t> {
    let path = cstring(path.as_os_str())?;
    let cwd = cwd.map(|cwd| cstring(cwd.as_os_str())).transpose()?;
    let bytes = argv.iter().map(|arg| arg.len() + 1).sum();
    let mut c_argv = CStrings::with_capacity(argv.len(), bytes);
    for arg in argv {
        c_argv.push(arg);
    }
    if c_argv.has_nul() || env.has_nul() {
        return Err(nul_error());
    }
    debug_assert!(c_argv.len() > 0);
    sys::posix_spawn(&sys::SpawnRequest {
        path: &path,
        argv: &c_argv.pointers(),
        envp: &env.pointers(),
        cwd: cwd.as_deref(),
        dup2s,
        close_from,
        closes,
        setsid,
        setpgid,
    })
}

/// The fork path (`std::process::Command`), for what posix_spawn cannot do: uid, gid and
/// the parent-death signal.
fn spawn_slow(
    path: &Path,
    argv: &[OsString],
    env: &CStrings,
    options: &SpawnOptions,
    dup2s: Vec<(RawFd, RawFd)>,
    closes: Vec<RawFd>,
    close_from: RawFd,
) -> io::Result<libc::pid_t> {
    let mut command = std::process::Command::new(path);
    command
        .arg0(&argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env.pairs());
    command
        .stdin(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::inherit());
    command.stderr(std::process::Stdio::inherit());
    if let Some(cwd) = &options.cwd {
        command.current_dir(cwd);
    }
    if let Some(uid) = options.uid {
        command.uid(uid);
    }
    if let Some(gid) = options.gid {
        command.gid(gid);
    }
    let parent_death = options
        .parent_death_signal
        .map(|signal| (signal as libc::c_int, std::process::id() as libc::pid_t));
    sys::install_child_setup(
        &mut command,
        dup2s,
        closes,
        close_from,
        options.detached,
        options.own_group,
        parent_death,
    );
    // Dropping std's `Child` neither waits nor signals; our pidfd takes over.
    let child = command.spawn()?;
    libc::pid_t::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_searches_the_child_path() {
        let mut env = CStrings::default();
        env.push_pair("PATH".as_ref(), "/nonexistent:/bin".as_ref());
        assert_eq!(
            resolve(OsStr::new("sh"), &env, None).unwrap(),
            Path::new("/bin/sh")
        );
        let err = resolve(OsStr::new("no-such-program-here"), &env, None).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(
            resolve(OsStr::new("./x"), &env, None).unwrap(),
            Path::new("./x")
        );
    }

    #[test]
    fn a_script_runs_as_the_shell_with_the_script_path_first() {
        let argv = [OsString::from("argv0"), "a".into(), "b".into()];
        assert_eq!(
            script_argv(Path::new("/tmp/s"), &argv),
            vec![
                OsString::from("/bin/sh"),
                "/tmp/s".into(),
                "a".into(),
                "b".into()
            ]
        );
    }

    #[test]
    fn shell_joins_program_and_args() {
        let options = SpawnOptions::new().shell("/bin/sh").argv0("mysh");
        let (file, argv) = command_line(OsStr::new("echo"), &["a".into(), "b c".into()], &options);
        assert_eq!(file, "/bin/sh");
        assert_eq!(
            argv,
            vec![OsString::from("mysh"), "-c".into(), "echo a b c".into()]
        );
    }

    /// Runs `script` with `options` plus stdout to a pipe of ours; returns what it printed.
    fn output_of(script: &str, options: SpawnOptions) -> String {
        let (read, write) = sys::pipe().unwrap();
        let mut options = options.stdout(Stdio::Fd(write));
        let args = ["-c".into(), script.into()];
        let launched = launch("/bin/sh".as_ref(), &args, &mut options).unwrap();
        drop(options);
        let process = crate::process::ProcessHandle::new(launched.pid, launched.pidfd);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(read), &mut out).unwrap();
        assert!(process.wait_blocking().unwrap().success());
        out
    }

    #[test]
    fn every_null_slot_is_dev_null_and_no_other_fd_is_open() {
        let options = SpawnOptions::new()
            .stdin(Stdio::Null)
            .stderr(Stdio::Null)
            .stdio(3, Stdio::Null)
            .stdio(4, Stdio::Null);
        // `ls` alone, not in a pipeline: the shell holds a pipeline's pipe (fds 5 and 6)
        // until it has started both sides, and `ls` saw them now and then.
        let script = "readlink /proc/self/fd/0 /proc/self/fd/2 /proc/self/fd/3 /proc/self/fd/4; \
                      ls /proc/$$/fd";
        assert_eq!(
            output_of(script, options),
            "/dev/null\n/dev/null\n/dev/null\n/dev/null\n0\n1\n2\n3\n4\n"
        );
    }

    #[test]
    fn a_piped_parent_end_is_non_blocking_and_keeps_its_access_mode() {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let mut options = SpawnOptions::new().stderr(Stdio::Null);
        let launched = launch("/bin/true".as_ref(), &[], &mut options).unwrap();
        let process = crate::process::ProcessHandle::new(launched.pid, launched.pidfd);
        let flags = |fd: &OwnedFd| OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        let stdin = flags(launched.stdin.as_ref().unwrap());
        let stdout = flags(launched.stdout.as_ref().unwrap());
        assert!(stdin.contains(OFlag::O_NONBLOCK) && stdout.contains(OFlag::O_NONBLOCK));
        assert_eq!(stdin & OFlag::O_ACCMODE, OFlag::O_WRONLY);
        assert_eq!(stdout & OFlag::O_ACCMODE, OFlag::O_RDONLY);
        assert!(process.wait_blocking().unwrap().success());
    }
}
