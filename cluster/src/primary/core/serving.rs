//! The core's listening handles: queries and grants, binds, round-robin connections and
//! their hand-offs, closes and the hold timer.

use std::time::Instant;

use super::handles::{ConnId, Handle, HandleKind};
use super::lifecycle::Server;
use super::{Core, Effect, Event, FdRef, MAX_SERVERS_PER_WORKER, Timer};
use crate::Endpoint;
use crate::protocol::{Granted, HandleKey, ToWorker, WorkerId};

impl Core {
    pub(super) fn query_server(&mut self, id: WorkerId, seq: u64, key: HandleKey, backlog: u32) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        if !worker.phase.takes_servers() {
            return; // asked to stop: the query goes unanswered (`Phase::takes_servers`)
        }
        let slot = worker.slot;
        let held = worker.servers.len()
            + self
                .handles
                .values()
                .flat_map(|h| h.binding.values().flatten())
                .filter(|(w, _)| *w == id)
                .count();
        let asked_twice = worker.servers.contains_key(&key)
            || self
                .handles
                .get(&key)
                .is_some_and(|h| h.binding.values().flatten().any(|(w, _)| *w == id));
        if asked_twice {
            return self.misbehaved(id, format!("asked twice for the server {key}"));
        }
        if held >= MAX_SERVERS_PER_WORKER {
            return self.misbehaved(
                id,
                format!("asked for more than {MAX_SERVERS_PER_WORKER} servers"),
            );
        }
        let (policy, hold) = (self.config.policy, self.config.hold);
        let handle = self
            .handles
            .entry(key.clone())
            .or_insert_with(|| Handle::new(policy, key.family, backlog, hold));
        if handle.has_socket(slot) {
            return self.grant(id, seq, &key, slot);
        }
        let socket = handle.socket_for(slot);
        let waiters = handle.binding.entry(socket).or_default();
        waiters.push((id, seq));
        if waiters.len() == 1 {
            let (address, backlog) = (handle.address.clone(), handle.backlog);
            self.out.push(Effect::Bind {
                key,
                socket,
                address,
                backlog,
            });
        }
    }

    /// Lets `id` listen on the bound handle `key`.
    pub(super) fn grant(&mut self, id: WorkerId, seq: u64, key: &HandleKey, slot: usize) {
        let (Some(worker), Some(handle)) = (self.workers.get_mut(&id), self.handles.get_mut(key))
        else {
            return;
        };
        let Some(address) = handle.address.clone() else {
            return;
        };
        // Asked to stop while its socket was being bound: no grant after the disconnect.
        if !worker.phase.takes_servers() {
            return;
        }
        worker.servers.insert(key.clone(), Server::Granted);
        handle.workers.insert(id);
        let (granted, fd) = match &mut handle.kind {
            HandleKind::RoundRobin(rr) => {
                rr.add_worker(id);
                (Granted::RoundRobin, None)
            }
            HandleKind::Shared => (
                Granted::Socket,
                Some(FdRef::Listener {
                    key: key.clone(),
                    socket: None,
                }),
            ),
            HandleKind::ReusePort { .. } => (
                Granted::Socket,
                Some(FdRef::Listener {
                    key: key.clone(),
                    socket: Some(slot),
                }),
            ),
        };
        let result = Ok((granted, address));
        self.send(id, ToWorker::QueryReply { seq, result }, fd);
        self.cancel_timer(Timer::HandleIdle(key.clone()));
        self.dispatch(key);
    }

    pub(super) fn on_bound(
        &mut self,
        key: &HandleKey,
        socket: Option<usize>,
        result: Result<Endpoint, i32>,
        now: Instant,
    ) {
        let Some(handle) = self.handles.get_mut(key) else {
            return;
        };
        let waiters = handle.binding.remove(&socket).unwrap_or_default();
        match result {
            Ok(address) => {
                handle.address.get_or_insert(address);
                if let (HandleKind::ReusePort { slots }, Some(slot)) = (&mut handle.kind, socket) {
                    slots.insert(slot);
                }
                for (id, seq) in waiters {
                    let slot = self.workers.get(&id).map(|w| w.slot);
                    if let Some(slot) = slot {
                        self.grant(id, seq, key, slot);
                    }
                }
            }
            Err(errno) => {
                // Retrying will not change these (another program holds the port, the
                // address is not ours, privileges are missing).
                let lasting = handle.address.is_none()
                    && matches!(
                        errno,
                        libc::EADDRINUSE | libc::EADDRNOTAVAIL | libc::EACCES | libc::EPERM
                    );
                if handle.address.is_none() && handle.is_unused() {
                    self.handles.remove(key);
                }
                for (id, seq) in waiters {
                    let Some(worker) = self.workers.get_mut(&id) else {
                        continue;
                    };
                    if lasting {
                        worker.listen_failed = Some((key.clone(), errno));
                    }
                    let error = std::io::Error::from_raw_os_error(errno);
                    tracing::warn!(%id, %key, %error, "a worker's listen was refused");
                    self.emit(Event::ListenFailed {
                        id,
                        key: key.clone(),
                        errno,
                        lasting,
                    });
                    let result = Err(errno);
                    self.send(id, ToWorker::QueryReply { seq, result }, None);
                }
            }
        }
        self.update_hold(key, now);
    }

    /// The listening socket of `id`'s grant of `key` could not be copied: the grant is
    /// withdrawn (the handle may close if nobody else holds it) and the worker is told.
    pub(super) fn on_grant_failed(
        &mut self,
        id: WorkerId,
        key: &HandleKey,
        seq: u64,
        errno: i32,
        now: Instant,
    ) {
        let Some(worker) = self.workers.get_mut(&id) else {
            return;
        };
        if worker.servers.get(key) != Some(&Server::Granted) {
            return;
        }
        worker.servers.remove(key);
        if let Some(handle) = self.handles.get_mut(key) {
            handle.remove_worker(id);
        }
        let error = std::io::Error::from_raw_os_error(errno);
        tracing::warn!(%id, %key, %error, "could not give a worker its listening socket");
        self.emit(Event::ListenFailed {
            id,
            key: key.clone(),
            errno,
            lasting: false,
        });
        let result = Err(errno);
        self.send(id, ToWorker::QueryReply { seq, result }, None);
        self.idle_handles();
        self.advance_reload(now);
    }

    pub(super) fn on_connection(&mut self, key: HandleKey, conn: ConnId, now: Instant) {
        match self.handles.get_mut(&key).and_then(Handle::round_robin) {
            Some(rr) => {
                rr.push_connection(conn, now);
                self.dispatch(&key);
                self.update_hold(&key, now);
            }
            None => self.out.push(Effect::CloseConn(conn)),
        }
    }

    pub(super) fn on_accepted(
        &mut self,
        id: WorkerId,
        key: &HandleKey,
        seq: u64,
        accepted: bool,
        now: Instant,
    ) {
        let Some(rr) = self.handles.get_mut(key).and_then(Handle::round_robin) else {
            return;
        };
        let before = rr.in_flight(id);
        // An accepted connection is the worker's now: our copy closes.
        if let Some(conn) = rr.reply(id, seq, accepted) {
            self.out.push(Effect::CloseConn(conn));
        }
        let answered = rr.in_flight(id) < before;
        if !accepted {
            let expired = rr.expire(now);
            self.out.extend(expired.into_iter().map(Effect::CloseConn));
        }
        if answered {
            // Progress: its deadline starts again if it still has hand-offs in flight.
            self.refresh_handoff_deadline(id, true);
        }
        self.dispatch(key);
        self.update_hold(key, now);
    }

    /// A hand-off could not be sent for a reason of the primary's own (out of
    /// descriptors for the copy a Node channel keeps): the connection is not the worker's
    /// refusal. It goes back to the front of the queue, and hand-offs on this handle wait
    /// [`RESOURCE_RETRY`](super::RESOURCE_RETRY) (the hold time still bounds the wait).
    pub(super) fn on_handoff_failed(
        &mut self,
        id: WorkerId,
        key: &HandleKey,
        seq: u64,
        now: Instant,
    ) {
        let Some(handle) = self.handles.get_mut(key) else {
            return;
        };
        let Some(rr) = handle.round_robin() else {
            return;
        };
        if !rr.give_back(id, seq) {
            return;
        }
        handle.stalled = true;
        self.start_timer(Timer::Dispatch(key.clone()), now + super::RESOURCE_RETRY);
        self.refresh_handoff_deadline(id, false);
        self.update_hold(key, now);
    }

    /// The `Dispatch` timer: hand-offs on `key` go on after a local failure.
    pub(super) fn resume_dispatch(&mut self, key: &HandleKey, now: Instant) {
        if let Some(handle) = self.handles.get_mut(key) {
            handle.stalled = false;
        }
        self.dispatch(key);
        self.update_hold(key, now);
    }

    pub(super) fn on_close(&mut self, id: WorkerId, key: &HandleKey, now: Instant) {
        let Some(slot) = self.workers.get_mut(&id).map(|worker| {
            worker.servers.remove(key);
            worker.slot
        }) else {
            return;
        };
        let running = self.running();
        let Some(handle) = self.handles.get_mut(key) else {
            return;
        };
        handle.remove_worker(id);
        if handle.is_unused() && running {
            // The application closed its last server on this handle.
            return self.close_handle(key);
        }
        // Under reuseport the slot's socket leaves the group with its last holder, or
        // the kernel would keep sending it connections that nobody accepts.
        let workers = &self.workers;
        let slot_holds = handle
            .workers
            .iter()
            .any(|w| workers.get(w).is_some_and(|w| w.slot == slot));
        if let HandleKind::ReusePort { slots } = &mut handle.kind
            && !slot_holds
            && slots.remove(&slot)
        {
            let (key, socket) = (key.clone(), slot);
            self.out.push(Effect::CloseSocket { key, socket });
        }
        self.dispatch(key);
        self.update_hold(key, now);
        // Its hand-offs on this server went back to the queue.
        self.refresh_handoff_deadline(id, false);
    }

    pub(super) fn close_handle(&mut self, key: &HandleKey) {
        let Some(mut handle) = self.handles.remove(key) else {
            return;
        };
        if let Some(rr) = handle.round_robin() {
            let conns = rr.drain();
            self.out.extend(conns.into_iter().map(Effect::CloseConn));
        }
        self.cancel_timer(Timer::Hold(key.clone()));
        self.out.push(Effect::CloseHandle(key.clone()));
    }

    /// Sends queued connections of a round-robin handle to workers with room in their window.
    pub(super) fn dispatch(&mut self, key: &HandleKey) {
        let Some(rr) = self
            .handles
            .get_mut(key)
            .filter(|h| !h.stalled)
            .and_then(Handle::round_robin)
        else {
            return;
        };
        while let Some(handoff) = rr.next_handoff() {
            let (id, seq, conn) = (handoff.worker, handoff.seq, *handoff.conn);
            if let Some(worker) = self.workers.get_mut(&id) {
                worker.handed += 1;
            }
            self.totals.handed += 1;
            // Its deadline to answer starts with its first hand-off in flight (the field,
            // not `start_timer`: the scheduler is borrowed).
            let timer = Timer::Handoff(id);
            if !self.timers.contains(&timer) {
                self.timers
                    .start(timer, self.now + self.config.handoff_timeout);
            }
            self.out.push(Effect::Send {
                id,
                message: ToWorker::NewConn {
                    key: key.clone(),
                    seq,
                },
                fd: Some(FdRef::Conn(conn)),
            });
        }
    }

    pub(super) fn dispatch_all(&mut self, now: Instant) {
        let keys: Vec<HandleKey> = self.handles.keys().cloned().collect();
        for key in keys {
            self.dispatch(&key);
            self.update_hold(&key, now);
        }
    }

    /// Keeps the `Hold` timer of `key` at its scheduler's next deadline.
    pub(super) fn update_hold(&mut self, key: &HandleKey, now: Instant) {
        let deadline = self
            .handles
            .get_mut(key)
            .and_then(Handle::round_robin)
            .and_then(|rr| rr.next_deadline());
        let timer = Timer::Hold(key.clone());
        match deadline {
            Some(at) if self.timers.get(&timer) != Some(at) => {
                self.start_timer(timer, at.max(now));
            }
            Some(_) => {}
            None => self.cancel_timer(timer),
        }
    }

    /// Pauses accepting on each round-robin handle where `max_held` connections wait, and
    /// resumes below it: the kernel's backlog holds the rest. Allocates only on a change.
    pub(super) fn update_accepting(&mut self) {
        let max = self.config.max_held;
        for (key, handle) in &mut self.handles {
            let Some(queued) = handle.round_robin().map(|rr| rr.queued()) else {
                continue;
            };
            let full = queued >= max;
            if full != handle.paused {
                handle.paused = full;
                if full {
                    self.totals.accept_pauses += 1;
                    tracing::warn!(%key, queued, "no worker takes connections: accepting paused");
                }
                let key = key.clone();
                self.out.push(Effect::Accept { key, on: !full });
            }
        }
    }

    /// Whether `id` has round-robin hand-offs in flight on any handle.
    fn waits_on_handoffs(&mut self, id: WorkerId) -> bool {
        self.handles
            .values_mut()
            .filter_map(Handle::round_robin)
            .any(|rr| rr.in_flight(id) > 0)
    }

    /// Keeps `id`'s `Handoff` timer running exactly while it has hand-offs in flight;
    /// `restart` starts the deadline again (the worker answered one).
    fn refresh_handoff_deadline(&mut self, id: WorkerId, restart: bool) {
        let timer = Timer::Handoff(id);
        if restart || !self.waits_on_handoffs(id) {
            self.cancel_timer(timer.clone());
        }
        if !self.timers.contains(&timer) && self.waits_on_handoffs(id) {
            self.start_timer(timer, self.now + self.config.handoff_timeout);
        }
    }

    /// The hand-off timer of `id` fired: it answered none of its hand-offs in time. A
    /// frozen process that woke later would serve a connection another worker already
    /// served, so it is killed before they go to others.
    pub(super) fn handoff_timed_out(&mut self, id: WorkerId) {
        let waiting = self
            .handles
            .values_mut()
            .filter_map(Handle::round_robin)
            .any(|rr| rr.in_flight(id) > 0);
        if waiting {
            let waited = self.config.handoff_timeout;
            self.misbehaved(id, format!("answered no hand-off within {waited:?}: hung"));
        }
    }

    /// Takes `id` out of every handle, queueing its in-flight hand-offs again.
    pub(super) fn forget_worker(&mut self, id: WorkerId) {
        for handle in self.handles.values_mut() {
            handle.remove_worker(id);
        }
        self.cancel_timer(Timer::Handoff(id));
        self.idle_handles();
    }

    /// Starts the idle timer of every handle no worker holds: unless a worker takes it up
    /// again within the hold time (a replacement, say), it closes, so its port refuses
    /// connections instead of holding them for nobody.
    pub(super) fn idle_handles(&mut self) {
        if !self.running() {
            return;
        }
        let idle: Vec<HandleKey> = self
            .handles
            .iter()
            .filter(|(key, h)| {
                h.is_unused() && !self.timers.contains(&Timer::HandleIdle((*key).clone()))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            self.start_timer(Timer::HandleIdle(key), self.now + self.config.hold);
        }
    }

    /// The idle timer of `key` fired: close it if still nobody holds it.
    pub(super) fn handle_idle(&mut self, key: &HandleKey) {
        if self.handles.get(key).is_some_and(Handle::is_unused) {
            tracing::info!(%key, "no worker holds this server any more: closing it");
            self.close_handle(key);
        }
    }
}
