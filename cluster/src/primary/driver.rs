//! The thin async driver around [`Core`]: it owns the worker processes, their channels,
//! the listening sockets and the accepted connections, and one sleep set to the core's
//! [`poll_timeout`](Core::poll_timeout); it turns what happens (time passing included)
//! into [`Input`]s and performs the [`Effect`]s the core returns. It decides nothing and
//! never looks inside an effect to keep state of its own.
//!
//! Tasks per worker only move bytes (`driver/tasks.rs`): a reader forwards the worker's
//! frames, a writer sends its control messages in order (a bounded queue of
//! [`CONTROL_QUEUE`](super::core::CONTROL_QUEUE)), a waiter reports the exit, and with
//! `silent` two readers forward its output lines. `driver/spawner.rs` starts the
//! processes, `driver/processes.rs` keeps them, `driver/messages.rs` translates between
//! the workers' messages and the core.

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

mod messages;
mod processes;
mod spawner;
mod tasks;
mod usage;

use self::processes::Processes;
use self::spawner::Spawner;
use super::command::{Command, EXIT_GRACE, Reply};
use super::core::{Config, ConnId, Core, Effect, Input, Outcome, RequestId};
use super::events::EventQueue;
use super::sockets::Listeners;
use super::systemd::Inherited;
use super::{Event, OutputStream};
use crate::protocol::WorkerId;
use crate::settings::Settings;

/// How long the driver, once stopped, still forwards the last workers' output.
const OUTPUT_LINGER: Duration = Duration::from_secs(1);

/// How often the workers' memory and CPU are sampled, when something reads them.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How many messages from the per-worker tasks wait for the driver; a full queue makes
/// those tasks wait (back-pressure on the workers' channels).
const INTERNAL_QUEUE: usize = 1024;

/// What the per-worker tasks tell the driver.
#[derive(Debug)]
enum Internal {
    Message(WorkerId, ipc::Received),
    /// The worker's channel ended; `Some` when it broke (a malformed frame).
    ChannelClosed(WorkerId, Option<String>),
    Exited(WorkerId, child::ExitStatus),
    Output(WorkerId, OutputStream, String),
    /// A silent worker's output stream reached its end.
    OutputEnd,
    /// A Node worker could not take a descriptor sent with this message (refused past
    /// Node's retries); the channel goes on.
    HandleDropped(WorkerId, Box<ipc::Received>),
}

/// The replies of the requests the core has not answered yet, each sent once.
#[derive(Debug, Default)]
struct Requests {
    waiting: HashMap<RequestId, Reply<Outcome>>,
    next: u64,
}

impl Requests {
    fn keep(&mut self, reply: Reply<Outcome>) -> RequestId {
        let request = RequestId(self.next);
        self.next += 1;
        self.waiting.insert(request, reply);
        request
    }

    fn answer(&mut self, request: RequestId, outcome: Outcome) {
        if let Some(reply) = self.waiting.remove(&request) {
            let _ = reply.send(outcome);
        }
    }
}

/// Accepted connections, each held until the core says to close it.
#[derive(Debug, Default)]
struct Conns {
    held: HashMap<ConnId, Arc<OwnedFd>>,
    next: u64,
}

impl Conns {
    fn hold(&mut self, stream: OwnedFd) -> ConnId {
        let conn = ConnId(self.next);
        self.next += 1;
        self.held.insert(conn, Arc::new(stream));
        conn
    }
}

/// What the application sees: the events, and the readiness as of the last batch of
/// effects.
#[derive(Debug)]
struct Published {
    events: EventQueue,
    ready: watch::Sender<bool>,
}

#[derive(Debug)]
pub(crate) struct Driver {
    core: Core,
    spawner: Spawner,
    processes: Processes,
    listeners: Listeners,
    conns: Conns,
    requests: Requests,
    published: Published,
    /// Whether the core said the primary has ended.
    finished: bool,
}

impl Driver {
    /// Forks the configured workers and, unless the core ended the primary (a failed
    /// start), spawns the driver task. Returns the core's answer to the start and the
    /// readiness.
    pub(crate) fn start(
        settings: Settings,
        events: EventQueue,
        commands: mpsc::Receiver<Command>,
    ) -> (Outcome, watch::Receiver<bool>) {
        let policy = settings.effective_policy();
        let config = Config {
            workers: settings.workers,
            policy,
            restart: settings.restart.clone(),
            drain_deadline: settings.drain_deadline,
            hold: settings.hold_connections,
            exit_grace: EXIT_GRACE,
            reload_timeout: settings.reload_timeout,
            max_held: super::core::MAX_HELD,
            handoff_timeout: settings.handoff_timeout,
            connect_timeout: settings.connect_timeout,
            wait_ready: settings.wait_ready,
            sample_every: settings.samples_usage().then_some(SAMPLE_EVERY),
            max_rss: settings.max_worker_rss,
            stop_delay: settings.stop_delay,
            warm_spares: settings.warm_spares,
        };
        let (internal, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        let inherited = match settings.inherit_listeners {
            true => Inherited::from_env(),
            false => Inherited::default(),
        };
        let mut driver = Driver {
            core: Core::new(config, Instant::now()),
            spawner: Spawner::new(&settings),
            processes: Processes::new(internal),
            listeners: Listeners::new(policy, inherited),
            conns: Conns::default(),
            requests: Requests::default(),
            published: Published {
                events,
                ready: watch::Sender::new(false),
            },
            finished: false,
        };
        let (reply, mut started) = oneshot::channel();
        let request = driver.requests.keep(reply);
        let effects = driver.core.start(Instant::now(), request);
        driver.perform(effects);
        // Answered once every first fork was.
        let outcome = started.try_recv().unwrap_or(Outcome::Stopped);
        let ready = driver.published.ready.subscribe();
        if !driver.finished {
            tokio::spawn(driver.run(commands, internal_rx));
        } // else dropping the driver kills whatever was forked
        (outcome, ready)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::Receiver<Internal>,
    ) {
        // One sleep, set to the core's earliest deadline after every batch of effects.
        let sleep = tokio::time::sleep_until(tokio::time::Instant::now());
        tokio::pin!(sleep);
        while !self.finished {
            let timeout = self.core.poll_timeout().map(tokio::time::Instant::from_std);
            if let Some(at) = timeout
                && sleep.deadline() != at
            {
                sleep.as_mut().reset(at);
            }
            let listeners = &mut self.listeners;
            let accepts = listeners.accepts();
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                Some(message) = internal.recv() => self.internal(message),
                (key, stream) = std::future::poll_fn(|cx| listeners.poll_accept(cx)), if accepts => {
                    let conn = self.conns.hold(stream);
                    self.input(Input::Connection { key, conn });
                }
                () = &mut sleep, if timeout.is_some() => self.input(Input::Tick),
            }
        }
        self.last_output(&mut internal).await;
        tracing::debug!("primary driver finished");
    }

    /// After the stop, forwards what the last workers wrote before they exited and is
    /// still on its way from their pipes, for at most [`OUTPUT_LINGER`].
    async fn last_output(&mut self, internal: &mut mpsc::Receiver<Internal>) {
        let deadline = tokio::time::sleep(OUTPUT_LINGER);
        tokio::pin!(deadline);
        while self.processes.outputs() > 0 {
            tokio::select! {
                Some(message) = internal.recv() => match message {
                    Internal::Output(..) | Internal::OutputEnd => self.internal(message),
                    _ => {}
                },
                () = &mut deadline => return,
            }
        }
    }

    fn input(&mut self, input: Input) {
        let effects = self.core.handle(Instant::now(), input);
        self.perform(effects);
    }

    /// Performs effects in order; results that the core needs (fork, bind, a failed
    /// copy) are fed back at once and their effects performed in turn. Then publishes
    /// the readiness.
    fn perform(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            if let Some(input) = self.perform_one(effect) {
                queue.extend(self.core.handle(Instant::now(), input));
            }
        }
        let ready = self.core.ready();
        (self.published.ready).send_if_modified(|was| std::mem::replace(was, ready) != ready);
    }

    fn perform_one(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Fork { id, slot, env } => Some(self.fork(id, slot, env)),
            Effect::Send { id, message, fd } => self.send(id, message, fd),
            Effect::Kill {
                id,
                signal,
                request,
            } => match (request, self.processes.kill(id, signal)) {
                (Some(request), result) => Some(Input::Signaled { request, result }),
                (None, Err(e)) => {
                    tracing::warn!(%id, error = %e, "could not signal a worker");
                    None
                }
                (None, Ok(())) => None,
            },
            Effect::Bind {
                key,
                socket,
                address,
                backlog,
            } => {
                let result = self.listeners.bind(&key, socket, address, backlog);
                Some(Input::Bound {
                    key,
                    socket,
                    result,
                })
            }
            Effect::CloseHandle(key) => {
                self.listeners.close(&key);
                None
            }
            Effect::Accept { key, on } => {
                self.listeners.set_handle_accepting(&key, on);
                None
            }
            Effect::CloseSocket { key, socket } => {
                self.listeners.close_slot(&key, socket);
                None
            }
            Effect::CloseConn(conn) => {
                self.conns.held.remove(&conn);
                None
            }
            Effect::Emit(event) => {
                self.published.events.push(event);
                None
            }
            Effect::Sample(pids) => Some(Input::Usage(
                pids.into_iter()
                    .map(|(id, pid)| (id, usage::read(pid)))
                    .collect(),
            )),
            Effect::Forget(id) => {
                self.processes.remove(id);
                None
            }
            Effect::Reply(request, outcome) => {
                self.requests.answer(request, outcome);
                None
            }
            Effect::Finished => {
                self.finished = true;
                None
            }
        }
    }

    /// Starts a worker's process and its tasks; the core hears how it went.
    fn fork(
        &mut self,
        id: WorkerId,
        slot: Option<usize>,
        env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    ) -> Input {
        match self.spawner.spawn(id, slot, env) {
            Ok((child, channel)) => {
                let node = self.spawner.speaks_node();
                let build = self.spawner.build_id();
                let pid = self.processes.add(id, child, channel, node, build);
                Input::Forked { id, pid }
            }
            Err(error) => {
                tracing::error!(%id, ?slot, %error, "could not fork a worker");
                Input::ForkFailed { id, error }
            }
        }
    }

    /// A request goes to the core, its reply kept until the core answers; the queries,
    /// which change nothing, are answered here.
    fn command(&mut self, command: Command) {
        match command {
            Command::Core(asked, reply) => {
                let request = self.requests.keep(reply);
                self.input(Input::Request(request, asked));
            }
            Command::Senders(target, reply) => {
                let senders = self
                    .core
                    .connected_workers()
                    .filter(|id| target.is_none_or(|t| t == *id))
                    .filter_map(|id| self.processes.get(id))
                    .map(|process| Arc::clone(&process.user))
                    .collect();
                let _ = reply.send(senders);
            }
            Command::Stats(reply) => {
                let mut stats = self.core.stats(Instant::now());
                for worker in &mut stats.workers {
                    worker.build = self.processes.get(worker.id).and_then(|p| p.build.clone());
                }
                stats.totals.dropped_events = self.published.events.dropped();
                stats.totals.accept_pauses += self.listeners.accept_pauses();
                let _ = reply.send(stats);
            }
            Command::Accepting(accepting, reply) => {
                self.listeners.set_accepting(accepting);
                let _ = reply.send(());
            }
            Command::Handover(reply) => {
                let _ = reply.send(self.listeners.handover());
            }
        }
    }

    fn internal(&mut self, message: Internal) {
        match message {
            Internal::Message(id, message) => self.message(id, message),
            Internal::ChannelClosed(id, broken) => self.input(Input::ChannelClosed { id, broken }),
            Internal::Exited(id, status) => self.input(Input::Exited { id, status }),
            Internal::Output(id, stream, line) => {
                self.published
                    .events
                    .push(Event::Output { id, stream, line })
            }
            Internal::OutputEnd => self.processes.output_ended(),
            Internal::HandleDropped(id, message) => self.handle_dropped(id, &message),
        }
    }
}
