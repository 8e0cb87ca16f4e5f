//! What one connection is doing, and the pure rules that track it and that a draining
//! worker applies to it.
//!
//! A keep-alive client may send its next request at any moment; closing an idle
//! connection under it loses that request (the client sees a reset or an early EOF, and a
//! balancer marks the host as failed). So a draining worker never closes a connection it
//! has just used: the next request on it is answered with `Connection: close`, after which
//! hyper stops reading and closes. Only a connection that has been idle for
//! [`IDLE_CLOSE`] (since it was accepted or since its last response was written) is
//! closed, because by then no request of an active client is plausibly on its way; the
//! grace deadline closes the rest.
//!
//! A connection that has sent part of a request head has no request in flight either:
//! there is nothing to answer until the head is complete. hyper waits for the rest of a
//! first head even when told to shut down, so one client that stalls mid-head would hold
//! the whole drain for the grace period. Such a connection is dropped once no byte of it
//! has arrived for [`IDLE_CLOSE`] (nginx closes it at a graceful stop too); one whose
//! head is still arriving gets its request answered.
//!
//! ```text
//!  accept    bytes read          head complete          response ready
//!  ──> Idle ────────────> Head ───────────────> Busy ─────────────────> Responding
//!       ^                 more bytes: since = now                           │
//!       └───────────────────────────────────────────────────────────────────┘
//!                   written (hyper flushed its buffer): since = now
//! ```

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long a draining worker lets a connection sit idle before closing it: a keep-alive
/// client in use sends its next request far sooner (microseconds to milliseconds on a
/// LAN), a pooled connection unused this long is a spare. The same bound applies to a
/// request head that stopped arriving.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(1);

/// Where one connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activity {
    /// Nothing of a request read since `since` (the accept or the last response written).
    Idle {
        /// When the connection last became idle.
        since: Instant,
    },
    /// Part of a request head read, no complete head yet: no request to answer.
    Head {
        /// When its first bytes arrived.
        began: Instant,
        /// When the last bytes of it arrived.
        since: Instant,
    },
    /// A request is being handled; its response will carry `Connection: close` if the
    /// drain has begun, and hyper closes the connection once it is written.
    Busy,
    /// Its response is ready and being written.
    Responding,
}

/// What happened on a connection, as [`Activity::after`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Bytes were read from the socket.
    Read,
    /// hyper parsed a complete request head and called the service.
    Request,
    /// The service's response is ready.
    Response,
    /// hyper's write buffer is empty and the socket flushed.
    Flushed,
}

impl Activity {
    /// Where a connection is after `step`; `now` is asked only when a quiet period starts
    /// (the clock is read twice per request, not at every step).
    pub(crate) fn after(self, step: Step, now: impl FnOnce() -> Instant) -> Activity {
        match (self, step) {
            // Bytes read while a request is handled or answered are a pipelined request,
            // or the rest of a request body: the response's end says what follows.
            (Activity::Idle { .. }, Step::Read) => {
                let now = now();
                Activity::Head {
                    began: now,
                    since: now,
                }
            }
            (Activity::Head { began, .. }, Step::Read) => Activity::Head {
                began,
                since: now(),
            },
            (_, Step::Request) => Activity::Busy,
            (Activity::Busy, Step::Response) => Activity::Responding,
            (Activity::Responding, Step::Flushed) => Activity::Idle { since: now() },
            (activity, _) => activity,
        }
    }
}

/// What a draining watcher does with its connection next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DrainStep {
    /// Shut it down now: it has been idle for [`IDLE_CLOSE`] (hyper closes an idle
    /// connection at once).
    Close,
    /// Drop it now: its request head stopped arriving [`IDLE_CLOSE`] ago. hyper would wait
    /// for the rest; nothing was asked, so no answer is lost.
    Drop,
    /// Look again at this instant (unless the connection ends before).
    Recheck(Instant),
}

/// The drain rule: close a connection idle for `idle_close`, drop one whose request head
/// has not advanced for `idle_close`, otherwise wait.
pub(crate) fn drain_step(activity: Activity, now: Instant, idle_close: Duration) -> DrainStep {
    let after_quiet = |since: Instant, step| {
        let at = since + idle_close;
        if now >= at {
            step
        } else {
            DrainStep::Recheck(at)
        }
    };
    match activity {
        // Its response closes it; look again in case it was written just before the drain.
        Activity::Busy | Activity::Responding => DrainStep::Recheck(now + idle_close),
        Activity::Idle { since } => after_quiet(since, DrainStep::Close),
        Activity::Head { since, .. } => after_quiet(since, DrainStep::Drop),
    }
}

/// The rule while serving, in place of hyper's header read timeout (which arms, and
/// boxes, a timer for every request): close a connection idle for `timeout`, drop one
/// whose request head began `timeout` ago and is still not complete, otherwise wait. The
/// caller keeps one timer per connection, re-armed only when it fires.
pub(crate) fn serving_step(activity: Activity, now: Instant, timeout: Duration) -> DrainStep {
    let after = |from: Instant, step| {
        let at = from + timeout;
        if now >= at {
            step
        } else {
            DrainStep::Recheck(at)
        }
    };
    match activity {
        Activity::Busy | Activity::Responding => DrainStep::Recheck(now + timeout),
        Activity::Idle { since } => after(since, DrainStep::Close),
        Activity::Head { began, .. } => after(began, DrainStep::Drop),
    }
}

/// A connection's [`Activity`], shared by its socket (which marks reads and flushes), its
/// service (which marks requests and responses) and its watcher (which reads it once
/// draining).
#[derive(Debug, Clone)]
pub(crate) struct ActivityCell(Arc<Mutex<Activity>>);

impl ActivityCell {
    /// A connection accepted now, idle until its first bytes.
    pub(crate) fn new() -> Self {
        Self(Arc::new(Mutex::new(Activity::Idle {
            since: Instant::now(),
        })))
    }

    /// Records `step`.
    pub(crate) fn record(&self, step: Step) {
        let mut activity = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *activity = activity.after(step, Instant::now);
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
        check(Activity::Responding, t0, DrainStep::Recheck(t0 + T));
    }

    fn head(began: Instant, since: Instant) -> Activity {
        Activity::Head { began, since }
    }

    #[test]
    fn a_request_head_that_stopped_arriving_is_dropped_after_the_threshold() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        check(head(t0, t0), t0, DrainStep::Recheck(t0 + T));
        check(head(t0, t0), t0 + ms(300), DrainStep::Recheck(t0 + T));
        check(head(t0, t0), t0 + T, DrainStep::Drop);
        check(
            head(t0, t0),
            t0 + T + Duration::from_secs(5),
            DrainStep::Drop,
        );
        // Draining looks at the last bytes, not at when the head began.
        check(
            head(t0, t0 + ms(500)),
            t0 + T,
            DrainStep::Recheck(t0 + ms(500) + T),
        );
    }

    #[track_caller]
    fn check_serving(activity: Activity, now: Instant, expected: DrainStep) {
        let timeout = Duration::from_secs(30);
        assert_eq!(
            serving_step(activity, now, timeout),
            expected,
            "{activity:?}"
        );
    }

    #[test]
    fn serving_closes_idle_connections_and_drops_slow_heads_after_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        check_serving(
            Activity::Idle { since: t0 },
            t0 + s(29),
            DrainStep::Recheck(t0 + s(30)),
        );
        check_serving(Activity::Idle { since: t0 }, t0 + s(30), DrainStep::Close);
        // A head that keeps trickling in is still dropped 30 s after it began, as hyper's
        // header read timeout does.
        check_serving(
            head(t0, t0 + s(29)),
            t0 + s(29),
            DrainStep::Recheck(t0 + s(30)),
        );
        check_serving(head(t0, t0 + s(29)), t0 + s(30), DrainStep::Drop);
        check_serving(Activity::Busy, t0, DrainStep::Recheck(t0 + s(30)));
        check_serving(Activity::Responding, t0, DrainStep::Recheck(t0 + s(30)));
    }

    /// Runs `steps` from a connection idle since `t0`, one millisecond apart; returns
    /// where it ends.
    fn run(t0: Instant, steps: &[Step]) -> Activity {
        let mut activity = Activity::Idle { since: t0 };
        for (n, step) in (1..).zip(steps) {
            activity = activity.after(*step, || t0 + Duration::from_millis(n));
        }
        activity
    }

    #[test]
    fn the_steps_of_a_request_lead_from_idle_through_head_busy_responding_to_idle() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        use Step::{Flushed, Read, Request, Response};
        let cases: &[(&[Step], Activity)] = &[
            (&[Read], head(ms(1), ms(1))),
            // Each read of a head that is still arriving restarts its quiet period.
            (&[Read, Read], head(ms(1), ms(2))),
            (&[Read, Request], Activity::Busy),
            // A flush before the response (hyper flushes on every turn) changes nothing.
            (&[Read, Request, Flushed], Activity::Busy),
            (&[Read, Request, Response], Activity::Responding),
            // Pipelined bytes while answering do not make it a stalled head.
            (&[Read, Request, Response, Read], Activity::Responding),
            (
                &[Read, Request, Response, Flushed],
                Activity::Idle { since: ms(4) },
            ),
            (&[Flushed], Activity::Idle { since: t0 }),
            // The next request of a keep-alive connection.
            (
                &[Read, Request, Response, Flushed, Read],
                head(ms(5), ms(5)),
            ),
        ];
        for (steps, expected) in cases {
            assert_eq!(run(t0, steps), *expected, "{steps:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_cell_records_steps_at_the_current_time() {
        let cell = ActivityCell::new();
        let accepted = Instant::now();
        assert_eq!(cell.get(), Activity::Idle { since: accepted });
        tokio::time::advance(Duration::from_millis(5)).await;
        cell.record(Step::Read);
        let read = accepted + Duration::from_millis(5);
        assert_eq!(cell.get(), head(read, read));
        cell.record(Step::Request);
        cell.record(Step::Response);
        tokio::time::advance(Duration::from_millis(20)).await;
        cell.record(Step::Flushed);
        assert_eq!(
            cell.get(),
            Activity::Idle {
                since: accepted + Duration::from_millis(25)
            }
        );
    }
}
