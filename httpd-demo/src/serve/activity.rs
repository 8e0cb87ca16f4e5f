//! What one connection is doing, and the pure rule a draining worker applies to it.
//!
//! A keep-alive client may send its next request at any moment; closing an idle
//! connection under it loses that request (the client sees a reset or an early EOF, and a
//! balancer marks the host as failed). So a draining worker never closes a connection it
//! has just used: the next request on it is answered with `Connection: close`, after which
//! hyper stops reading and closes. Only a connection that has been idle for
//! [`IDLE_CLOSE`] (since it was accepted or since its last response) is closed, because by
//! then no request of an active client is plausibly on its way; the grace deadline closes
//! the rest.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a draining worker lets a connection sit idle before closing it: a keep-alive
/// client in use sends its next request far sooner (microseconds to milliseconds on a
/// LAN), a pooled connection unused this long is a spare.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// Where one connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    /// No request is being handled, since `since` (the accept or the last response).
    Idle {
        /// When the connection last became idle.
        since: Instant,
    },
    /// A request is being handled; its response will carry `Connection: close` if the
    /// drain has begun, and hyper closes the connection once it is written.
    Busy,
}

/// What a draining watcher does with its connection next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainStep {
    /// Close it now: it has been idle for [`IDLE_CLOSE`].
    Close,
    /// Look again at this instant (unless the connection ends before).
    Recheck(Instant),
}

/// The drain rule: close a connection idle for `idle_close`, otherwise wait.
pub(crate) fn drain_step(activity: Activity, now: Instant, idle_close: Duration) -> DrainStep {
    match activity {
        // Its response closes it; look again in case it was written just before the drain.
        Activity::Busy => DrainStep::Recheck(now + idle_close),
        Activity::Idle { since } => {
            let at = since + idle_close;
            if now >= at {
                DrainStep::Close
            } else {
                DrainStep::Recheck(at)
            }
        }
    }
}

/// A connection's [`Activity`], shared by its service (which marks requests) and its
/// watcher (which reads it once draining).
#[derive(Debug, Clone)]
pub(crate) struct ActivityCell(Arc<Mutex<Activity>>);

impl ActivityCell {
    /// A connection accepted now, idle until its first request.
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(Activity::Idle {
            since: Instant::now(),
        })))
    }

    fn set(&self, activity: Activity) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = activity;
    }

    /// A request has arrived.
    pub(crate) fn busy(&self) {
        self.set(Activity::Busy);
    }

    /// Its response is ready.
    pub(crate) fn idle(&self) {
        self.set(Activity::Idle {
            since: Instant::now(),
        });
    }

    pub(crate) fn get(&self) -> Activity {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = IDLE_CLOSE;

    #[track_caller]
    fn check(activity: Activity, now: Instant, expected: DrainStep) {
        assert_eq!(drain_step(activity, now, T), expected, "{activity:?}");
    }

    #[test]
    fn a_connection_idle_for_the_threshold_is_closed() {
        let t0 = Instant::now();
        check(Activity::Idle { since: t0 }, t0 + T, DrainStep::Close);
        check(
            Activity::Idle { since: t0 },
            t0 + T + Duration::from_secs(5),
            DrainStep::Close,
        );
    }

    #[test]
    fn a_recently_used_connection_waits_for_its_next_request() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        check(Activity::Idle { since: t0 }, t0, DrainStep::Recheck(t0 + T));
        check(
            Activity::Idle { since: t0 },
            t0 + ms(300),
            DrainStep::Recheck(t0 + T),
        );
    }

    #[test]
    fn a_busy_connection_is_closed_by_its_response() {
        let t0 = Instant::now();
        check(Activity::Busy, t0, DrainStep::Recheck(t0 + T));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cell_records_requests_and_responses() {
        let cell = ActivityCell::new();
        let accepted = Instant::now();
        assert_eq!(cell.get(), Activity::Idle { since: accepted });
        cell.busy();
        assert_eq!(cell.get(), Activity::Busy);
        tokio::time::advance(Duration::from_millis(20)).await;
        cell.idle();
        assert_eq!(
            cell.get(),
            Activity::Idle {
                since: accepted + Duration::from_millis(20)
            }
        );
    }
}
