//! The worker's panic hook: the first panic tells the primary the worker is going down
//! (so its replacement starts at once) and starts the drain.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::StopReason;
use super::session::Session;
use crate::protocol::ToPrimary;

/// Chains a hook onto the current panic hook.
pub(crate) fn install(session: &Arc<Session>) {
    let session = Arc::downgrade(session);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        if let Some(session) = session.upgrade() {
            if !session.panicked.swap(true, Ordering::SeqCst) {
                session.send_control(ToPrimary::GoingDown {
                    reason: info.to_string(),
                });
            }
            session.stop(StopReason::Panicked);
        }
    }));
}
