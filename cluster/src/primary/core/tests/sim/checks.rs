//! What the simulator checks: each event against the worker's history, the invariants
//! after every step, and a stop that ends clean.

use std::collections::HashSet;

use super::{ConnState, Sim};
use crate::Event;
use crate::primary::core::{ConnId, Outcome, Request};

impl Sim {
    pub(super) fn record(&mut self, event: &Event) {
        let (id, kind) = match event {
            Event::Fork { id, .. } => (*id, "fork"),
            Event::Online { id } => (*id, "online"),
            Event::Listening { id, .. } => (*id, "listening"),
            Event::Disconnect { id } => (*id, "disconnect"),
            Event::Exit {
                id,
                status,
                exited_after_disconnect,
                cause,
            } => {
                self.exits.insert(*id, (*status, *exited_after_disconnect));
                self.causes.insert(*id, *cause);
                assert!(
                    *cause != crate::ExitCause::MemoryLimit || self.memory_limited.contains(id),
                    "{id} exited for its memory without being said to be above the limit"
                );
                use crate::ExitCause::{Asked, Disconnect, MemoryLimit};
                let asked = matches!(cause, Asked | MemoryLimit);
                assert!(
                    !asked || *exited_after_disconnect,
                    "{id}: asked to stop ({cause}) but not exitedAfterDisconnect"
                );
                assert!(
                    !*exited_after_disconnect || asked || *cause == Disconnect,
                    "{id}: exitedAfterDisconnect but the cause is {cause}"
                );
                (*id, "exit")
            }
            Event::MemoryLimit { id, .. } => {
                // Said again only after a replacement that failed (the old worker kept).
                let again = !self.memory_limited.insert(*id);
                assert!(
                    !again || !self.reload_failed.is_empty(),
                    "{id} said to be above the memory limit twice"
                );
                // (Its replacement may already have taken over by now: a worker that listens
                // on nothing is replaced in the same step.)
                assert!(
                    self.core.workers.contains_key(id),
                    "{id} is gone before its replacement"
                );
                (*id, "other")
            }
            Event::ReloadEnded { .. } => return,
            Event::Misbehaved { id, reason } => {
                let hostile = self.procs.get(id).is_some_and(|p| p.hostile);
                assert!(
                    hostile || reason.ends_with("hung"),
                    "{id} kept the protocol but was flagged: {reason}"
                );
                self.misbehaved.push(*id);
                (*id, "other")
            }
            Event::SparePromoted { id, .. } => {
                let worker = self.core.workers.get(id).expect("a promoted spare is live");
                assert!(worker.spare.is_none(), "{id} promoted but still a spare");
                (*id, "other")
            }
            Event::GoingDown { id, .. }
            | Event::Ready { id }
            | Event::ListenFailed { id, .. }
            | Event::NotConnected { id, .. } => (*id, "other"),
            Event::ReloadFailed { slot, .. } => {
                self.reload_failed.push(*slot);
                return;
            }
            Event::SlotFailed { slot, .. } => {
                *self.slot_failed.entry(*slot).or_default() += 1;
                return;
            }
            Event::Message { .. } | Event::Output { .. } => return,
        };
        let seen = self.events.entry(id).or_default();
        let rank = |k: &str| match k {
            "fork" => 0,
            "online" => 1,
            "listening" => 2,
            "disconnect" => 3,
            _ => 4,
        };
        match kind {
            "fork" => assert!(seen.is_empty(), "{id}: fork after {seen:?}"),
            _ => assert_eq!(seen.first(), Some(&"fork"), "{id}: {kind} before fork"),
        }
        // GoingDown and Misbehaved may come at any time before the exit.
        if let Some(last) = seen.iter().copied().rfind(|k| *k != "other")
            && kind != "other"
        {
            assert!(
                rank(kind) >= rank(last),
                "{id}: {kind} after {last}: {seen:?}"
            );
        }
        for once in ["fork", "online", "disconnect", "exit"] {
            assert!(
                !(kind == once && seen.contains(&once)),
                "{id}: {once} twice"
            );
        }
        assert!(!seen.contains(&"exit"), "{id}: {kind} after exit");
        seen.push(kind);
    }

    /// What holds after every step.
    pub(super) fn check(&mut self) {
        for (timer, at) in self.core.timers.armed_since(self.timers_checked) {
            assert!(at >= self.now, "{timer:?} armed in the past");
        }
        self.timers_checked = self.core.timers.next_seq();
        for (key, handle) in &self.core.handles {
            let queued = match &handle.kind {
                crate::primary::core::handles::HandleKind::RoundRobin(rr) => rr.queued(),
                _ => 0,
            };
            // Only hand-offs given back by a dying worker come on top of a full queue.
            let max = self.core.config.max_held;
            assert_eq!(
                self.paused.contains(key),
                queued >= max,
                "accepting paused iff full"
            );
        }
        for (slot, count) in &self.slot_failed {
            assert_eq!(*count, 1, "slot {slot} given up {count} times");
        }
        for id in self.core.workers.keys() {
            assert!(
                !self.events.get(id).is_some_and(|e| e.contains(&"exit")),
                "{id} exited but is still in the table"
            );
        }
    }

    /// Stops the primary and checks that it ends clean.
    pub(crate) fn stop_and_check(&mut self) {
        let stop = self.request(Request::Stop { grace: None });
        self.settle(10_000);
        assert!(self.finished, "the stop did not finish: {:?}", self.core);
        assert!(
            matches!(self.replies.get(&stop), Some(Outcome::Done)),
            "{:?}",
            self.replies.get(&stop)
        );
        assert!(self.core.workers.is_empty());
        assert!(self.core.handles.is_empty());
        assert_eq!(
            self.core.poll_timeout(),
            None,
            "timers left: {:?}",
            self.core.timers
        );
        for (id, events) in &self.events {
            let exits = events.iter().filter(|k| **k == "exit").count();
            assert_eq!(exits, 1, "{id}: {events:?}");
        }
        let held: HashSet<ConnId> = self
            .conns
            .iter()
            .filter(|(_, s)| **s == ConnState::Held)
            .map(|(c, _)| *c)
            .collect();
        assert!(held.is_empty(), "connections never closed: {held:?}");
    }
}
