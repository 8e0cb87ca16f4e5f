//! [`Primary`], the handle on one driver task: every method sends the driver a
//! [`Command`] over a bounded channel and awaits its oneshot reply, so every method takes
//! `&self` and works from any task of a multi-thread runtime. A request for the core
//! comes back as the core's [`Outcome`], turned here into the method's result.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use super::command::{Command, EXIT_GRACE, Reply};
use super::control_server::{ControlHandle, ControlSocket};
use super::core::{Outcome, Request};
use super::events::{self, Event, Events};
use super::link::Link;
use super::stats::{ReloadReport, Stats};
use super::upgrade::{self, UpgradeError};
use super::{driver, systemd};
use crate::error::Error;
use crate::protocol::WorkerId;
use crate::settings::Settings;
use child::Signal;

/// How long [`Primary::broadcast`] waits for one worker whose channel is full.
pub const BROADCAST_WAIT: Duration = Duration::from_secs(1);

/// How long a primary that hands over to an upgrade's new primary waits for the
/// connections it accepted to reach its workers before it stops.
const HANDOVER_WAIT: Duration = Duration::from_secs(1);
/// How often it looks.
const HANDOVER_POLL: Duration = Duration::from_millis(5);
/// How long a SIGTTIN whose fork failed waits before it tries again.
const ADD_RETRY: Duration = Duration::from_millis(500);
/// How many times in a row it tries before giving up (10 s).
const ADD_ATTEMPTS: u32 = 20;

/// SIGTTINs whose fork failed and is retried.
#[derive(Debug, Default)]
struct PendingAdds {
    /// Workers still to add.
    waiting: u32,
    /// Failed retries in a row.
    attempts: u32,
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit, as Node (and Go's
/// runtime) do at start: a primary holds a descriptor per connection it hands over, and
/// its workers inherit the limit. A primary started by an upgrade also gets back what the
/// old one may have been lowered to while it ran (limits are inherited at exec).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::debug!(error = %e, soft, hard, "the descriptor limit stays as it was");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "no descriptor limit to read"),
    }
}

/// The error a request's outcome stands for, when it is not what was asked.
fn failure(outcome: Outcome) -> Error {
    match outcome {
        Outcome::UnknownWorker(id) => Error::UnknownWorker(id),
        Outcome::ForkFailed(e) => Error::Fork(e),
        Outcome::KillFailed(e) => Error::Kill(e),
        Outcome::Done
        | Outcome::Added(_)
        | Outcome::Removed(_)
        | Outcome::Reloaded(_)
        | Outcome::Stopped => Error::Stopped,
    }
}

/// `Ok` for `Done`, else the error it stands for.
fn done(outcome: Outcome) -> Result<(), Error> {
    match outcome {
        Outcome::Done => Ok(()),
        other => Err(failure(other)),
    }
}

/// The primary of a cluster: starts workers, hands them connections, replaces the dead.
///
/// Dropping it (or the runtime) kills every worker with `SIGKILL` and reaps it; call
/// [`stop`](Primary::stop) first for a graceful end.
#[derive(Debug)]
pub struct Primary {
    commands: mpsc::Sender<Command>,
    events: Option<Events>,
    ready: watch::Receiver<bool>,
    upgrade: upgrade::UpgradeTarget,
    /// The readiness socket of a primary started by an upgrade, taken (close-on-exec) at
    /// start and written by [`run_until_signal`](Primary::run_until_signal).
    upgraded_from: std::sync::Mutex<Option<systemd::UpgradeReadiness>>,
    /// The control socket being served, if any.
    control: Option<ControlHandle>,
    /// The primary's own servers, ended when this handle is dropped.
    servers: Servers,
}

/// The primary's own servers beside the driver (the metrics endpoint): each holds a
/// [`Link`], so each must end when the handle does, or the driver would wait for them.
#[derive(Debug, Default)]
struct Servers {
    /// The metrics endpoint's bound address.
    metrics: Option<SocketAddr>,
    /// Lines the application's output dropped, served as a counter.
    dropped_output: Arc<AtomicU64>,
    /// Dropped with the handle: the servers end.
    #[cfg(feature = "metrics")]
    _stop: Option<tokio_util::sync::DropGuard>,
}

impl Primary {
    /// Starts the configured number of workers. Must be called within a tokio runtime,
    /// from a task whose thread lives as long as the workers (see the crate's caveats).
    pub async fn start(settings: Settings) -> Result<Primary, Error> {
        if matches!(crate::role(), crate::Role::Worker(_)) {
            return Err(Error::WrongRole("primary"));
        }
        // Before anything is started, so nothing this process starts inherits it.
        let upgraded_from = systemd::UpgradeReadiness::from_env();
        raise_fd_limit();
        let (commands, commands_rx) = mpsc::channel(64);
        let (events_tx, events) = events::queue();
        // An upgrade runs this program (the file on disk now) with this process's arguments,
        // whatever program the workers run.
        let upgrade = upgrade::UpgradeTarget {
            program: crate::settings::executable_path(),
            args: std::env::args_os().skip(1).collect(),
            timeout: settings.upgrade_timeout,
            // As long as this primary's own stop may take: its workers' drain, then the exits.
            stop_timeout: settings.drain_deadline + EXIT_GRACE,
        };
        // Before any worker starts: a socket that cannot be made fails the start.
        let control = match &settings.control_socket {
            Some(path) => Some(ControlSocket::bind(path, upgraded_from.is_upgrade())?),
            None => None,
        };
        let (listen_timeout, drain_deadline) = (settings.reload_timeout, settings.drain_deadline);
        // Bound before any worker starts: an address in use fails the start at once.
        // An upgrade's new primary finds the address held by the old one, which serves
        // it until it stops: it binds it once the old one lets it go.
        #[cfg(feature = "metrics")]
        let metrics = match settings.metrics {
            Some(address) => match super::metrics::MetricsListener::bind(address).await {
                Ok(listener) => Some(Ok(listener)),
                Err(Error::Metrics { source, .. })
                    if upgraded_from.is_upgrade()
                        && source.kind() == std::io::ErrorKind::AddrInUse =>
                {
                    Some(Err(address))
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let (started, ready) = driver::Driver::start(settings, events_tx, commands_rx);
        done(started)?;
        #[cfg_attr(not(feature = "metrics"), allow(unused_mut))]
        let mut primary = Primary {
            commands,
            events: Some(events),
            ready,
            upgrade,
            upgraded_from: std::sync::Mutex::new(Some(upgraded_from)),
            control: None,
            servers: Servers::default(),
        };
        #[cfg(feature = "metrics")]
        if let Some(listener) = metrics {
            let link = primary.link();
            let servers = &mut primary.servers;
            let dropped = Arc::clone(&servers.dropped_output);
            match listener {
                Ok(listener) => {
                    servers.metrics = Some(listener.local_addr());
                    servers._stop = Some(listener.serve(link, dropped));
                }
                Err(address) => {
                    servers.metrics = Some(address);
                    servers._stop = Some(super::metrics::serve_once_free(address, link, dropped));
                }
            }
        }
        if let Some(control) = control {
            primary.control =
                Some(control.serve(primary.link(), listen_timeout, drain_deadline)?);
        }
        Ok(primary)
    }

    /// The address the metrics endpoint listens on
    /// ([`Settings::metrics`](crate::Settings::metrics); the port chosen for port 0), if
    /// it is on.
    pub fn metrics_address(&self) -> Option<SocketAddr> {
        self.servers.metrics
    }

    /// The count of output lines the application dropped (a program that writes its
    /// workers' output through bounded queues, as the `cluster` command does, adds to it
    /// when a queue is full). The metrics endpoint serves it as
    /// `cluster_dropped_output_lines_total`; the primary itself never adds to it.
    pub fn dropped_output_lines(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.servers.dropped_output)
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, Error> {
        self.link().ask(command).await
    }

    /// Asks the core, through the driver.
    async fn request(&self, request: Request) -> Result<Outcome, Error> {
        self.link().request(request).await
    }

    /// A way to the driver for the primary's own servers.
    fn link(&self) -> Link {
        Link {
            commands: self.commands.clone(),
            ready: self.ready.clone(),
        }
    }

    /// The next event, or `None` once the primary has stopped (or the stream was taken).
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.as_mut()?.recv().await
    }

    /// Takes the event stream, to read it from another task (for instance while
    /// [`run_until_signal`](Primary::run_until_signal) runs).
    pub fn take_events(&mut self) -> Option<Events> {
        self.events.take()
    }

    /// Starts one more worker in a new slot (Node's `cluster.fork()`).
    pub async fn fork(&self) -> Result<WorkerId, Error> {
        self.fork_with_env(Vec::<(OsString, OsString)>::new()).await
    }

    /// Starts one more worker in a new slot with extra environment variables (Node's
    /// `cluster.fork(env)`), on top of [`Settings::env`](crate::Settings::env). The
    /// slot keeps them: its replacements get the same environment.
    pub async fn fork_with_env<I, K, V>(&self, env: I) -> Result<WorkerId, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        let env = env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        match self.request(Request::AddWorker { env }).await? {
            Outcome::Added(id) => Ok(id),
            other => Err(failure(other)),
        }
    }

    /// Removes the newest slot, stopping its worker gracefully. Returns that worker.
    pub async fn remove_worker(&self) -> Result<Option<WorkerId>, Error> {
        match self.request(Request::RemoveWorker).await? {
            Outcome::Removed(id) => Ok(id),
            _ => Ok(None),
        }
    }

    /// Sends a user message to one worker (Node's `worker.send`).
    ///
    /// Back-pressure: this waits while the channel's socket is full, that is while the
    /// worker's process does not read it at all (stopped, or wedged); bound it with a
    /// timeout if that matters. A worker that reads its channel but not its messages keeps
    /// only the newest [`crate::USER_QUEUE_CAPACITY`] of them (see
    /// [`Worker::recv`](crate::Worker::recv)).
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        id: WorkerId,
        message: &T,
    ) -> Result<(), Error> {
        let senders = self.ask(|r| Command::Senders(Some(id), r)).await?;
        let sender = senders.first().ok_or(Error::UnknownWorker(id))?;
        sender.lock().await.send(message).await?;
        Ok(())
    }

    /// Sends a user message to every live worker; returns how many it reached. A worker
    /// whose channel stays full for [`BROADCAST_WAIT`] (a stopped or wedged process) is
    /// skipped and not counted, so one such worker delays a broadcast by at most that; the
    /// message may still reach it later (a cancelled send never corrupts the channel).
    pub async fn broadcast<T: Serialize + ?Sized>(&self, message: &T) -> Result<usize, Error> {
        let senders = self.ask(|r| Command::Senders(None, r)).await?;
        let mut reached = 0;
        for sender in senders {
            let send = async { sender.lock().await.send(message).await };
            if let Ok(Ok(())) = tokio::time::timeout(BROADCAST_WAIT, send).await {
                reached += 1;
            }
        }
        Ok(reached)
    }

    /// Asks one worker to stop: it stops accepting, finishes in-flight connections and
    /// exits; it is killed when the drain deadline passes. It is not replaced.
    pub async fn disconnect(&self, id: WorkerId) -> Result<(), Error> {
        done(self.request(Request::Disconnect(Some(id))).await?)
    }

    /// Asks every worker to stop (Node's `cluster.disconnect()`); none is replaced.
    pub async fn disconnect_all(&self) -> Result<(), Error> {
        done(self.request(Request::Disconnect(None)).await?)
    }

    /// Node's `worker.kill(signal)`: disconnects the worker (no new connections, its
    /// channel is told to stop), then sends `signal`. Its exit has
    /// `exited_after_disconnect` set and it is not replaced. (A worker killed from outside,
    /// by its pid, crashed: the restart policy replaces it.)
    pub async fn kill(&self, id: WorkerId, signal: Signal) -> Result<(), Error> {
        done(self.request(Request::Kill(id, signal)).await?)
    }

    /// A snapshot of the workers and the held connections.
    pub async fn stats(&self) -> Result<Stats, Error> {
        self.ask(Command::Stats).await
    }

    /// Watches the cluster's readiness ([`Stats::ready`]): it changes as workers start
    /// listening, die, or a stop begins.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Starts a new primary from this program's file on disk (resolved at
    /// [`start`](Primary::start)) with this process's arguments, passes it every
    /// listening socket the systemd way (`LISTEN_FDS`), and waits until it is ready (every
    /// one of its slots listening); returns its pid. This primary keeps serving meanwhile
    /// and afterwards: stop it to finish the upgrade (as
    /// [`run_until_signal`](Primary::run_until_signal) does on `SIGUSR2`). If the new
    /// primary ends or is not ready within
    /// [`Settings::upgrade_timeout`](crate::Settings::upgrade_timeout), it is killed (its
    /// workers with it) and this one serves on. The new primary is watched through its
    /// pidfd, not only its readiness socket: one that exits fails the upgrade at once,
    /// even if a process it left behind holds that socket.
    ///
    /// The new primary runs in a session and process group of its own; when the upgrade
    /// fails, the whole group is killed, so nothing it started keeps a listening socket.
    ///
    /// # Cancellation
    ///
    /// Dropping the future before it resolves kills the new primary's process group
    /// (`SIGKILL`). Once it has resolved with a pid, the new primary is on its own.
    pub async fn upgrade(&self) -> Result<u32, UpgradeError> {
        self.upgrade_unless(std::future::pending()).await
    }

    /// [`upgrade`](Primary::upgrade), abandoned if `stop` resolves before the new primary
    /// is ready: it is sent `SIGTERM`, given as long as this primary's own stop may take
    /// (the drain deadline and [`EXIT_GRACE`]), then its process group is killed; returns
    /// [`UpgradeError::Stopped`] once it is reaped.
    async fn upgrade_unless(&self, stop: impl Future<Output = ()>) -> Result<u32, UpgradeError> {
        let sockets = self
            .ask(Command::Handover)
            .await
            .map_err(|_| UpgradeError::Stopped)?
            .map_err(UpgradeError::Sockets)?;
        self.upgrade.run(sockets, stop).await
    }

    /// Before this primary stops for an upgrade: stops accepting on the round-robin
    /// sockets, whose backlog the new primary shares, and waits (at most
    /// [`HANDOVER_WAIT`]) until the connections already accepted have gone to a worker, so
    /// that the stop closes none of them.
    async fn hand_over_connections(&self) -> Result<(), Error> {
        self.ask(|r| Command::Accepting(false, r)).await?;
        let deadline = tokio::time::Instant::now() + HANDOVER_WAIT;
        while self.stats().await?.queued > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(HANDOVER_POLL).await;
        }
        Ok(())
    }

    /// Rolling reload: each worker in turn is replaced by a new one, which must be
    /// listening on as many servers as the old one before the old one is asked to stop.
    /// Resolves when every slot has been dealt with: the report lists the slots replaced
    /// and those that kept their old worker (the new one crashed or did not listen in
    /// time), and whether a stop cut the reload short. A reload asked for during another
    /// runs after it, so that every slot ends on the newest code.
    pub async fn reload(&self) -> Result<ReloadReport, Error> {
        match self.request(Request::Reload).await? {
            Outcome::Reloaded(report) => Ok(report),
            other => Err(failure(other)),
        }
    }

    /// Stops every worker gracefully (each drains until the deadline, then is killed),
    /// closes the listening sockets, and resolves when all have exited. With a
    /// [`stop_delay`](crate::Settings::stop_delay), the drain begins after the delay.
    pub async fn stop(&self) -> Result<(), Error> {
        self.stop_within(None).await
    }

    /// [`stop`](Primary::stop), the workers given `grace` to drain instead of the drain
    /// deadline (`None`: the deadline).
    pub async fn stop_within(&self, grace: Option<Duration>) -> Result<(), Error> {
        let stopped = match self.request(Request::Stop { grace }).await {
            Ok(_) | Err(Error::Stopped) => Ok(()),
            Err(e) => Err(e),
        };
        self.settle_control().await;
        stopped
    }

    /// Lets the control socket finish the answers it is writing (one to a `stop`
    /// request, say), for a moment.
    async fn settle_control(&self) {
        if let Some(control) = &self.control {
            control.settle().await;
        }
    }

    /// Runs until `SIGTERM` or `SIGINT`, then stops gracefully and returns `Ok(())`.
    /// Meanwhile `SIGHUP` starts a rolling reload, `SIGTTIN` adds a worker, `SIGTTOU`
    /// removes one, and `SIGUSR2` [upgrades](Primary::upgrade) the primary: once the new
    /// primary is ready, this one stops and returns `Ok(())`; if it fails, this one serves on.
    ///
    /// A `SIGTERM` or `SIGINT` during an upgrade, before the new primary is ready, stops
    /// both: the new primary is sent `SIGTERM` (it drains its workers as this one does),
    /// its process group is killed if it has not exited when this primary's own stop
    /// could have ended, and this returns once both are gone. Once the new primary is
    /// ready the upgrade is done: this primary hands over and stops, and a later signal
    /// to it does not reach the new one (stop that by its own pid, as systemd does after
    /// `MAINPID=`).
    ///
    /// Under systemd (`NOTIFY_SOCKET`) it notifies `READY=1` whenever the cluster turns
    /// ready, `RELOADING=1` with `MONOTONIC_USEC` at a `SIGHUP` and `READY=1` when the
    /// reload ends, `STOPPING=1` at a stop, `STATUS=` with the worker count, `WATCHDOG=1`
    /// every half `WATCHDOG_USEC` when the watchdog is on, and `MAINPID=` with the new
    /// primary's pid when an upgrade succeeds (then nothing more). A primary started by an
    /// upgrade tells the old one when it is ready.
    pub async fn run_until_signal(&self) -> Result<(), Error> {
        use tokio::signal::unix::{SignalKind, signal};
        let listen = |kind: SignalKind| signal(kind).map_err(Error::Signal);
        let mut term = listen(SignalKind::terminate())?;
        let mut int = listen(SignalKind::interrupt())?;
        let mut hup = listen(SignalKind::hangup())?;
        let mut ttin = listen(SignalKind::from_raw(libc::SIGTTIN))?;
        let mut ttou = listen(SignalKind::from_raw(libc::SIGTTOU))?;
        let mut usr2 = listen(SignalKind::user_defined2())?;
        let mut notifier = systemd::Notifier::new();
        let mut upgraded_from = self
            .upgraded_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_else(systemd::UpgradeReadiness::none);
        let mut ready = self.ready.clone();
        ready.mark_changed();
        let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
        let (reloaded_tx, mut reloaded) = mpsc::channel::<()>(4);
        let mut upgrading: Option<Upgrading<'_>> = None;
        // A SIGTTIN whose fork failed (no descriptor or process left for a moment) is
        // retried; a SIGTTOU first takes back a SIGTTIN still waiting, so TTIN then TTOU
        // always leaves the count where it was.
        let mut adds = PendingAdds::default();
        let retry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: rolling reload");
                    notifier.reloading();
                    // Not awaited here: signals keep being handled during the reload.
                    let (tx, rx) = oneshot::channel();
                    let reload = Command::Core(Request::Reload, tx);
                    self.commands.send(reload).await.map_err(|_| Error::Stopped)?;
                    let reloaded_tx = reloaded_tx.clone();
                    tokio::spawn(async move {
                        if rx.await.is_ok() {
                            let _ = reloaded_tx.send(()).await;
                        }
                    });
                }
                Some(()) = reloaded.recv() => {
                    tracing::info!("rolling reload complete");
                    let stats = self.stats().await?;
                    match stats.ready {
                        true => notifier.ready(stats.workers.len()),
                        false => notifier.not_ready(stats.workers.len()),
                    }
                }
                Ok(()) = ready.changed() => {
                    let now_ready = *ready.borrow_and_update();
                    let workers = self.stats().await?.workers.len();
                    if now_ready {
                        upgraded_from.ready();
                        notifier.ready(workers);
                    } else {
                        notifier.not_ready(workers);
                    }
                }
                _ = usr2.recv() => match upgrading {
                    Some(_) => tracing::warn!("SIGUSR2: an upgrade is already in progress"),
                    None => {
                        tracing::info!(program = ?self.upgrade.program, "SIGUSR2: upgrading the primary");
                        let (stop, stopped) = oneshot::channel::<()>();
                        let stopped = async move {
                            let _ = stopped.await;
                        };
                        upgrading = Some(Upgrading {
                            stop,
                            run: Box::pin(self.upgrade_unless(stopped)),
                        });
                    }
                },
                result = async { upgrading.as_mut().expect("guarded").run.as_mut().await }, if upgrading.is_some() => {
                    upgrading = None;
                    match result {
                        Ok(pid) => {
                            tracing::info!(new_primary = pid, "upgrade: the new primary is ready; stopping this one");
                            notifier.hand_over(pid);
                            self.hand_over_connections().await?;
                            self.stop().await?;
                            return Ok(());
                        }
                        Err(e) => tracing::error!(error = %e, "upgrade failed; this primary keeps serving"),
                    }
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    notifier.watchdog();
                }
                _ = ttin.recv() => {
                    match self.fork().await {
                        Ok(id) => tracing::info!(%id, "SIGTTIN: added a worker"),
                        Err(e) => {
                            tracing::warn!(error = %e, "SIGTTIN: could not add a worker now; retrying");
                            adds.waiting += 1;
                            retry.as_mut().reset(tokio::time::Instant::now() + ADD_RETRY);
                        }
                    }
                }
                () = &mut retry, if adds.waiting > 0 => {
                    match self.fork().await {
                        Ok(id) => {
                            tracing::info!(%id, "SIGTTIN: added a worker");
                            adds.waiting -= 1;
                            adds.attempts = 0;
                        }
                        Err(e) => {
                            adds.attempts += 1;
                            if adds.attempts >= ADD_ATTEMPTS {
                                tracing::error!(error = %e, waiting = adds.waiting, "SIGTTIN: could not add a worker; giving up");
                                adds = PendingAdds::default();
                            }
                        }
                    }
                    if adds.waiting > 0 {
                        retry.as_mut().reset(tokio::time::Instant::now() + ADD_RETRY);
                    }
                }
                _ = ttou.recv() => {
                    if adds.waiting > 0 {
                        adds.waiting -= 1;
                        tracing::info!("SIGTTOU: took back a SIGTTIN still waiting to add a worker");
                    } else {
                        let removed = self.remove_worker().await?;
                        tracing::info!(?removed, "SIGTTOU: removed a worker");
                    }
                }
                // Stopped through the control socket: its answer is written first.
                () = self.commands.closed() => {
                    self.settle_control().await;
                    return Ok(());
                }
            }
        }
        tracing::info!("stopping all workers");
        notifier.stopping();
        let Some(Upgrading { stop, run }) = upgrading else {
            return self.stop().await;
        };
        // Before the new primary is ready: it stops too, alongside this one.
        drop(stop);
        let (stopped, upgrade) = tokio::join!(self.stop(), run);
        match upgrade {
            Err(UpgradeError::Stopped) => {
                tracing::info!("the upgrade was abandoned; the new primary is gone")
            }
            Err(e) => tracing::warn!(error = %e, "upgrade failed while stopping"),
            // It was ready before it heard of the stop: it is the service now.
            Ok(pid) => {
                tracing::warn!(
                    new_primary = pid,
                    "the new primary became ready as this one stopped; it serves on"
                );
                notifier.hand_over(pid);
            }
        }
        stopped
    }
}

/// An upgrade in progress in [`Primary::run_until_signal`]: dropping `stop` abandons it.
struct Upgrading<'a> {
    stop: oneshot::Sender<()>,
    run: std::pin::Pin<Box<dyn Future<Output = Result<u32, UpgradeError>> + Send + 'a>>,
}
