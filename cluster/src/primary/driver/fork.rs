//! Starting a worker: the fork options (its id, slot and environment, its own process
//! group, the parent-death signal, silent output), its tasks, and what a failure means.

use super::*;

/// How many `NODE_HANDLE` lines a Node worker's channel may have unacknowledged: the
/// round-robin window of one server (more wait in the channel's bounded hold-back queue).
const NODE_HANDLES_IN_FLIGHT: usize = crate::protocol::HANDOFF_WINDOW;

impl Driver {
    pub(super) fn fork(
        &mut self,
        id: WorkerId,
        slot: usize,
        env: Vec<(OsString, OsString)>,
    ) -> Input {
        let silent = self.silent;
        let global = self.env.clone();
        let mut options = ForkOptions::new().parent_death_signal(Signal::SIGKILL);
        if let Some(node) = &self.node {
            options = options
                .serialization(ipc::Format::Json)
                .exec_path(node)
                .exec_argv(&self.node_args);
        }
        let node = self.node.is_some();
        let options = options.map_spawn_options(|mut options| {
            if node {
                // Round-robin hand-offs go out as the window allows (one NODE_HANDLE line
                // per write) instead of one per round trip to the worker's ACK.
                options = options
                    .channel_config(ipc::Config::new().handles_in_flight(NODE_HANDLES_IN_FLIGHT));
                // What makes `require('cluster').isWorker` true in the script.
                options = options.env(crate::env::NODE_UNIQUE_ID_ENV, crate::env::format_id(id));
            }
            options = options
                .env(crate::env::WORKER_ID_ENV, crate::env::format_id(id))
                .env(crate::env::WORKER_SLOT_ENV, slot.to_string())
                .kill_on_drop(true)
                // Its own session and process group: a terminal's Ctrl-C or a signal
                // sent to the primary's group reaches only the primary, which then
                // stops the workers gracefully. The parent-death signal still ends
                // a worker whose primary dies.
                .detached(true);
            // Socket activation and notification are the primary's business.
            for key in LISTEN_ENV
                .iter()
                .chain(&NOTIFY_ENV)
                .chain([&UPGRADE_FD_ENV])
            {
                options = options.env_remove(key);
            }
            for (key, value) in global.into_iter().chain(env) {
                options = options.env(key, value);
            }
            if silent {
                options = options
                    .stdin(Stdio::Null)
                    .stdout(Stdio::Pipe)
                    .stderr(Stdio::Pipe);
            }
            options
        });
        let started = child::fork(&self.program, &self.args, options).and_then(|mut child| {
            let channel = child.take_channel()?;
            Ok((child, channel))
        });
        let (mut child, channel) = match started {
            Ok(started) => started,
            Err(e) => {
                tracing::error!(%id, slot, error = %e, "could not fork a worker");
                return Input::ForkFailed { id, error: e };
            }
        };
        let (sender, receiver) = channel.into_split();
        if let Some(stdout) = child.stdout.take() {
            self.outputs += 1;
            tokio::spawn(forward_output(
                id,
                OutputStream::Stdout,
                stdout,
                self.internal.clone(),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            self.outputs += 1;
            tokio::spawn(forward_output(
                id,
                OutputStream::Stderr,
                stderr,
                self.internal.clone(),
            ));
        }
        let pid = child.pid();
        let child = Arc::new(child);
        let user = Arc::new(tokio::sync::Mutex::new(sender));
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        tokio::spawn(write_control(Arc::clone(&user), control_rx));
        tokio::spawn(read_worker(id, receiver, self.internal.clone()));
        tokio::spawn(wait_worker(id, Arc::clone(&child), self.internal.clone()));
        self.links.insert(
            id,
            Link {
                child,
                control,
                user,
                node: node.then(NodeWorker::new),
            },
        );
        Input::Forked { id, pid }
    }
}

/// Under reuseport, closing a slot's socket (a worker removed, `SIGTTOU`) resets the
/// connections still in its accept queue unless the kernel migrates them to the group's
/// other sockets (`net.ipv4.tcp_migrate_req=1`, Linux 5.14+). A library does not change
/// that setting for the whole system; it says so.
pub(super) fn warn_unless_requests_migrate() {
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req");
    if !migrate.is_ok_and(|value| value.trim() == "1") {
        tracing::warn!(
            "net.ipv4.tcp_migrate_req is not 1: under reuseport, removing a worker resets the \
             connections waiting in its socket's queue (set the sysctl to migrate them)"
        );
    }
}
