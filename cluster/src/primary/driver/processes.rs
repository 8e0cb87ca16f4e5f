//! The workers' processes as the driver holds them: each one's child, control queue,
//! user-message sender and (for a Node worker) its side of Node's protocol, and the
//! tasks that move their bytes.

use std::collections::HashMap;
use std::sync::Arc;

use child::Signal;
use tokio::sync::mpsc;

use super::Internal;
use super::tasks::{Fds, Outgoing, forward_output, read_worker, wait_worker, write_control};
use crate::node_protocol::NodeWorker;
use crate::primary::OutputStream;
use crate::primary::command::UserSender;
use crate::primary::core::CONTROL_QUEUE;
use crate::protocol::{ToWorker, WorkerId};

/// One live worker's process and channel.
#[derive(Debug)]
pub(super) struct WorkerProcess {
    child: Arc<child::Child>,
    pub(super) control: mpsc::Sender<(Outgoing, Fds)>,
    pub(super) user: UserSender,
    pub(super) protocol: Protocol,
    /// Which build of the program it runs (see `Spawner::build_id`).
    pub(super) build: Option<String>,
}

/// The protocol a worker speaks.
#[derive(Debug)]
pub(super) enum Protocol {
    /// This crate's (postcard, on the control lane).
    Cluster,
    /// Node's: its side of Node's cluster protocol, which the core's messages and the
    /// worker's are translated through.
    Node(NodeWorker),
}

impl WorkerProcess {
    /// Queues a message of the core in the worker's protocol.
    pub(super) fn queue(
        &mut self,
        message: &ToWorker,
        fds: Fds,
    ) -> Result<(), mpsc::error::TrySendError<(Outgoing, Fds)>> {
        let outgoing = match &mut self.protocol {
            Protocol::Node(node) => Outgoing::Node(node.outgoing(message)),
            Protocol::Cluster => Outgoing::Cluster(message.clone()),
        };
        self.control.try_send((outgoing, fds))
    }

    pub(super) fn speaks_node(&self) -> bool {
        matches!(self.protocol, Protocol::Node(_))
    }
}

/// The live workers' processes, and what their tasks need.
#[derive(Debug)]
pub(super) struct Processes {
    by_id: HashMap<WorkerId, WorkerProcess>,
    /// Where the tasks report.
    internal: mpsc::Sender<Internal>,
    /// Silent workers' output streams not yet at their end.
    outputs: usize,
}

impl Processes {
    pub(super) fn new(internal: mpsc::Sender<Internal>) -> Self {
        Self {
            by_id: HashMap::new(),
            internal,
            outputs: 0,
        }
    }

    /// Keeps a forked worker and starts its tasks; returns its pid.
    pub(super) fn add(
        &mut self,
        id: WorkerId,
        mut child: child::Child,
        channel: ipc::Channel,
        node: bool,
        build: Option<String>,
    ) -> u32 {
        let (sender, receiver) = channel.into_split();
        let streams = [
            child.stdout.take().map(|s| (OutputStream::Stdout, s)),
            child.stderr.take().map(|s| (OutputStream::Stderr, s)),
        ];
        for (stream, pipe) in streams.into_iter().flatten() {
            self.outputs += 1;
            tokio::spawn(forward_output(id, stream, pipe, self.internal.clone()));
        }
        let pid = child.pid();
        let child = Arc::new(child);
        let user = Arc::new(tokio::sync::Mutex::new(sender));
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        tokio::spawn(write_control(Arc::clone(&user), control_rx));
        tokio::spawn(read_worker(id, receiver, self.internal.clone()));
        tokio::spawn(wait_worker(id, Arc::clone(&child), self.internal.clone()));
        let process = WorkerProcess {
            child,
            control,
            user,
            protocol: match node {
                true => Protocol::Node(NodeWorker::new()),
                false => Protocol::Cluster,
            },
            build,
        };
        self.by_id.insert(id, process);
        pid
    }

    pub(super) fn get(&self, id: WorkerId) -> Option<&WorkerProcess> {
        self.by_id.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: WorkerId) -> Option<&mut WorkerProcess> {
        self.by_id.get_mut(&id)
    }

    pub(super) fn remove(&mut self, id: WorkerId) {
        self.by_id.remove(&id);
    }

    /// Signals a worker. A process no longer held has exited: the signal has nothing
    /// to reach, as for an exited child.
    pub(super) fn kill(&self, id: WorkerId, signal: Signal) -> Result<(), child::Error> {
        match self.by_id.get(&id) {
            Some(process) => process.child.kill(signal).map(drop),
            None => Ok(()),
        }
    }

    pub(super) fn outputs(&self) -> usize {
        self.outputs
    }

    pub(super) fn output_ended(&mut self) {
        self.outputs = self.outputs.saturating_sub(1);
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // Kill every worker still running; the waiter tasks (or the child crate's
        // reaper, once the last handle drops) reap them.
        for process in self.by_id.values() {
            let _ = process.child.kill(Signal::SIGKILL);
        }
    }
}
