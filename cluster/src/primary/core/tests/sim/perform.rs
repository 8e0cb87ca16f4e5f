//! The simulated driver: performs the core's effects on the simulated world as the
//! driver does on the real one, feeds back what the core needs at once (a fork's pid, a
//! bind's address, a failed copy, a kill's result), and asserts what each effect may
//! assume (no message after an exit, no connection closed twice, no fork after the end).

use std::collections::VecDeque;

use super::{BOUND, ConnState, Proc, Sim, signaled};
use crate::primary::core::{Effect, FdRef, Input, Outcome, RequestId};
use crate::protocol::ToWorker;

impl Sim {
    pub(super) fn perform(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            let fed = match effect {
                Effect::Fork { id, .. } => {
                    assert!(!self.procs.contains_key(&id), "{id} forked twice");
                    assert!(!self.finished, "fork after the end");
                    if std::mem::take(&mut self.fail_next_fork) {
                        // Out of descriptors, or a program that is not there.
                        let errno = match self.fork_failure_transient {
                            true => libc::EMFILE,
                            false => libc::ENOENT,
                        };
                        let error = std::io::Error::from_raw_os_error(errno);
                        let error = child::Error::Ipc(ipc::Error::Io(error));
                        Some(Input::ForkFailed { id, error })
                    } else {
                        let alive = true;
                        let channel = true;
                        let proc = Proc {
                            alive,
                            channel,
                            ..Proc::default()
                        };
                        self.procs.insert(id, proc);
                        let pid = 1000 + u32::try_from(id.0).expect("small");
                        Some(Input::Forked { id, pid })
                    }
                }
                Effect::Sample(pids) => {
                    assert!(!self.finished, "a sample after the end");
                    let samples = pids
                        .into_iter()
                        .map(|(id, _pid)| {
                            let proc = self.procs.get(&id).filter(|p| p.alive);
                            let sample = proc.map(|p| crate::primary::core::Sample {
                                rss_bytes: p.rss,
                                cpu_time: std::time::Duration::ZERO,
                            });
                            (id, sample)
                        })
                        .collect();
                    Some(Input::Usage(samples))
                }
                Effect::Send { id, message, fd } => {
                    let events = self.events.get(&id).map(Vec::as_slice).unwrap_or(&[]);
                    assert!(
                        !events.contains(&"exit"),
                        "a message for {id} after its exit"
                    );
                    if let Some(FdRef::Conn(conn)) = &fd {
                        assert_eq!(self.conns.get(conn), Some(&ConnState::Held));
                    }
                    let spare = self
                        .core
                        .workers
                        .get(&id)
                        .is_some_and(|w| w.spare.is_some());
                    assert!(
                        !spare || matches!(message, ToWorker::Disconnect),
                        "a spare was sent {message:?}: its queries are held, it gets no connection"
                    );
                    match (&fd, &message) {
                        (Some(FdRef::Conn(_)), ToWorker::NewConn { key, seq })
                            if self.fail_handoffs > 0 =>
                        {
                            self.fail_handoffs -= 1;
                            Some(Input::HandoffFailed {
                                id,
                                key: key.clone(),
                                seq: *seq,
                            })
                        }
                        (Some(FdRef::Listener { key, .. }), ToWorker::QueryReply { seq, .. })
                            if self.fail_next_copy.is_some() =>
                        {
                            Some(Input::GrantFailed {
                                id,
                                key: key.clone(),
                                seq: *seq,
                                errno: self.fail_next_copy.take().expect("checked"),
                            })
                        }
                        _ => {
                            if let Some(p) = self.procs.get_mut(&id).filter(|p| p.channel) {
                                p.inbox.push_back((message, fd));
                            }
                            None
                        }
                    }
                }
                Effect::Kill {
                    id,
                    signal,
                    request,
                } => {
                    let status = signaled(signal);
                    if let Some(p) = self.procs.get_mut(&id).filter(|p| p.alive) {
                        p.alive = false;
                        if std::mem::replace(&mut p.channel, false) {
                            self.inputs
                                .push_back(Input::ChannelClosed { id, broken: None });
                        }
                        self.inputs.push_back(Input::Exited { id, status });
                    }
                    request.map(|request| Input::Signaled {
                        request,
                        result: Ok(()),
                    })
                }
                Effect::Bind { key, socket, .. } => {
                    let result = match self.fail_next_bind.take() {
                        Some(errno) => Err(errno),
                        None => Ok(BOUND.parse().expect("address")),
                    };
                    Some(Input::Bound {
                        key,
                        socket,
                        result,
                    })
                }
                Effect::Accept { key, on } => {
                    assert_eq!(self.paused.contains(&key), on, "told twice");
                    if on {
                        self.paused.remove(&key);
                    } else {
                        self.paused.insert(key);
                    }
                    None
                }
                Effect::CloseHandle(key) => {
                    self.paused.remove(&key);
                    None
                }
                Effect::CloseSocket { .. } => None,
                Effect::CloseConn(conn) => {
                    let state = self.conns.get_mut(&conn).expect("a known connection");
                    match *state {
                        ConnState::Held => *state = ConnState::Closed,
                        // The worker took it: the primary's copy closes, once.
                        ConnState::Served(_) => {}
                        ConnState::Closed => panic!("{conn:?} closed twice"),
                    }
                    None
                }
                Effect::Forget(id) => {
                    let exited = self.events.get(&id).is_some_and(|e| e.contains(&"exit"));
                    assert!(exited, "{id} forgotten before its exit");
                    assert!(!self.procs[&id].alive, "{id} forgotten alive");
                    None
                }
                Effect::Emit(event) => {
                    self.record(&event);
                    None
                }
                Effect::Reply(request, outcome) => {
                    self.reply(request, outcome);
                    None
                }
                Effect::Finished => {
                    assert!(!self.finished, "finished twice");
                    self.finished = true;
                    None
                }
            };
            if let Some(input) = fed {
                queue.extend(self.core.handle(self.now, input));
            }
        }
    }

    fn reply(&mut self, request: RequestId, outcome: Outcome) {
        assert!(
            self.replies.insert(request, outcome).is_none(),
            "{request:?} answered twice"
        );
    }
}
