//! Signal dispositions for the helper binaries that play a C host or a CLI: the only
//! `unsafe` code of the tests crate.

use nix::sys::signal::{SigHandler, Signal, signal};

/// Sets `sig` to `handler` for the whole process.
pub fn set_disposition(sig: Signal, handler: SigHandler) -> nix::Result<()> {
    assert!(matches!(handler, SigHandler::SigDfl | SigHandler::SigIgn));
    // SAFETY: only `SIG_DFL` and `SIG_IGN` are installed here (no handler function runs),
    // and the helpers call this at the start of `main`, before any other thread exists.
    unsafe { signal(sig, handler) }.map(drop)
}
