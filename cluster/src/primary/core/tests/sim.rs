//! A simulated world around [`Core`]: worker processes that answer (or not), a clock
//! that moves to the core's deadlines, sockets that bind, accepted connections. It performs effects as the driver
//! does (`sim/perform.rs`) and checks (`sim/checks.rs`), after every step, what must hold
//! whatever happens.

mod checks;
mod perform;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use child::{ExitStatus, Signal};

use super::super::{Config, ConnId, Core, FdRef, Input, Outcome, Request, RequestId};
use crate::protocol::{Granted, HandleKey, ToPrimary, ToWorker, WorkerId};
use crate::settings::{Policy, RestartPolicy};

/// The address every simulated bind gets.
pub(super) const BOUND: &str = "127.0.0.1:4000";

/// A simulated worker process.
#[derive(Debug, Default)]
pub(super) struct Proc {
    pub(super) alive: bool,
    pub(super) channel: bool,
    /// Messages the primary sent, not yet read.
    pub(super) inbox: VecDeque<(ToWorker, Option<FdRef>)>,
    pub(super) online: bool,
    next_index: u32,
    /// Servers granted and not closed, by key index.
    servers: HashSet<u32>,
    pub(super) asked: bool,
    /// Whether it said it is ready (`wait_ready`).
    pub(super) ready: bool,
    /// Whether it broke the protocol on purpose (garbage, lies, speaking before it was
    /// online): only such a worker, or a hung one, may be flagged as misbehaving.
    pub(super) hostile: bool,
    /// Its resident set size, as a `Sample` reads it.
    pub(super) rss: u64,
}

/// What a connection went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnState {
    /// The core holds it.
    Held,
    /// A worker accepted it; the core closed its copy.
    Served(WorkerId),
    /// Closed without being served.
    Closed,
}

#[derive(Debug)]
pub(super) struct Sim {
    pub(super) core: Core,
    pub(super) now: Instant,
    pub(super) procs: BTreeMap<WorkerId, Proc>,
    /// The core's timer sequence number at the last check: timers armed since then
    /// are checked not to be in the past.
    timers_checked: u64,
    conns: BTreeMap<ConnId, ConnState>,
    next_conn: u64,
    next_request: u64,
    pub(super) replies: HashMap<RequestId, Outcome>,
    /// Every worker's events, in order.
    pub(super) events: BTreeMap<WorkerId, Vec<&'static str>>,
    pub(super) slot_failed: HashMap<usize, usize>,
    /// Exits: status and `exited_after_disconnect`.
    pub(super) exits: BTreeMap<WorkerId, (ExitStatus, bool)>,
    pub(super) misbehaved: Vec<WorkerId>,
    pub(super) reload_failed: Vec<usize>,
    /// Workers the core said were above the memory limit.
    pub(super) memory_limited: HashSet<WorkerId>,
    /// Exit causes, by worker.
    pub(super) causes: BTreeMap<WorkerId, crate::ExitCause>,
    /// Round-robin handles the core told the driver to stop accepting on.
    pub(super) paused: HashSet<HandleKey>,
    pub(super) fail_next_fork: bool,
    /// Whether that failure is for lack of resources.
    pub(super) fork_failure_transient: bool,
    /// The errno the next first bind of a handle fails with.
    pub(super) fail_next_bind: Option<i32>,
    /// The errno the next copy of a listening socket for a grant fails with.
    pub(super) fail_next_copy: Option<i32>,
    /// How many of the next hand-offs cannot be sent (no descriptor for the copy).
    pub(super) fail_handoffs: usize,
    pub(super) finished: bool,
    inputs: VecDeque<Input>,
}

pub(super) fn config(workers: usize, policy: Policy) -> Config {
    Config {
        workers,
        policy,
        restart: RestartPolicy::new()
            .backoff_min(Duration::from_millis(100))
            .backoff_max(Duration::from_millis(800))
            .stable_after(Duration::from_secs(5))
            .crash_loop_limit(4, Duration::from_secs(30)),
        drain_deadline: Duration::from_secs(3),
        hold: Duration::from_secs(2),
        exit_grace: Duration::from_secs(1),
        reload_timeout: Duration::from_secs(20),
        max_held: 3,
        handoff_timeout: Duration::from_secs(15),
        connect_timeout: Duration::from_secs(4),
        wait_ready: false,
        sample_every: None,
        max_rss: None,
        stop_delay: Duration::ZERO,
        warm_spares: 0,
    }
}

pub(super) fn key(index: u32) -> HandleKey {
    HandleKey::loopback(index)
}

impl Sim {
    pub(super) fn new(config: Config) -> Self {
        let now = Instant::now();
        let mut core = Core::new(config, now);
        let effects = core.start(now, RequestId(u64::MAX));
        let mut sim = Sim {
            core,
            now,
            procs: BTreeMap::new(),
            timers_checked: 0,
            conns: BTreeMap::new(),
            next_conn: 0,
            next_request: 0,
            replies: HashMap::new(),
            events: BTreeMap::new(),
            slot_failed: HashMap::new(),
            exits: BTreeMap::new(),
            misbehaved: Vec::new(),
            reload_failed: Vec::new(),
            memory_limited: HashSet::new(),
            causes: BTreeMap::new(),
            paused: HashSet::new(),
            fail_next_fork: false,
            fork_failure_transient: false,
            fail_next_bind: None,
            fail_next_copy: None,
            fail_handoffs: 0,
            finished: false,
            inputs: VecDeque::new(),
        };
        sim.perform(effects);
        sim.drain_inputs();
        let started = sim.replies.get(&RequestId(u64::MAX));
        assert!(matches!(started, Some(Outcome::Done)), "{started:?}");
        sim
    }

    /// The live process at `pick` (modulo how many there are).
    pub(super) fn pick(&self, pick: u8) -> Option<WorkerId> {
        let live: Vec<WorkerId> = self
            .procs
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(id, _)| *id)
            .collect();
        (!live.is_empty()).then(|| live[usize::from(pick) % live.len()])
    }

    /// Feeds one input and everything it causes.
    pub(super) fn input(&mut self, input: Input) {
        self.inputs.push_back(input);
        self.drain_inputs();
    }

    fn drain_inputs(&mut self) {
        while let Some(input) = self.inputs.pop_front() {
            let effects = self.core.handle(self.now, input);
            self.perform(effects);
        }
        self.check();
    }

    pub(super) fn request(&mut self, asked: Request) -> RequestId {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        self.input(Input::Request(request, asked));
        request
    }

    /// A message from a worker, if its process can still talk. Anything but `Online`
    /// before it is online breaks the protocol.
    pub(super) fn worker_says(&mut self, id: WorkerId, message: ToPrimary) {
        if let Some(p) = self.procs.get_mut(&id).filter(|p| p.alive && p.channel) {
            if !p.online && message != ToPrimary::Online {
                p.hostile = true;
            }
            self.input(Input::Message { id, message });
        }
    }

    /// Marks a worker as one that breaks the protocol on purpose.
    pub(super) fn hostile(&mut self, id: WorkerId) {
        if let Some(p) = self.procs.get_mut(&id) {
            p.hostile = true;
        }
    }

    /// The worker says it is ready, once, after it came online.
    pub(super) fn ready(&mut self, id: WorkerId) {
        if let Some(p) = self.procs.get_mut(&id)
            && p.online
            && !p.ready
        {
            p.ready = true;
            self.worker_says(id, ToPrimary::Ready);
        }
    }

    pub(super) fn online(&mut self, id: WorkerId) {
        if let Some(p) = self.procs.get_mut(&id)
            && !p.online
        {
            p.online = true;
            self.worker_says(id, ToPrimary::Online);
        }
    }

    pub(super) fn listen(&mut self, id: WorkerId) {
        // Two servers at most: keys 0 and 1, as a worker that listens twice on port 0.
        let Some(p) = self
            .procs
            .get_mut(&id)
            .filter(|p| p.online && p.next_index < 2)
        else {
            return;
        };
        let index = p.next_index;
        p.next_index += 1;
        let (key, seq, backlog) = (key(index), u64::from(p.next_index), 511);
        self.worker_says(id, ToPrimary::QueryServer { seq, key, backlog });
    }

    /// The worker reads its next message and answers as a cooperative worker would
    /// (`accept` says whether it takes a hand-off).
    pub(super) fn deliver(&mut self, id: WorkerId, accept: bool) -> bool {
        let Some(p) = self.procs.get_mut(&id).filter(|p| p.alive && p.channel) else {
            return false;
        };
        let Some((message, fd)) = p.inbox.pop_front() else {
            return false;
        };
        match message {
            ToWorker::QueryReply {
                seq,
                result: Ok((granted, address)),
            } => {
                // Sent after the disconnect: a Node worker, its servers closed and its
                // channel gone by then, would take it and serve on unstoppable.
                assert!(!p.asked, "{id} granted a server after it was asked to stop");
                let index = u32::try_from(seq - 1).expect("small");
                let socket = matches!(granted, Granted::Socket);
                assert_eq!(socket, fd.is_some(), "a socket grant carries the socket");
                p.servers.insert(index);
                self.worker_says(
                    id,
                    ToPrimary::Listening {
                        key: key(index),
                        address,
                        exclusive: false,
                    },
                );
            }
            ToWorker::QueryReply { .. } => {}
            ToWorker::NewConn { key, seq } => {
                let Some(FdRef::Conn(conn)) = fd else {
                    panic!("a hand-off without its connection");
                };
                // As a real worker: a closed server or a stopping worker refuses.
                let accept = accept && !p.asked && p.servers.contains(&key.index);
                if accept {
                    let state = self.conns.get_mut(&conn).expect("a known connection");
                    assert_eq!(*state, ConnState::Held, "{conn:?} handed out after its end");
                    *state = ConnState::Served(id);
                }
                let accepted = accept;
                self.worker_says(id, ToPrimary::Accepted { key, seq, accepted });
            }
            ToWorker::Disconnect => p.asked = true,
            ToWorker::NewConns { .. } => panic!("the core never joins hand-offs"),
        }
        true
    }

    /// A new connection on a round-robin handle, unless the core paused accepting on it
    /// (it waits in the kernel's backlog then).
    pub(super) fn connect(&mut self, index: u32) {
        if self.paused.contains(&key(index)) {
            return;
        }
        if let Some(rr) = self
            .core
            .handles
            .get_mut(&key(index))
            .and_then(|h| h.round_robin())
        {
            assert!(
                rr.queued() < self.core.config.max_held,
                "accepting on a full queue"
            );
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        self.conns.insert(conn, ConnState::Held);
        self.input(Input::Connection {
            key: key(index),
            conn,
        });
    }

    /// The process ends; `channel_first` says whether its channel's end is seen first.
    pub(super) fn exit(&mut self, id: WorkerId, status: ExitStatus, channel_first: Option<bool>) {
        let Some(p) = self.procs.get_mut(&id).filter(|p| p.alive) else {
            return;
        };
        p.alive = false;
        let had_channel = std::mem::replace(&mut p.channel, false);
        let closed = Input::ChannelClosed { id, broken: None };
        let exited = Input::Exited { id, status };
        match (had_channel, channel_first) {
            (true, Some(true)) => {
                self.inputs.extend([closed, exited]);
            }
            (true, Some(false)) => {
                self.inputs.extend([exited, closed]);
            }
            // The channel is held open by a descendant: only the grace timer ends it.
            (_, None) | (false, _) => self.inputs.push_back(exited),
        }
        self.drain_inputs();
    }

    /// The process reports online and exits at once; the primary sees the exit before
    /// it reads the message, then the channel's end.
    pub(super) fn exit_right_after_online(&mut self, id: WorkerId) {
        let Some(p) = self
            .procs
            .get_mut(&id)
            .filter(|p| p.alive && p.channel && !p.online)
        else {
            return;
        };
        (p.alive, p.channel, p.online) = (false, false, true);
        let status = ExitStatus::Exited(0);
        self.inputs.extend([
            Input::Exited { id, status },
            Input::Message {
                id,
                message: ToPrimary::Online,
            },
            Input::ChannelClosed { id, broken: None },
        ]);
        self.drain_inputs();
    }

    /// The worker's application closes its server `index`.
    pub(super) fn close_server(&mut self, id: WorkerId, index: u32) {
        if let Some(p) = self.procs.get_mut(&id)
            && p.servers.remove(&index)
        {
            self.worker_says(id, ToPrimary::Close { key: key(index) });
        }
    }

    pub(super) fn close_channel(&mut self, id: WorkerId) {
        if let Some(p) = self.procs.get_mut(&id).filter(|p| p.channel) {
            p.channel = false;
            self.input(Input::ChannelClosed { id, broken: None });
        }
    }

    /// Moves the clock to the core's next deadline ([`Core::poll_timeout`]) and tells
    /// it time passed, as the driver's sleep does; `false` if nothing is armed.
    pub(super) fn fire_timer(&mut self) -> bool {
        let Some(at) = self.core.poll_timeout() else {
            return false;
        };
        self.now = self.now.max(at);
        self.input(Input::Tick);
        true
    }

    /// Plays every worker cooperatively until nothing moves: reads every message,
    /// goes online, listens once, exits 0 when asked; then fires timers.
    pub(super) fn settle(&mut self, max_steps: usize) {
        for _ in 0..max_steps {
            let mut moved = false;
            let ids: Vec<WorkerId> = self.procs.keys().copied().collect();
            for id in ids {
                let Some(p) = self.procs.get(&id).filter(|p| p.alive) else {
                    continue;
                };
                if !p.online && p.channel {
                    self.online(id);
                    self.listen(id);
                    moved = true;
                }
                if self.procs.get(&id).is_some_and(|p| !p.ready && p.channel) {
                    self.ready(id);
                    moved = true;
                }
                while self.deliver(id, true) {
                    moved = true;
                }
                if self.procs.get(&id).is_some_and(|p| p.asked && p.alive) {
                    self.exit(id, ExitStatus::Exited(0), Some(true));
                    moved = true;
                }
            }
            if !moved && !self.fire_timer() {
                return;
            }
        }
    }

    /// How many slots' current workers are listening and not stopping.
    pub(super) fn listening_current(&mut self) -> usize {
        self.core
            .stats(self.now)
            .workers
            .iter()
            .filter(|w| w.state == crate::WorkerState::Listening)
            .count()
    }

    /// Every connection so far, with the worker that took it (`None`: held or closed).
    pub(super) fn conns_served(&self) -> impl Iterator<Item = (ConnId, Option<WorkerId>)> + '_ {
        self.conns.iter().map(|(conn, state)| match state {
            ConnState::Served(id) => (*conn, Some(*id)),
            _ => (*conn, None),
        })
    }

    pub(super) fn kill_signal() -> Signal {
        Signal::SIGKILL
    }
}

/// The status of a process ended by `signal`.
pub(super) fn signaled(signal: Signal) -> ExitStatus {
    ExitStatus::Signaled {
        signal: signal as i32,
        core_dumped: false,
    }
}
