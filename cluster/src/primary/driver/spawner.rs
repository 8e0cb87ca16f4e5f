//! Starting a worker's process: the program and its arguments, the fork options (its
//! id, slot and environment, its own process group (in the primary's session), the
//! parent-death signal, silent
//! output, Node's `execArgv` and `NODE_UNIQUE_ID` for a Node worker).

use std::ffi::OsString;

use child::{ForkOptions, Signal, Stdio};

use crate::primary::systemd::{LISTEN_ENV, NOTIFY_ENV, UPGRADE_FD_ENV};
use crate::protocol::WorkerId;
use crate::settings::Settings;

/// How many `NODE_HANDLE` lines a Node worker's channel may have unacknowledged: the
/// round-robin window of one server (more wait in the channel's bounded hold-back queue).
const NODE_HANDLES_IN_FLIGHT: usize = crate::protocol::HANDOFF_WINDOW;

/// The fork configuration, resolved once at the start.
#[derive(Debug)]
pub(super) struct Spawner {
    program: OsString,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    silent: bool,
    /// `Some(node)`: workers are Node programs run by `node`.
    node: Option<OsString>,
    /// Node's `execArgv` for Node workers: the user's options; then the keep-alive-safe
    /// drain's preload (`node_drain.rs`) if on.
    node_args: Vec<OsString>,
    drain: Option<[String; 2]>,
}

impl Spawner {
    pub(super) fn new(settings: &Settings) -> Self {
        Self {
            // Resolved once: workers start from this path, so a reload runs the file on
            // disk.
            program: settings.resolved_program(),
            args: settings
                .args
                .clone()
                .unwrap_or_else(|| std::env::args_os().skip(1).collect()),
            env: settings.env.clone(),
            silent: settings.silent,
            node: settings.node.clone(),
            node_args: settings.node_args.clone(),
            drain: (settings.node.is_some() && settings.node_keepalive_drain)
                .then(crate::node_drain::preload_args),
        }
    }

    /// Which build of the program a worker started now runs: a short hex id of the
    /// program file's inode, size and modification time (`None` when it cannot be read,
    /// a program found on `PATH`, say).
    pub(super) fn build_id(&self) -> Option<String> {
        use std::hash::{Hash, Hasher};
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&self.program).ok()?;
        // `DefaultHasher::new` has fixed keys: the same file gives the same id in every
        // process of one build of this crate.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (meta.ino(), meta.size(), meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
        Some(format!("{:08x}", hasher.finish() as u32))
    }

    /// Whether the workers speak Node's protocol.
    pub(super) fn speaks_node(&self) -> bool {
        self.node.is_some()
    }

    /// Starts the worker `id` of `slot` (`None`: a warm spare, with no slot in its
    /// environment) with `env` on top of the configured environment; returns the
    /// process and its channel.
    pub(super) fn spawn(
        &mut self,
        id: WorkerId,
        slot: Option<usize>,
        env: Vec<(OsString, OsString)>,
    ) -> Result<(child::Child, ipc::Channel), child::Error> {
        let silent = self.silent;
        let global = self.env.clone();
        // A temporary-files cleaner may have taken the drain's file: written again.
        if let Some(drain) = &mut self.drain
            && !crate::node_drain::still_there(drain)
        {
            *drain = crate::node_drain::preload_args();
        }
        let drain = self.drain.iter().flatten().map(OsString::from);
        let mut options = ForkOptions::new().parent_death_signal(Signal::SIGKILL);
        if let Some(node) = &self.node {
            options = options
                .serialization(ipc::Format::Json)
                .exec_path(node)
                .exec_argv(self.node_args.iter().cloned().chain(drain));
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
            options = options.env(crate::env::WORKER_ID_ENV, crate::env::format_id(id));
            if let Some(slot) = slot {
                options = options.env(crate::env::WORKER_SLOT_ENV, slot.to_string());
            }
            options = options
                .kill_on_drop(true)
                // A process group of its own: a terminal's Ctrl-C or a signal sent to
                // the primary's group reaches only the primary, which then stops the
                // workers gracefully. Not a session of its own: with Linux's autogroup
                // each session shares the CPU as one, and workers in sessions of their
                // own each got as much as everything else on the machine's session
                // (under an open-loop load on 2 cores, a Node app's p99 at 80% load
                // went from 542 to 33 ms). The parent-death signal still ends a worker
                // whose primary dies.
                .process_group(true);
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
        let mut child = child::fork(&self.program, &self.args, options)?;
        let channel = child.take_channel()?;
        Ok((child, channel))
    }
}
