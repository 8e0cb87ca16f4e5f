//! The thin async driver around [`Core`]: it owns the worker processes, their channels,
//! the listening sockets and the accepted connections, and one sleep set to the core's
//! [`poll_timeout`](Core::poll_timeout); it turns what happens (time passing included)
//! into [`Input`]s and performs the [`Effect`]s the core returns. It decides nothing.
//!
//! Tasks per worker only move bytes: a reader forwards the worker's frames, a writer
//! sends its control messages in order (a bounded queue of [`CONTROL_QUEUE`]), a waiter
//! reports the exit, and with `silent` two readers forward its output lines.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::{ForkOptions, Signal, Stdio};
use tokio::sync::{mpsc, watch};

mod fork;
mod tasks;

use self::tasks::{Fds, Outgoing, forward_output, read_worker, wait_worker, write_control};
use super::core::{
    CONTROL_QUEUE, Command as CoreCommand, Config, ConnId, Core, Effect, FdRef, Input, Outcome,
    RequestId,
};
use super::events::EventQueue;
use super::sockets::Listeners;
use super::systemd::{Inherited, LISTEN_ENV, NOTIFY_ENV, UPGRADE_FD_ENV};
use super::{Command, Event, OutputStream, Reply, UserSender};
use crate::error::Error;
use crate::node_protocol::{FromNode, NodeWorker};
use crate::protocol::{ToPrimary, ToWorker, WorkerId};
use crate::settings::Settings;

/// How long the driver, once stopped, still forwards the last workers' output.
const OUTPUT_LINGER: Duration = Duration::from_secs(1);

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
}

/// One live worker's process and channel.
#[derive(Debug)]
struct Link {
    child: Arc<child::Child>,
    control: mpsc::Sender<(Outgoing, Fds)>,
    user: UserSender,
    /// `Some` for a Node worker: its side of Node's protocol, which this link translates.
    node: Option<NodeWorker>,
}

impl Link {
    /// Queues a message of the core in the worker's protocol.
    fn queue(
        &mut self,
        message: &ToWorker,
        fds: Fds,
    ) -> Result<(), mpsc::error::TrySendError<(Outgoing, Fds)>> {
        let outgoing = match &mut self.node {
            Some(node) => Outgoing::Node(node.outgoing(message)),
            None => Outgoing::Cluster(message.clone()),
        };
        self.control.try_send((outgoing, fds))
    }
}

/// A command's reply channel, by what it answers.
#[derive(Debug)]
enum Pending {
    Add(Reply<Result<WorkerId, Error>>),
    Remove(Reply<Option<WorkerId>>),
    Result(Reply<Result<(), Error>>),
    Unit(Reply<()>),
    /// The start's, answered while `start` performs the first forks.
    Start(Reply<Result<(), Error>>),
}

#[derive(Debug)]
pub(crate) struct Driver {
    core: Core,
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    silent: bool,
    /// `Some(node)`: workers are Node programs run by `node`.
    node: Option<OsString>,
    /// Node's `execArgv` for Node workers: the user's options, then the keep-alive-safe
    /// drain (`node_drain.rs`) if on.
    node_args: Vec<OsString>,
    links: HashMap<WorkerId, Link>,
    listeners: Listeners,
    conns: HashMap<ConnId, Arc<OwnedFd>>,
    next_conn: u64,
    pending: HashMap<RequestId, Pending>,
    next_request: u64,
    /// Silent workers' output streams not yet at their end.
    outputs: usize,
    internal: mpsc::Sender<Internal>,
    events: EventQueue,
    finished: bool,
    /// The core's readiness (`Stats::ready`), published after each batch of effects that
    /// can change it.
    ready: watch::Sender<bool>,
}

impl Driver {
    /// Forks the configured workers and spawns the driver task.
    pub(crate) fn start(
        settings: Settings,
        events: EventQueue,
        commands: mpsc::Receiver<Command>,
    ) -> Result<watch::Receiver<bool>, Error> {
        // Resolved once: workers start from this path, so a reload runs the file on disk.
        let program = settings.resolved_program();
        let args = settings
            .args
            .clone()
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        let policy = settings.effective_policy();
        if policy == crate::Policy::ReusePort {
            fork::warn_unless_requests_migrate();
        }
        let config = Config {
            workers: settings.workers,
            policy,
            restart: settings.restart.clone(),
            drain_deadline: settings.drain_deadline,
            hold: settings.hold_connections,
            exit_grace: super::EXIT_GRACE,
            reload_timeout: settings.reload_timeout,
            max_held: super::core::MAX_HELD,
            handoff_timeout: settings.handoff_timeout,
            connect_timeout: settings.connect_timeout,
            wait_ready: settings.wait_ready,
        };
        let (internal, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        let inherited = match settings.inherit_listeners {
            true => Inherited::from_env(),
            false => Inherited::default(),
        };
        let mut driver = Driver {
            core: Core::new(config, Instant::now()),
            program,
            args,
            env: settings.env.clone(),
            silent: settings.silent,
            node: settings.node.clone(),
            node_args: settings
                .node_args
                .iter()
                .cloned()
                .chain(
                    settings
                        .node_keepalive_drain
                        .then(crate::node_drain::import_args)
                        .into_iter()
                        .flatten()
                        .map(OsString::from),
                )
                .collect(),
            links: HashMap::new(),
            listeners: Listeners::new(policy, inherited),
            conns: HashMap::new(),
            next_conn: 0,
            pending: HashMap::new(),
            next_request: 0,
            outputs: 0,
            internal,
            events,
            finished: false,
            ready: watch::Sender::new(false),
        };
        let (reply, mut started) = tokio::sync::oneshot::channel();
        let request = driver.request(Pending::Start(reply));
        let effects = driver.core.start(Instant::now(), request);
        driver.perform(effects);
        // The core answered once every first fork was; if one failed, it also ended the
        // primary and dropping the driver kills the others.
        started.try_recv().unwrap_or(Err(Error::Stopped))?;
        let ready = driver.ready.subscribe();
        tokio::spawn(driver.run(commands, internal_rx));
        Ok(ready)
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
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    self.conns.insert(conn, Arc::new(stream));
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
        while self.outputs > 0 {
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

    /// Performs effects in order; results that the core needs (fork, bind) are fed back
    /// at once and their effects performed in turn.
    fn perform(&mut self, effects: Vec<Effect>) {
        let mut queue: VecDeque<Effect> = effects.into();
        let mut readiness_may_change = false;
        while let Some(effect) = queue.pop_front() {
            readiness_may_change |= matches!(effect, Effect::Emit(_) | Effect::Reply(..));
            if let Some(input) = self.perform_one(effect) {
                queue.extend(self.core.handle(Instant::now(), input));
            }
        }
        if readiness_may_change {
            self.publish_ready();
        }
    }

    fn publish_ready(&mut self) {
        let ready = self.core.ready();
        self.ready
            .send_if_modified(|was| std::mem::replace(was, ready) != ready);
    }

    fn perform_one(&mut self, effect: Effect) -> Option<Input> {
        match effect {
            Effect::Fork { id, slot, env } => Some(self.fork(id, slot, env)),
            Effect::Send { id, message, fd } => self.send(id, message, fd),
            Effect::Kill {
                id,
                signal,
                request,
            } => {
                // A process already gone has exited: the signal has nothing to reach.
                let result = match self.links.get(&id) {
                    Some(link) => link.child.kill(signal).map(drop),
                    None => Ok(()),
                };
                match (request, result) {
                    (Some(request), result) => Some(Input::Signaled { request, result }),
                    (None, Err(e)) => {
                        tracing::warn!(%id, error = %e, "could not signal a worker");
                        None
                    }
                    (None, Ok(())) => None,
                }
            }
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
                self.conns.remove(&conn);
                None
            }
            Effect::Emit(event) => {
                if let Event::Exit { id, .. } = &event {
                    self.links.remove(id);
                }
                self.emit(event);
                None
            }
            Effect::Reply(request, outcome) => {
                self.reply(request, outcome);
                None
            }
            Effect::Finished => {
                self.finished = true;
                None
            }
        }
    }

    fn emit(&mut self, event: Event) {
        self.events.push(event);
    }

    fn reply(&mut self, request: RequestId, outcome: Outcome) {
        let Some(pending) = self.pending.remove(&request) else {
            return;
        };
        let error = |outcome| match outcome {
            Outcome::UnknownWorker(id) => Error::UnknownWorker(id),
            Outcome::ForkFailed(e) => Error::Fork(e),
            Outcome::KillFailed(e) => Error::Kill(e),
            _ => Error::Stopped,
        };
        match (pending, outcome) {
            (Pending::Add(reply), Outcome::Added(id)) => drop(reply.send(Ok(id))),
            (Pending::Add(reply), other) => drop(reply.send(Err(error(other)))),
            (Pending::Start(reply), Outcome::Done) => drop(reply.send(Ok(()))),
            (Pending::Start(reply), other) => drop(reply.send(Err(error(other)))),
            (Pending::Remove(reply), Outcome::Removed(id)) => drop(reply.send(id)),
            (Pending::Remove(reply), _) => drop(reply.send(None)),
            (Pending::Result(reply), Outcome::Done) => drop(reply.send(Ok(()))),
            (Pending::Result(reply), other) => drop(reply.send(Err(error(other)))),
            (Pending::Unit(reply), _) => drop(reply.send(())),
        }
    }

    fn command(&mut self, command: Command) {
        let (command, pending) = match command {
            Command::Senders(target, reply) => {
                let senders = self
                    .core
                    .connected_workers()
                    .filter(|id| target.is_none_or(|t| t == *id))
                    .filter_map(|id| self.links.get(&id))
                    .map(|link| Arc::clone(&link.user))
                    .collect();
                let _ = reply.send(senders);
                return;
            }
            Command::Stats(reply) => {
                let _ = reply.send(self.core.stats());
                return;
            }
            Command::Accepting(accepting, reply) => {
                self.listeners.set_accepting(accepting);
                let _ = reply.send(());
                return;
            }
            Command::Handover(reply) => {
                let _ = reply.send(self.listeners.handover());
                return;
            }
            Command::AddWorker(env, reply) => (CoreCommand::AddWorker { env }, Pending::Add(reply)),
            Command::RemoveWorker(reply) => (CoreCommand::RemoveWorker, Pending::Remove(reply)),
            Command::Disconnect(target, reply) => {
                (CoreCommand::Disconnect(target), Pending::Result(reply))
            }
            Command::Kill(id, signal, reply) => {
                (CoreCommand::Kill(id, signal), Pending::Result(reply))
            }
            Command::Reload(reply) => (CoreCommand::Reload, Pending::Unit(reply)),
            Command::Stop(reply) => (CoreCommand::Stop, Pending::Unit(reply)),
        };
        let request = self.request(pending);
        self.input(Input::Command(request, command));
        // A stop begins without an event.
        self.publish_ready();
    }

    /// Keeps a reply until the core answers the request it names.
    fn request(&mut self, pending: Pending) -> RequestId {
        let request = RequestId(self.next_request);
        self.next_request += 1;
        self.pending.insert(request, pending);
        request
    }

    fn internal(&mut self, message: Internal) {
        match message {
            Internal::Message(id, message) => self.message(id, message),
            Internal::ChannelClosed(id, broken) => self.input(Input::ChannelClosed { id, broken }),
            Internal::Exited(id, status) => self.input(Input::Exited { id, status }),
            Internal::Output(id, stream, line) => self.emit(Event::Output { id, stream, line }),
            Internal::OutputEnd => self.outputs = self.outputs.saturating_sub(1),
        }
    }

    fn message(&mut self, id: WorkerId, mut message: ipc::Received) {
        if self.core.connected(id).is_none() {
            return;
        }
        if message.lane() == ipc::Lane::User {
            // Node's `process.send('ready')` is also the worker's word that it is ready.
            let ready = self.links.get(&id).is_some_and(|link| link.node.is_some())
                && crate::node_protocol::is_ready(&message);
            self.emit(Event::Message { id, message });
            if ready {
                let message = ToPrimary::Ready;
                self.input(Input::Message { id, message });
            }
            return;
        }
        if self.links.get(&id).is_some_and(|link| link.node.is_some()) {
            return self.node_message(id, message);
        }
        let input = match message.decode::<ToPrimary>() {
            Ok(_) if !message.fds().is_empty() => Input::Malformed {
                id,
                reason: "control message with descriptors".into(),
            },
            Ok(message) => Input::Message { id, message },
            Err(e) => Input::Malformed {
                id,
                reason: format!("undecodable control message: {e}"),
            },
        };
        drop(message.take_fds());
        self.input(input);
    }

    /// A Node worker's internal message, through its adapter.
    fn node_message(&mut self, id: WorkerId, mut message: ipc::Received) {
        let fds = message.take_fds();
        let Some(link) = self.links.get_mut(&id) else {
            return;
        };
        let Some(node) = link.node.as_mut() else {
            return;
        };
        let translated = match message.internal() {
            Ok(_) if !fds.is_empty() => {
                FromNode::Malformed("cluster message with a descriptor".into())
            }
            Ok(internal) => node.incoming(&internal),
            Err(e) => FromNode::Malformed(format!("undecodable internal message: {e}")),
        };
        drop(fds);
        let input = match translated {
            FromNode::Message(message) => Input::Message { id, message },
            FromNode::Malformed(reason) => Input::Malformed { id, reason },
            FromNode::Ignore => return,
            FromNode::Reply(reply) => {
                match link.control.try_send((Outgoing::Node(reply), Fds::none())) {
                    Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => Input::SendFailed { id },
                }
            }
        };
        self.input(input);
    }

    /// Queues a control message; a full queue is the worker's fault (see [`CONTROL_QUEUE`]).
    /// A descriptor that cannot be copied is reported to the core, which decides.
    fn send(&mut self, id: WorkerId, message: ToWorker, fd: Option<FdRef>) -> Option<Input> {
        let node = self.links.get(&id)?.node.is_some();
        let fds = match fd {
            None => Ok(Fds::none()),
            Some(FdRef::Conn(conn)) => {
                let conn = self
                    .conns
                    .get(&conn)
                    .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EBADF));
                if node {
                    // A Node channel keeps its own copy until the ACK; a failed copy
                    // (out of descriptors) is a failed hand-off, known now.
                    conn.and_then(|c| c.try_clone())
                        .map(|copy| Fds::Owned(vec![copy]))
                } else {
                    conn.map(|c| Fds::Conns(vec![Arc::clone(c)]))
                }
            }
            Some(FdRef::Listener { key, socket }) => match self.listeners.copy(&key, socket) {
                Ok(fd) => Ok(Fds::Owned(vec![fd])),
                Err(e) => {
                    let seq = match &message {
                        ToWorker::QueryReply { seq, .. } => *seq,
                        _ => return None, // only a grant carries a listening socket
                    };
                    tracing::warn!(%id, error = %e, "could not copy a listening socket");
                    let errno = e.raw_os_error().unwrap_or(libc::EINVAL);
                    return Some(Input::GrantFailed {
                        id,
                        key,
                        seq,
                        errno,
                    });
                }
            },
        };
        let fds = match (fds, &message) {
            (Ok(fds), _) => fds,
            (Err(e), ToWorker::NewConn { key, seq }) => {
                tracing::warn!(%id, error = %e, "could not copy a connection for a worker");
                let (key, seq) = (key.clone(), *seq);
                return Some(Input::HandoffFailed { id, key, seq });
            }
            (Err(_), _) => Fds::none(),
        };
        let link = self.links.get_mut(&id)?;
        match link.queue(&message, fds) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(Input::SendFailed { id }),
            // The writer is gone with the channel: the core hears of it from the reader.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Kill every worker still running; the waiter tasks (or the child crate's
        // reaper, once the last handle drops) reap them.
        for link in self.links.values() {
            let _ = link.child.kill(Signal::SIGKILL);
        }
    }
}
