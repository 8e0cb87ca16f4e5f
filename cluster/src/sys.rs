//! The crate's only `unsafe`: registering a listening socket or a pidfd with the reactor,
//! accepting with `accept4`, and looking at and taking ownership of descriptors inherited
//! at exec.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `listener` (a non-blocking listening socket, TCP or Unix) registered with the current
/// runtime's reactor for readability, to accept on it without handing it to a task.
pub(crate) fn readable_listener(listener: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` owns its descriptor, which stays open and the same for its
    // whole life; the `AsyncFd` owns it, so the descriptor outlives the registration.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A copy of a child's pidfd registered with the current runtime's reactor: it turns
/// readable when the process exits (before it is reaped).
pub(crate) fn readable_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<AsyncFd<OwnedFd>> {
    let pidfd = pidfd.try_clone_to_owned()?;
    // SAFETY: as in `readable_listener`: the `AsyncFd` owns the copy, which stays open and
    // the same for the whole registration.
    unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Accepts one connection on `listener` as a non-blocking, close-on-exec socket, in one
/// `accept4` call. Non-blocking matters beyond this process: a Node worker that gets the
/// socket uses it as it is (libuv does not change the mode of a received descriptor), and
/// Node's own primary hands over non-blocking sockets.
pub(crate) fn accept_nonblocking(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: `accept4` with null address pointers writes nothing through them; the
    // borrowed descriptor is open for the call.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `accept4` returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `inspect` on descriptor `fd`, which this process inherited from whoever started
/// it, without taking it. Fails with `EBADF` if it is not open.
pub(crate) fn inspect_inherited<T>(
    fd: std::os::fd::RawFd,
    inspect: impl FnOnce(BorrowedFd<'_>) -> T,
) -> io::Result<T> {
    // SAFETY: `F_GETFD` only reads the flags of a descriptor number, for any number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and stays open while borrowed: the
    // borrow lasts only for `inspect`, which cannot close it, and this runs before the
    // process starts its runtime's threads (`take_inherited_sockets`), or on the thread
    // that starts the primary, where nothing closes a descriptor meanwhile.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(inspect(fd))
}

/// Takes ownership of descriptor `fd`, which this process inherited from whoever started
/// it (systemd's `LISTEN_FDS`, an upgrading primary's readiness socket). Fails with
/// `EBADF` if it is not open.
pub(crate) fn adopt_inherited(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: `F_GETFD` only reads the flags of a descriptor number, for any number.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor is open (checked above) and nothing in this process owns it:
    // it was passed to us at exec (for `LISTEN_FDS`, checked to be a listening socket,
    // which no runtime opens at an inherited number), and each variable naming it is read
    // once per process (`systemd::Inherited::read_env`, `systemd::UpgradeReadiness::from_env`).
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
