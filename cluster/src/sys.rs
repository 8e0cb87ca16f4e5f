//! The crate's only `unsafe`: registering a listening socket with the reactor.

use std::io;
use std::net::TcpListener;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `listener` (non-blocking) registered with the current runtime's reactor for
/// readability, to accept on it without handing it to a task.
pub(crate) fn readable_listener(listener: TcpListener) -> io::Result<AsyncFd<TcpListener>> {
    // SAFETY: a `TcpListener` owns its descriptor, which stays open and the same for the
    // listener's whole life; the `AsyncFd` owns the listener, so the descriptor outlives
    // the registration.
    unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}
