//! The orphan reaper: one lazily started thread that reaps children whose handles were
//! dropped before they exited, so dropping a handle never leaves a zombie.
//!
//! It polls the orphans' pidfds plus a wake-up pipe, and reaps each orphan as its pidfd
//! becomes readable. It needs no tokio runtime (a runtime may shut down with orphans
//! pending) and no `SIGCHLD` handler. It starts only when the first orphan is handed over.

use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::process::ProcessHandle;

/// The shared state of the reaper thread.
#[derive(Debug)]
struct Reaper {
    orphans: Arc<Orphans>,
    wake: UnixStream,
}

/// The children waiting to be reaped.
type Orphans = Mutex<Vec<Arc<ProcessHandle>>>;

static REAPER: OnceLock<Result<Reaper, io::ErrorKind>> = OnceLock::new();

/// Hands a child whose handle is going away to the reaper (reaping it at once if it has
/// already exited).
pub(crate) fn adopt(process: Arc<ProcessHandle>) {
    if !matches!(process.try_reap(), Ok(None)) {
        return;
    }
    match REAPER.get_or_init(start) {
        Ok(reaper) => {
            reaper
                .orphans
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(process);
            // MSG_NOSIGNAL: if the reaper thread has stopped, this is EPIPE, not SIGPIPE.
            let _ = nix::sys::socket::send(
                std::os::fd::AsRawFd::as_raw_fd(&reaper.wake),
                &[1],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
        }
        Err(kind) => {
            // No reaper thread could be started: reap on a plain thread, else log the leak.
            tracing::warn!(pid = process.pid(), ?kind, "orphan reaper unavailable");
            let _ = std::thread::Builder::new().spawn(move || process.wait_blocking());
        }
    }
}

fn start() -> Result<Reaper, io::ErrorKind> {
    let (wake, wake_rx) = UnixStream::pair().map_err(|e| e.kind())?;
    wake.set_nonblocking(true).map_err(|e| e.kind())?;
    wake_rx.set_nonblocking(true).map_err(|e| e.kind())?;
    let orphans = Arc::new(Mutex::new(Vec::new()));
    let shared = Arc::clone(&orphans);
    std::thread::Builder::new()
        .name("child-reaper".into())
        .stack_size(64 * 1024)
        .spawn(move || run(&shared, wake_rx))
        .map_err(|e| e.kind())?;
    Ok(Reaper { orphans, wake })
}

fn run(orphans: &Orphans, mut wake_rx: UnixStream) {
    loop {
        let snapshot: Vec<Arc<ProcessHandle>> = orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut fds = Vec::with_capacity(snapshot.len() + 1);
        fds.push(PollFd::new(wake_rx.as_fd(), PollFlags::POLLIN));
        fds.extend(
            snapshot
                .iter()
                .map(|p| PollFd::new(p.pidfd(), PollFlags::POLLIN)),
        );
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                tracing::error!(error = %e, "orphan reaper poll failed");
                return;
            }
            continue;
        }
        let ready: Vec<bool> = fds[1..].iter().map(|fd| fd.any().unwrap_or(true)).collect();
        drop(fds);
        let mut buf = [0_u8; 64];
        while matches!(wake_rx.read(&mut buf), Ok(n) if n > 0) {}
        let mut done = Vec::new();
        for (process, ready) in snapshot.iter().zip(ready) {
            if ready && !matches!(process.try_reap(), Ok(None)) {
                done.push(Arc::as_ptr(process));
            }
        }
        if !done.is_empty() {
            let mut orphans = orphans.lock().unwrap_or_else(PoisonError::into_inner);
            orphans.retain(|p| !done.contains(&Arc::as_ptr(p)));
        }
    }
}
