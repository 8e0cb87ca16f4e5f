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
    let mut rr = RoundRobinHandle::new(HOLD);
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

#[test]
fn a_burst_is_spread_evenly() {
    let now = Instant::now();
    let mut rr = RoundRobinHandle::new(HOLD);
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
    let mut rr = RoundRobinHandle::new(HOLD);
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
    let mut rr = RoundRobinHandle::new(HOLD);
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
    let mut rr = RoundRobinHandle::new(HOLD);
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
    let mut rr: RoundRobinHandle<u32, u8> = RoundRobinHandle::new(HOLD);
    rr.push_connection(1, now);
    rr.push_connection(2, now + Duration::from_secs(1));
    assert_eq!(rr.next_deadline(), Some(now + HOLD));
    assert!(rr.expire(now + Duration::from_secs(4)).is_empty());
    assert_eq!(rr.expire(now + HOLD), [1]);
    rr.add_worker(9);
    assert_eq!(handoffs(&mut rr), [(9, 0, 2)]);
}

#[derive(Debug, Clone)]
enum Op {
    Add(u8),
    Retire(u8),
    Remove(u8),
    Push,
    Reply(u8, bool),
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4).prop_map(Op::Add),
        1 => (0u8..4).prop_map(Op::Retire),
        1 => (0u8..4).prop_map(Op::Remove),
        5 => Just(Op::Push),
        6 => ((0u8..4), proptest::bool::weighted(0.8)).prop_map(|(w, a)| Op::Reply(w, a)),
        1 => (0u64..3000).prop_map(Op::Advance),
    ]
}

/// What the test knows independently of the scheduler.
#[derive(Default)]
struct Model {
    registered: Vec<u8>,
    /// Registered workers with nothing in flight, in the order they became idle.
    idle: VecDeque<u8>,
    in_flight: HashMap<u8, (u64, u32)>,
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

    fn check_handoffs(&mut self, rr: &mut RoundRobinHandle<u32, u8>) {
        while let Some(h) = rr.next_handoff() {
            let (worker, seq, conn) = (h.worker, h.seq, *h.conn);
            assert!(
                self.registered.contains(&worker),
                "hand-off to an unregistered worker"
            );
            assert!(
                !self.in_flight.contains_key(&worker),
                "two hand-offs in flight"
            );
            // FIFO fairness: the longest-idle worker that can take something gets it.
            let expected = self.idle.iter().copied().find(|w| self.servable_by(*w));
            assert_eq!(Some(worker), expected, "not the longest-idle worker");
            let refused = self.waiting.remove(&conn).expect("a waiting connection");
            assert!(
                !refused.contains(&worker),
                "offered again to a worker that refused it"
            );
            self.idle.retain(|w| *w != worker);
            self.in_flight.insert(worker, (seq, conn));
            self.refusals.insert(conn, refused);
        }
        // Quiescent: no idle worker can take a waiting connection.
        for w in &self.idle {
            assert!(!self.servable_by(*w), "an idle worker was left with work");
        }
    }
}

proptest! {
    #[test]
    fn every_connection_is_delivered_once_or_expired(ops in proptest::collection::vec(op(), 1..200)) {
        let start = Instant::now();
        let mut now = start;
        let mut rr = RoundRobinHandle::new(HOLD);
        let mut model = Model::default();
        let mut next_conn = 0u32;
        let mut arrived: HashMap<u32, Instant> = HashMap::new();
        for op in ops {
            match op {
                Op::Add(w) => {
                    rr.add_worker(w);
                    if !model.registered.contains(&w) {
                        model.registered.push(w);
                        if !model.in_flight.contains_key(&w) {
                            model.idle.push_back(w);
                        }
                    }
                }
                Op::Retire(w) => {
                    rr.retire_worker(w);
                    model.registered.retain(|x| *x != w);
                    model.idle.retain(|x| *x != w);
                }
                Op::Remove(w) => {
                    rr.remove_worker(w);
                    model.registered.retain(|x| *x != w);
                    model.idle.retain(|x| *x != w);
                    if let Some((_, conn)) = model.in_flight.remove(&w) {
                        let refused = model.refusals.remove(&conn).unwrap_or_default();
                        model.waiting.insert(conn, refused);
                    }
                }
                Op::Push => {
                    rr.push_connection(next_conn, now);
                    model.waiting.insert(next_conn, Vec::new());
                    arrived.insert(next_conn, now);
                    next_conn += 1;
                }
                Op::Reply(w, accepted) => {
                    let Some((seq, conn)) = model.in_flight.remove(&w) else {
                        prop_assert_eq!(rr.reply(w, 0, accepted), None);
                        continue;
                    };
                    prop_assert_eq!(rr.reply(w, seq + 1000, accepted), None, "wrong seq ignored");
                    let got = rr.reply(w, seq, accepted);
                    let mut refused = model.refusals.remove(&conn).unwrap_or_default();
                    if accepted {
                        prop_assert_eq!(got, Some(conn));
                        prop_assert!(model.done.insert(conn), "delivered twice");
                    } else {
                        prop_assert_eq!(got, None);
                        refused.push(w);
                        model.waiting.insert(conn, refused);
                    }
                    if model.registered.contains(&w) {
                        model.idle.push_back(w);
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
            // Expiry may free nothing for idle workers, but re-check quiescence anyway.
            model.check_handoffs(&mut rr);
            prop_assert_eq!(rr.queued(), model.waiting.len());
        }
        // Conservation: every connection is done, waiting or in flight, exactly once.
        let in_flight: HashSet<u32> = model.in_flight.values().map(|(_, c)| *c).collect();
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
