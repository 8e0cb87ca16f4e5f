//! The one system call of `cargo xtask chaos` that nix does not wrap for another process:
//! prlimit(2) on `RLIMIT_NOFILE`.

use std::io;

/// A process's `RLIMIT_NOFILE` (soft, hard).
pub(crate) fn nofile(pid: u32) -> io::Result<(u64, u64)> {
    prlimit(pid, None)
}

/// Sets a process's `RLIMIT_NOFILE` to `(soft, hard)`; returns the limits before.
pub(crate) fn set_nofile(pid: u32, limits: (u64, u64)) -> io::Result<(u64, u64)> {
    prlimit(pid, Some(limits))
}

fn prlimit(pid: u32, new: Option<(u64, u64)>) -> io::Result<(u64, u64)> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let new = new.map(|(soft, hard)| libc::rlimit64 {
        rlim_cur: soft,
        rlim_max: hard,
    });
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit64);
    // SAFETY: `new_ptr` is null or points to a live `rlimit64`, `old` is a live, writable
    // `rlimit64`; prlimit64 reads and writes only those for the process `pid`.
    let rc = unsafe { libc::prlimit64(pid, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
    if rc == 0 {
        Ok((old.rlim_cur, old.rlim_max))
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_sets_its_own_limit() {
        let me = std::process::id();
        let (soft, hard) = nofile(me).expect("prlimit");
        assert!(soft <= hard);
        assert_eq!(set_nofile(me, (soft, hard)).expect("set"), (soft, hard));
    }
}
