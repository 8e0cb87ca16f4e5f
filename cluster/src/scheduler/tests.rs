//! Tests of the round-robin scheduler: examples and a model-checked property test.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::RoundRobinHandle;

const HOLD: Duration = Duration::from_secs(5);

/// Runs every pending hand-off and returns them as `(worker, seq, conn)`.
fn handoffs(rr: &mut RoundRobinHandle<u32, u8>) -> Vec<(u8, u64, u32)> {
    let mut out = Vec::new();
    while let Some(h) = rr.next_handoff() {
        out.push((h.worker, h.seq, *h.conn));
    }
    out
}

#[test]
fn sequential_connections_go_round_robin() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 1);
    for w in [1, 2, 4, 3] {
        rr.add_worker(w);
    }
    let mut order = Vec::new();
    for conn in 0..20 {
        rr.push_connection(conn, now);
        let [(worker, seq, c)] = handoffs(&mut rr)[..] else {
            panic!("one hand-off expected");
        };
        assert_eq!(c, conn);
        assert_eq!(rr.reply(worker, seq, true), Some(conn));
        order.push(worker);
    }
    assert_eq!(order[..8], [1, 2, 4, 3, 1, 2, 4, 3]);
}

/// A worker that stalls with half its window unanswered gets no new hand-off while
/// another has that many fewer in flight; one whose replies are merely a little late
/// keeps its turns, and the stalled one is back in turn once it answers.
#[test]
fn a_stalled_worker_is_passed_over_and_a_slightly_late_one_is_not() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 8);
    assert_eq!(rr.stall_margin(), 4);
    rr.add_worker(1);
    rr.add_worker(2);
    (0..8).for_each(|c| rr.push_connection(c, now));
    let first = handoffs(&mut rr);
    let workers: Vec<u8> = first.iter().map(|h| h.0).collect();
    assert_eq!(
        workers,
        [1, 2, 1, 2, 1, 2, 1, 2],
        "turns while both keep up"
    );
    // Worker 2 answers two: worker 1, two behind, is merely late and keeps its turn.
    for &(w, seq, conn) in first.iter().filter(|h| h.0 == 2).take(2) {
        assert_eq!(rr.reply(w, seq, true), Some(conn));
    }
    rr.push_connection(8, now);
    assert_eq!(handoffs(&mut rr)[0].0, 1, "a little late is not stalled");
    // Worker 2 answers the rest: worker 1 is now 5 ahead, stalled.
    for &(w, seq, conn) in first.iter().filter(|h| h.0 == 2).skip(2) {
        assert_eq!(rr.reply(w, seq, true), Some(conn));
    }
    (9..11).for_each(|c| rr.push_connection(c, now));
    let next: Vec<u8> = handoffs(&mut rr).iter().map(|h| h.0).collect();
    assert_eq!(next, [2, 2], "not queued behind the stalled worker");
}

#[test]
fn a_burst_is_spread_evenly() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 1);
    (0..4).for_each(|w| rr.add_worker(w));
    (0..200).for_each(|c| rr.push_connection(c, now));
    let mut counts: HashMap<u8, usize> = HashMap::new();
    let mut pending: VecDeque<(u8, u64, u32)> = handoffs(&mut rr).into();
    while let Some((worker, seq, _)) = pending.pop_front() {
        *counts.entry(worker).or_default() += 1;
        assert!(rr.reply(worker, seq, true).is_some());
        pending.extend(handoffs(&mut rr));
    }
    assert_eq!(
        counts.values().copied().collect::<HashSet<_>>(),
        [50].into()
    );
}

#[test]
fn a_refused_connection_goes_to_another_worker_then_is_closed() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 1);
    rr.add_worker(1);
    rr.add_worker(2);
    rr.push_connection(7, now);
    assert_eq!(handoffs(&mut rr), [(1, 0, 7)]);
    assert_eq!(rr.reply(1, 0, false), None);
    assert_eq!(handoffs(&mut rr), [(2, 1, 7)]);
    assert_eq!(rr.reply(2, 1, false), None);
    assert_eq!(handoffs(&mut rr), []);
    assert_eq!(rr.expire(now), [7]);
}

#[test]
fn a_dead_workers_connection_is_handed_to_another() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 1);
    rr.add_worker(1);
    rr.push_connection(7, now);
    assert_eq!(handoffs(&mut rr), [(1, 0, 7)]);
    rr.remove_worker(1);
    assert_eq!(rr.queued(), 1);
    assert_eq!(rr.reply(1, 0, true), None, "a late reply is ignored");
    rr.add_worker(2);
    assert_eq!(handoffs(&mut rr), [(2, 1, 7)]);
}

#[test]
fn a_retired_worker_keeps_its_hand_off_until_it_replies() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 1);
    rr.add_worker(1);
    rr.add_worker(2);
    rr.push_connection(7, now);
    assert_eq!(handoffs(&mut rr), [(1, 0, 7)]);
    rr.retire_worker(1);
    assert_eq!(rr.in_flight(1), 1);
    assert_eq!(rr.reply(1, 0, false), None);
    assert_eq!(handoffs(&mut rr), [(2, 1, 7)]);
    rr.push_connection(8, now);
    assert_eq!(rr.reply(2, 1, true), Some(7));
    assert_eq!(
        handoffs(&mut rr),
        [(2, 2, 8)],
        "never to the retired worker"
    );
}

#[test]
fn connections_are_held_while_no_worker_exists() {
    let now = Instant::now();
    let mut rr: RoundRobinHandle<u32, u8> = RoundRobinHandle::new(HOLD, 1);
    rr.push_connection(1, now);
    rr.push_connection(2, now + Duration::from_secs(1));
    assert_eq!(rr.next_deadline(), Some(now + HOLD));
    assert!(rr.expire(now + Duration::from_secs(4)).is_empty());
    assert_eq!(rr.expire(now + HOLD), [1]);
    rr.add_worker(9);
    assert_eq!(handoffs(&mut rr), [(9, 0, 2)]);
}

#[test]
fn a_window_sends_several_before_any_reply_and_takes_turns() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 3);
    rr.add_worker(1);
    rr.add_worker(2);
    (0..8).for_each(|c| rr.push_connection(c, now));
    let sent = handoffs(&mut rr);
    let workers: Vec<u8> = sent.iter().map(|(w, _, _)| *w).collect();
    assert_eq!(workers, [1, 2, 1, 2, 1, 2], "turns, three each, then full");
    assert_eq!((rr.in_flight(1), rr.in_flight(2), rr.queued()), (3, 3, 2));
    // A reply out of order makes room: the worker joins the line again.
    let (w, seq, conn) = sent[2];
    assert_eq!(rr.reply(w, seq, true), Some(conn));
    assert_eq!(handoffs(&mut rr), [(1, 6, 6)]);
}

#[test]
fn a_dead_workers_window_is_requeued_oldest_first() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 4);
    rr.add_worker(1);
    (0..3).for_each(|c| rr.push_connection(c, now));
    assert_eq!(handoffs(&mut rr).len(), 3);
    rr.push_connection(3, now);
    assert_eq!(handoffs(&mut rr), [(1, 3, 3)]);
    rr.remove_worker(1);
    assert_eq!(rr.queued(), 4);
    rr.add_worker(2);
    let conns: Vec<u32> = handoffs(&mut rr).iter().map(|(_, _, c)| *c).collect();
    assert_eq!(conns, [0, 1, 2, 3]);
}

#[test]
fn a_refusal_in_a_window_goes_to_another_worker() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD, 2);
    rr.add_worker(1);
    rr.add_worker(2);
    (0..4).for_each(|c| rr.push_connection(c, now));
    assert_eq!(
        handoffs(&mut rr),
        [(1, 0, 0), (2, 1, 1), (1, 2, 2), (2, 3, 3)]
    );
    assert_eq!(rr.reply(1, 2, false), None);
    assert_eq!(
        handoffs(&mut rr),
        [],
        "worker 2 is full, worker 1 refused it"
    );
    assert_eq!(rr.reply(2, 1, true), Some(1));
    assert_eq!(handoffs(&mut rr), [(2, 4, 2)]);
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8),
    Retire(u8),
    Remove(u8),
    Push,
    /// `worker`'s reply to its `nth` oldest hand-off in flight (modulo how many it has).
    Reply(u8, usize, bool),
    /// The primary could not send `worker`'s `nth` oldest hand-off in flight.
    GiveBack(u8, usize),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Add),
        1 => (0u8..4).prop_map(Op::Retire),
        1 => (0u8..4).prop_map(Op::Remove),
        5 => Just(Op::Push),
        6 => ((0u8..4), (0usize..8), proptest::bool::weighted(0.8))
            .prop_map(|(w, n, a)| Op::Reply(w, n, a)),
        1 => (0u64..3000).prop_map(Op::Advance),
        1 => ((0u8..4), (0usize..8)).prop_map(|(w, n)| Op::GiveBack(w, n)),
    ]
}

/// What the test knows independently of the scheduler.
#[derive(Default)]
struct Model {
    window: usize,
    registered: Vec<u8>,
    /// Registered workers with room, in turn order.
    ready: VecDeque<u8>,
    /// Each worker's hand-offs in flight, oldest first: `(seq, conn)`.
    in_flight: HashMap<u8, Vec<(u64, u32)>>,
    /// Connections waiting, with the workers that refused them.
    waiting: HashMap<u32, Vec<u8>>,
    /// Connections in flight, with the workers that refused them before.
    refusals: HashMap<u32, Vec<u8>>,
    done: HashSet<u32>,
}

impl Model {
    fn servable_by(&self, worker: u8) -> bool {
        self.waiting
            .values()
            .any(|refused| !refused.contains(&worker))
    }

    fn in_flight(&self, worker: u8) -> usize {
        self.in_flight.get(&worker).map_or(0, Vec::len)
    }

    fn check_handoffs(&mut self, rr: &mut RoundRobinHandle<u32, u8>) {
        while let Some(h) = rr.next_handoff() {
            let (worker, seq, conn) = (h.worker, h.seq, *h.conn);
            assert!(
                self.registered.contains(&worker),
                "hand-off to an unregistered worker"
            );
            assert!(
                self.in_flight(worker) < self.window,
                "more hand-offs in flight than the window"
            );
            // Turns, passing over the stalled: the first ready worker in line that can
            // take something and has fewer than the margin in flight beyond the least
            // busy such worker.
            let servable: Vec<u8> = self
                .ready
                .iter()
                .copied()
                .filter(|w| self.servable_by(*w))
                .collect();
            let fewest = servable.iter().map(|w| self.in_flight(*w)).min();
            let margin = (self.window / 2).max(1);
            let expected = servable
                .iter()
                .copied()
                .find(|w| fewest.is_some_and(|f| self.in_flight(*w) < f + margin));
            assert_eq!(Some(worker), expected, "not the worker whose turn it is");
            let refused = self.waiting.remove(&conn).expect("a waiting connection");
            assert!(
                !refused.contains(&worker),
                "offered again to a worker that refused it"
            );
            self.ready.retain(|w| *w != worker);
            let flights = self.in_flight.entry(worker).or_default();
            flights.push((seq, conn));
            if flights.len() < self.window {
                self.ready.push_back(worker);
            }
            self.refusals.insert(conn, refused);
        }
        // Quiescent: no ready worker can take a waiting connection.
        for w in &self.ready {
            assert!(!self.servable_by(*w), "a ready worker was left with work");
        }
        assert!(
            self.in_flight.values().all(|f| f.len() <= self.window),
            "over the window"
        );
    }
}

proptest! {
    #[test]
    fn every_connection_is_delivered_once_or_expired(
        window in 1usize..=crate::protocol::HANDOFF_WINDOW,
        ops in proptest::collection::vec(op(), 1..200),
    ) {
        let start = Instant::now();
        let mut now = start;
        let mut rr = RoundRobinHandle::new(HOLD, window);
        let mut model = Model { window, ..Model::default() };
        let mut next_conn = 0u32;
        let mut arrived: HashMap<u32, Instant> = HashMap::new();
        for op in ops {
            match op {
                Op::Add(w) => {
                    rr.add_worker(w);
                    if !model.registered.contains(&w) {
                        model.registered.push(w);
                        if model.in_flight(w) < window {
                            model.ready.push_back(w);
                        }
                    }
                }
                Op::Retire(w) => {
                    rr.retire_worker(w);
                    model.registered.retain(|x| *x != w);
                    model.ready.retain(|x| *x != w);
                }
                Op::Remove(w) => {
                    rr.remove_worker(w);
                    model.registered.retain(|x| *x != w);
                    model.ready.retain(|x| *x != w);
                    // Requeued at the front, oldest first.
                    for (_, conn) in model.in_flight.remove(&w).unwrap_or_default() {
                        let refused = model.refusals.remove(&conn).unwrap_or_default();
                        model.waiting.insert(conn, refused);
                    }
                    prop_assert_eq!(rr.in_flight(w), 0);
                }
                Op::Push => {
                    rr.push_connection(next_conn, now);
                    model.waiting.insert(next_conn, Vec::new());
                    arrived.insert(next_conn, now);
                    next_conn += 1;
                }
                Op::Reply(w, nth, accepted) => {
                    let flights = model.in_flight.entry(w).or_default();
                    if flights.is_empty() {
                        model.in_flight.remove(&w);
                        prop_assert_eq!(rr.reply(w, 0, accepted), None);
                        continue;
                    }
                    let was_full = flights.len() >= window;
                    let (seq, conn) = flights.remove(nth % flights.len());
                    if flights.is_empty() {
                        model.in_flight.remove(&w);
                    }
                    prop_assert_eq!(rr.reply(w, seq + 1000, accepted), None, "wrong seq ignored");
                    let got = rr.reply(w, seq, accepted);
                    prop_assert_eq!(rr.reply(w, seq, accepted), None, "a second reply is ignored");
                    let mut refused = model.refusals.remove(&conn).unwrap_or_default();
                    if accepted {
                        prop_assert_eq!(got, Some(conn));
                        prop_assert!(model.done.insert(conn), "delivered twice");
                    } else {
                        prop_assert_eq!(got, None);
                        refused.push(w);
                        model.waiting.insert(conn, refused);
                    }
                    if was_full && model.registered.contains(&w) {
                        model.ready.push_back(w);
                    }
                }
                Op::GiveBack(w, nth) => {
                    let flights = model.in_flight.entry(w).or_default();
                    if flights.is_empty() {
                        model.in_flight.remove(&w);
                        prop_assert!(!rr.give_back(w, 0));
                        continue;
                    }
                    let was_full = flights.len() >= window;
                    let (seq, conn) = flights.remove(nth % flights.len());
                    if flights.is_empty() {
                        model.in_flight.remove(&w);
                    }
                    prop_assert!(rr.give_back(w, seq));
                    prop_assert!(!rr.give_back(w, seq), "given back once");
                    // Waiting again, refused by no one new.
                    let refused = model.refusals.remove(&conn).unwrap_or_default();
                    model.waiting.insert(conn, refused);
                    if was_full && model.registered.contains(&w) {
                        model.ready.push_back(w);
                    }
                }
                Op::Advance(ms) => now += Duration::from_millis(ms),
            }
            model.check_handoffs(&mut rr);
            for conn in rr.expire(now) {
                let refused = model.waiting.remove(&conn).expect("only waiting connections expire");
                let by_all = !model.registered.is_empty()
                    && model.registered.iter().all(|w| refused.contains(w));
                prop_assert!(by_all || now.duration_since(arrived[&conn]) >= HOLD);
                prop_assert!(model.done.insert(conn), "expired after delivery");
            }
            // Expiry may free nothing for ready workers, but re-check quiescence anyway.
            model.check_handoffs(&mut rr);
            prop_assert_eq!(rr.queued(), model.waiting.len());
            for w in 0u8..4 {
                prop_assert_eq!(rr.in_flight(w), model.in_flight(w));
            }
        }
        // Conservation: every connection is done, waiting or in flight, exactly once.
        let in_flight: HashSet<u32> =
            model.in_flight.values().flatten().map(|(_, c)| *c).collect();
        for conn in 0..next_conn {
            let places = usize::from(model.done.contains(&conn))
                + usize::from(model.waiting.contains_key(&conn))
                + usize::from(in_flight.contains(&conn));
            prop_assert_eq!(places, 1, "connection {} is in {} places", conn, places);
        }
        let mut left = rr.drain();
        left.sort_unstable();
        let mut expected: Vec<u32> = model.waiting.keys().copied().chain(in_flight).collect();
        expected.sort_unstable();
        prop_assert_eq!(left, expected);
    }
}
