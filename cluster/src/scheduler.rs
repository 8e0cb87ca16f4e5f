//! The round-robin scheduler as a pure state machine: no I/O, no clock of its own.
//!
//! [`RoundRobinHandle`] is Node's `RoundRobinHandle` with the holes closed:
//!
//! - Accepted connections wait in a FIFO; workers with room wait in a FIFO (*ready*).
//!   A connection goes to the first ready worker in line that is not stalled (half its
//!   window or more in flight beyond the least busy one), which then has it *in flight*
//!   until it replies, and goes to the back of the line if it still has room.
//!   A worker has at most `window` hand-offs in flight (Node: one); a full worker joins
//!   the back of the line again when a reply makes room. So two workers that keep up
//!   take turns, and a worker that falls behind is passed over until it catches up.
//! - A refused connection goes back to the front of the queue and is not offered again to
//!   a worker that refused it; once every worker has refused it, it is closed. One the
//!   primary could not send ([`give_back`](RoundRobinHandle::give_back)) goes back to the
//!   front refused by nobody.
//! - A worker that goes away ([`remove_worker`](RoundRobinHandle::remove_worker)) gives
//!   its in-flight connections back to the front of the queue, oldest first: Node loses
//!   them.
//! - With no worker to take them, connections are held until their hold time runs out,
//!   instead of being refused; [`expire`](RoundRobinHandle::expire) returns the ones due.
//!
//! `C` is a connection (the primary uses an accepted socket), `W` a worker id.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Queued<C, W> {
    conn: C,
    since: Instant,
    refused_by: Vec<W>,
}

#[derive(Debug)]
struct InFlight<C, W> {
    seq: u64,
    queued: Queued<C, W>,
}

/// One hand-off the caller must now perform: send `conn` to `worker`, tagged `seq`.
#[derive(Debug)]
pub(crate) struct Handoff<'a, C, W> {
    /// The worker to send to.
    pub(crate) worker: W,
    /// The tag the worker's reply must carry.
    pub(crate) seq: u64,
    /// The connection (still owned by the handle until the worker accepts it).
    pub(crate) conn: &'a C,
}

/// The round-robin state of one listening handle. See the module docs.
#[derive(Debug)]
pub(crate) struct RoundRobinHandle<C, W> {
    /// Workers that may get new hand-offs.
    workers: Vec<W>,
    /// Registered workers with room (fewer than `window` in flight), in turn order.
    ready: VecDeque<W>,
    queue: VecDeque<Queued<C, W>>,
    /// Each worker's hand-offs in flight, oldest first; never more than `window`.
    in_flight: HashMap<W, Vec<InFlight<C, W>>>,
    hold: Duration,
    window: usize,
    next_seq: u64,
}

impl<C, W: Copy + Eq + Hash> RoundRobinHandle<C, W> {
    /// An empty handle; connections wait at most `hold` for a worker, and a worker has
    /// at most `window` hand-offs in flight (at least 1; 1 is Node's rule).
    pub(crate) fn new(hold: Duration, window: usize) -> Self {
        Self {
            workers: Vec::new(),
            ready: VecDeque::new(),
            queue: VecDeque::new(),
            in_flight: HashMap::new(),
            hold,
            window: window.max(1),
            next_seq: 0,
        }
    }

    /// Registers `worker`, last in line if it has room. Adding a registered worker does
    /// nothing.
    pub(crate) fn add_worker(&mut self, worker: W) {
        if self.workers.contains(&worker) {
            return;
        }
        self.workers.push(worker);
        if self.in_flight(worker) < self.window {
            self.ready.push_back(worker);
        }
    }

    /// Stops new hand-offs to `worker`, which is stopping but alive: a hand-off in flight
    /// stays until the worker replies (it may still accept it).
    pub(crate) fn retire_worker(&mut self, worker: W) {
        self.workers.retain(|w| *w != worker);
        self.ready.retain(|w| *w != worker);
    }

    /// Forgets `worker`, which is gone: its in-flight connections go back to the front of
    /// the queue, oldest first, for another worker.
    pub(crate) fn remove_worker(&mut self, worker: W) {
        self.retire_worker(worker);
        if let Some(flights) = self.in_flight.remove(&worker) {
            for flight in flights.into_iter().rev() {
                self.queue.push_front(flight.queued);
            }
        }
    }

    /// Queues a connection accepted at `now`.
    pub(crate) fn push_connection(&mut self, conn: C, now: Instant) {
        self.queue.push_back(Queued {
            conn,
            since: now,
            refused_by: Vec::new(),
        });
    }

    /// Records `worker`'s reply to hand-off `seq`. Returns the connection if the worker
    /// accepted it (the caller closes its copy). A refused connection is queued again;
    /// a reply that matches nothing in flight is ignored and returns `None`.
    pub(crate) fn reply(&mut self, worker: W, seq: u64, accepted: bool) -> Option<C> {
        let flights = self.in_flight.get_mut(&worker)?;
        let pos = flights.iter().position(|f| f.seq == seq)?;
        let was_full = flights.len() >= self.window;
        let mut flight = flights.remove(pos);
        if flights.is_empty() {
            self.in_flight.remove(&worker);
        }
        if was_full && self.workers.contains(&worker) {
            self.ready.push_back(worker);
        }
        if accepted {
            return Some(flight.queued.conn);
        }
        flight.queued.refused_by.push(worker);
        self.queue.push_front(flight.queued);
        None
    }

    /// Takes back hand-off `seq` of `worker`, which could not be sent for a reason of the
    /// primary's own (no descriptor to copy it with): the connection goes back to the
    /// front of the queue, not refused by anyone. Returns whether it was in flight.
    pub(crate) fn give_back(&mut self, worker: W, seq: u64) -> bool {
        let Some(flights) = self.in_flight.get_mut(&worker) else {
            return false;
        };
        let Some(pos) = flights.iter().position(|f| f.seq == seq) else {
            return false;
        };
        let was_full = flights.len() >= self.window;
        let flight = flights.remove(pos);
        if flights.is_empty() {
            self.in_flight.remove(&worker);
        }
        if was_full && self.workers.contains(&worker) {
            self.ready.push_back(worker);
        }
        self.queue.push_front(flight.queued);
        true
    }

    /// The next hand-off: the first ready worker in line that can take something and is
    /// not stalled gets the oldest connection it has not refused. Call until it returns
    /// `None` after every change.
    ///
    /// Stalled: [`stall_margin`](Self::stall_margin) or more hand-offs in flight beyond
    /// the fewest any such worker has. A worker that stalls (a slow request, a garbage
    /// collection) keeps its hand-offs unanswered, and new connections go to the others
    /// instead of queueing behind it, up to the window; replies that merely come back a
    /// little later than another worker's change nothing, so a burst of long-lived
    /// connections is still split by turns.
    pub(crate) fn next_handoff(&mut self) -> Option<Handoff<'_, C, W>> {
        // `(line position, queue position, in flight)` of each ready worker that can take
        // something; twice over the line (a handful of workers), no allocation per call.
        let servable = || {
            self.ready.iter().enumerate().filter_map(|(wi, w)| {
                let ci = self.queue.iter().position(|q| !q.refused_by.contains(w))?;
                Some((wi, ci, self.in_flight(*w)))
            })
        };
        let fewest = servable().map(|(_, _, n)| n).min()?;
        let margin = self.stall_margin();
        let (worker_pos, conn_pos, _) =
            servable().find(|&(_, _, in_flight)| in_flight < fewest + margin)?;
        let worker = self.ready.remove(worker_pos)?;
        let queued = self.queue.remove(conn_pos)?;
        let seq = self.next_seq;
        self.next_seq += 1;
        let flights = self.in_flight.entry(worker).or_default();
        flights.push(InFlight { seq, queued });
        if flights.len() < self.window {
            self.ready.push_back(worker);
        }
        let flight = flights.last()?;
        Some(Handoff {
            worker,
            seq,
            conn: &flight.queued.conn,
        })
    }

    /// Removes and returns the queued connections that can no longer be served: held past
    /// their hold time at `now`, or refused by every registered worker.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<C> {
        let (hold, workers) = (self.hold, &self.workers);
        let mut expired = Vec::new();
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for queued in self.queue.drain(..) {
            let refused_by_all =
                !workers.is_empty() && workers.iter().all(|w| queued.refused_by.contains(w));
            if refused_by_all || now.saturating_duration_since(queued.since) >= hold {
                expired.push(queued.conn);
            } else {
                kept.push_back(queued);
            }
        }
        self.queue = kept;
        expired
    }

    /// When the oldest queued connection's hold time runs out, if any is queued.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queue.iter().map(|q| q.since + self.hold).min()
    }

    /// How many connections wait for a worker.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// How many more hand-offs in flight than the least busy ready worker make a worker
    /// stalled: half the window (at least 1, so with Node's window of one every ready
    /// worker is idle and turns decide).
    pub(crate) fn stall_margin(&self) -> usize {
        (self.window / 2).max(1)
    }

    /// How many hand-offs `worker` has in flight (at most the window).
    pub(crate) fn in_flight(&self, worker: W) -> usize {
        self.in_flight.get(&worker).map_or(0, Vec::len)
    }

    /// Takes every connection out (queued and in flight), for closing the handle.
    pub(crate) fn drain(&mut self) -> Vec<C> {
        let mut all: Vec<C> = self.queue.drain(..).map(|q| q.conn).collect();
        all.extend(
            self.in_flight
                .drain()
                .flat_map(|(_, f)| f.into_iter().map(|f| f.queued.conn)),
        );
        self.ready = self.workers.iter().copied().collect();
        all
    }
}

#[cfg(test)]
mod tests;
