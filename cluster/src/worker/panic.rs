//! The worker's panic hook: the first panic tells the primary the worker is going down
//! (so its replacement starts at once) and starts the drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::StopReason;
use super::link::Inner;
use crate::protocol::ToPrimary;

/// Chains a hook onto the current panic hook.
pub(crate) fn install(inner: &Arc<Inner>) {
    let inner = Arc::downgrade(inner);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(inner) = inner.upgrade() {
            if !inner.panicked.swap(true, Ordering::SeqCst) {
                inner.send_control(ToPrimary::GoingDown {
                    reason: info.to_string(),
                });
            }
            inner.stop(StopReason::Panicked);
        }
    }));
}
