//! The control socket's server (the protocol is [`crate::control`]'s): a driver-side
//! concern like the metrics endpoint. It owns no cluster state: every answer comes from
//! the driver through a [`Link`] (a `Stats` snapshot, or a request the core decides).
//!
//! Bounds: at most [`MAX_CLIENTS`] connections at once (more are answered `busy` and
//! closed), a request line of at most [`MAX_REQUEST`] bytes read within
//! [`REQUEST_TIMEOUT`], answers written within it too. A slow or silent client costs one
//! task and its 64 KiB at most, and never the driver's loop.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::command::EXIT_GRACE;
use super::core::{Outcome, Request as CoreRequest};
use super::link::Link;
use super::stats::{ReloadReport, Stats};
use crate::control::{
    self, MAX_CLIENTS, MAX_REQUEST, REQUEST_TIMEOUT, Request, Response, WorkerRow,
};
use crate::error::Error;
use crate::protocol::WorkerId;

/// How long a stopping primary waits for control connections to finish writing their
/// answers (the answer to `stop` among them).
const SETTLE: Duration = Duration::from_secs(1);

/// How often a `scale` or a `reload` looks whether the workers have come or gone.
const SCALE_POLL: Duration = Duration::from_millis(50);

/// A bound control socket, not yet served.
#[derive(Debug)]
pub(crate) struct ControlSocket {
    listener: std::os::unix::net::UnixListener,
    file: SocketFile,
}

/// The socket's file: removed when the primary's handle is dropped, if it is still ours.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The served socket: the primary keeps it to wait for answers in flight and to remove
/// the file at the end.
#[derive(Debug)]
pub(crate) struct ControlHandle {
    permits: Arc<Semaphore>,
    _file: SocketFile,
    /// Cancelled when the handle is dropped: the server and every connection it serves
    /// end, and with them their `Link`s, so the driver is not kept alive by them.
    _stop: tokio_util::sync::DropGuard,
}

impl ControlHandle {
    /// Waits (at most [`SETTLE`]) until no control connection is being answered.
    pub(crate) async fn settle(&self) {
        let all = u32::try_from(MAX_CLIENTS).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(SETTLE, self.permits.acquire_many(all)).await;
    }
}

fn refused(path: &Path, reason: impl Into<String>) -> Error {
    Error::Control {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

impl ControlSocket {
    /// Creates the socket at `path`: its directory is created (0700) if missing and must
    /// be this user's and writable by nobody else; a stale socket file (nobody answers) is
    /// replaced; one a running primary answers on is an error, unless this primary
    /// `takes_over` from it (an upgrade's new primary: the old one answers until then, and
    /// leaves the new file in place when it ends).
    pub(crate) fn bind(path: &Path, takes_over: bool) -> Result<Self, Error> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| refused(path, format!("cannot create {}: {e}", dir.display())))?;
        }
        let meta =
            std::fs::metadata(dir).map_err(|e| refused(path, format!("{}: {e}", dir.display())))?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(refused(
                path,
                format!(
                    "{} belongs to uid {}, not to this user ({me})",
                    dir.display(),
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refused(
                path,
                format!(
                    "{} may be written by others (mode {:o})",
                    dir.display(),
                    meta.mode() & 0o777
                ),
            ));
        }
        match std::fs::symlink_metadata(path) {
            Ok(existing) if existing.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) if takes_over => {
                        tracing::info!(path = %path.display(), "taking over the control socket of the primary being upgraded");
                        std::fs::remove_file(path).map_err(|e| {
                            refused(path, format!("cannot take the socket over: {e}"))
                        })?;
                    }
                    Ok(_) => {
                        return Err(Error::ControlInUse {
                            path: path.to_owned(),
                        });
                    }
                    // Left by a primary that was killed: nobody listens.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        tracing::info!(path = %path.display(), "replacing a stale control socket");
                        std::fs::remove_file(path).map_err(|e| {
                            refused(path, format!("cannot remove the stale socket: {e}"))
                        })?;
                    }
                    Err(e) => return Err(refused(path, e.to_string())),
                }
            }
            Ok(_) => return Err(refused(path, "it exists and is not a socket")),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(refused(path, e.to_string())),
        }
        let listener = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| refused(path, format!("bind: {e}")))?;
        let file_meta =
            std::fs::symlink_metadata(path).map_err(|e| refused(path, e.to_string()))?;
        let file = SocketFile {
            path: path.to_owned(),
            inode: (file_meta.dev(), file_meta.ino()),
        };
        // The directory keeps others out meanwhile.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| refused(path, format!("chmod: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| refused(path, e.to_string()))?;
        Ok(Self { listener, file })
    }

    /// Serves requests until the primary ends. `listen_timeout` bounds how long a
    /// `scale` waits for new workers to listen.
    pub(crate) fn serve(
        self,
        link: Link,
        listen_timeout: Duration,
        drain_deadline: Duration,
    ) -> Result<ControlHandle, Error> {
        let path = self.file.path.clone();
        let listener =
            UnixListener::from_std(self.listener).map_err(|e| refused(&path, e.to_string()))?;
        let permits = Arc::new(Semaphore::new(MAX_CLIENTS));
        let stop = tokio_util::sync::CancellationToken::new();
        let server = Server {
            link,
            permits: Arc::clone(&permits),
            listen_timeout,
            drain_deadline,
            stop: stop.clone(),
        };
        tokio::spawn(server.run(listener));
        Ok(ControlHandle {
            permits,
            _file: self.file,
            _stop: stop.drop_guard(),
        })
    }
}

#[derive(Debug, Clone)]
struct Server {
    link: Link,
    permits: Arc<Semaphore>,
    listen_timeout: Duration,
    drain_deadline: Duration,
    stop: tokio_util::sync::CancellationToken,
}

impl Server {
    async fn run(self, listener: UnixListener) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = self.link.closed() => return,
                () = self.stop.cancelled() => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors: wait a little rather than spin.
                    tracing::warn!(error = %e, "control socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => {
                    let server = self.clone();
                    tokio::spawn(async move {
                        let stop = server.stop.clone();
                        tokio::select! {
                            () = server.answer(stream) => {}
                            () = stop.cancelled() => {}
                        }
                        drop(permit);
                    });
                }
                Err(_) => {
                    tokio::spawn(write_answer(
                        stream,
                        Response::failed("busy: too many control connections"),
                    ));
                }
            }
        }
    }

    /// Reads one request, does it, writes the answer.
    async fn answer(&self, stream: UnixStream) {
        let me = nix::unistd::geteuid().as_raw();
        let uid = stream.peer_cred().map(|c| c.uid());
        match uid {
            Ok(uid) if uid == me || uid == 0 => {}
            Ok(uid) => {
                tracing::warn!(uid, "control socket: refused a client of another user");
                return write_answer(
                    stream,
                    Response::failed(format!("refused: uid {uid} is not this cluster's owner")),
                )
                .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket: no peer credentials");
                return;
            }
        }
        let mut reader = BufReader::new(stream);
        let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut reader)).await {
            Ok(Ok(request)) => request,
            Ok(Err(reason)) => {
                return write_answer(reader.into_inner(), Response::failed(reason)).await;
            }
            Err(_) => {
                let reason = format!("no request within {}s", REQUEST_TIMEOUT.as_secs());
                return write_answer(reader.into_inner(), Response::failed(reason)).await;
            }
        };
        tracing::info!(?request, "control socket request");
        let response = self.perform(request).await;
        write_answer(reader.into_inner(), response).await;
    }

    async fn perform(&self, request: Request) -> Response {
        match request {
            Request::Status => match self.link.stats().await {
                Ok(stats) => Response {
                    status: Some(status_view(&stats)),
                    ..Response::done()
                },
                Err(e) => Response::failed(e.to_string()),
            },
            Request::Reload => self.reload().await,
            Request::Scale { workers } => self.scale(workers).await,
            Request::Stop { grace_ms } => {
                let grace = grace_ms.map(Duration::from_millis);
                match self.link.request(CoreRequest::Stop { grace }).await {
                    Ok(_) | Err(Error::Stopped) => Response::done(),
                    Err(e) => Response::failed(e.to_string()),
                }
            }
        }
    }

    /// Reloads, and answers once the replaced workers have also exited (so that a status
    /// asked after the answer shows only the new ones), at most a drain later.
    async fn reload(&self) -> Response {
        let before: Vec<WorkerId> = match self.link.stats().await {
            Ok(stats) => stats.workers.iter().map(|w| w.id).collect(),
            Err(e) => return Response::failed(e.to_string()),
        };
        let report = match self.link.request(CoreRequest::Reload).await {
            Ok(Outcome::Reloaded(report)) => report,
            Ok(other) => return Response::failed(format!("unexpected answer {other:?}")),
            Err(e) => return Response::failed(e.to_string()),
        };
        let kept: Vec<WorkerId> = report.failed.iter().map(|f| f.kept).collect();
        let deadline = tokio::time::Instant::now() + self.drain_deadline + EXIT_GRACE;
        while tokio::time::Instant::now() < deadline {
            let Ok(stats) = self.link.stats().await else {
                break;
            };
            let draining = stats
                .workers
                .iter()
                .any(|w| before.contains(&w.id) && !kept.contains(&w.id));
            if !draining {
                break;
            }
            tokio::time::sleep(SCALE_POLL).await;
        }
        Response {
            ok: report.succeeded(),
            error: (!report.succeeded()).then(|| reload_failure_text(&report)),
            reload: Some(reload_view(&report)),
            ..Response::done()
        }
    }

    /// Adds or removes workers until there are `workers`, then waits until the new ones
    /// listen (the cluster is ready) or the removed ones have exited.
    async fn scale(&self, workers: usize) -> Response {
        if workers == 0 || workers > crate::control::MAX_WORKERS {
            return Response::failed(format!(
                "the worker count must be 1 to {}",
                crate::control::MAX_WORKERS
            ));
        }
        let slots = match self.link.stats().await {
            Ok(stats) => stats.slots.iter().filter(|s| !s.failed).count(),
            Err(e) => return Response::failed(e.to_string()),
        };
        for _ in slots..workers {
            let asked = CoreRequest::AddWorker { env: Vec::new() };
            match self.link.request(asked).await {
                Ok(Outcome::Added(_)) => {}
                Ok(Outcome::ForkFailed(e)) => {
                    return Response::failed(format!("could not start a worker: {e}"));
                }
                Ok(other) => return Response::failed(format!("could not add a worker: {other:?}")),
                Err(e) => return Response::failed(e.to_string()),
            }
        }
        for _ in workers..slots {
            if let Err(e) = self.link.request(CoreRequest::RemoveWorker).await {
                return Response::failed(e.to_string());
            }
        }
        let deadline = tokio::time::Instant::now() + self.listen_timeout;
        loop {
            let stats = match self.link.stats().await {
                Ok(stats) => stats,
                Err(e) => return Response::failed(e.to_string()),
            };
            let live = stats.workers.len();
            if stats.ready && live == workers {
                return Response {
                    scale: Some(control::Scale { workers }),
                    ..Response::done()
                };
            }
            if stats.stopping {
                return Response::failed("the cluster is stopping");
            }
            if tokio::time::Instant::now() >= deadline {
                return Response::failed(format!(
                    "{live} workers, {} ready, after {}s (wanted {workers})",
                    if stats.ready { "all" } else { "not all" },
                    self.listen_timeout.as_secs_f64()
                ));
            }
            tokio::time::sleep(SCALE_POLL).await;
        }
    }
}

/// Reads one request line of at most [`MAX_REQUEST`] bytes.
async fn read_request(reader: &mut BufReader<UnixStream>) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut limited = (&mut *reader).take(MAX_REQUEST as u64 + 1);
    use tokio::io::AsyncReadExt;
    limited
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the request: {e}"))?;
    if line.len() > MAX_REQUEST {
        return Err(format!("request longer than {MAX_REQUEST} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("the request must be one JSON line".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed request: {e}"))
}

/// Writes `response` as one line, within [`REQUEST_TIMEOUT`], and closes.
async fn write_answer(mut stream: UnixStream, response: Response) {
    let Ok(mut line) = serde_json::to_vec(&response) else {
        return;
    };
    line.push(b'\n');
    let write = async {
        stream.write_all(&line).await?;
        stream.shutdown().await
    };
    if let Ok(Err(e)) | Err(e) = tokio::time::timeout(REQUEST_TIMEOUT, write)
        .await
        .map_err(io::Error::other)
    {
        tracing::debug!(error = %e, "control socket: the answer was not written");
    }
}

fn reload_view(report: &ReloadReport) -> control::Reload {
    control::Reload {
        replaced: report.replaced.clone(),
        failed: report
            .failed
            .iter()
            .map(|f| control::ReloadFailure {
                slot: f.slot,
                worker: f.id.map(WorkerId::get),
                kept: f.kept.get(),
                reason: match f.reason {
                    crate::ReloadFailure::CrashLoop => "the new workers keep crashing".into(),
                    crate::ReloadFailure::NotListening { waited } => format!(
                        "the new worker was not listening within {}s",
                        waited.as_secs_f64()
                    ),
                },
            })
            .collect(),
        took_ms: millis(report.took),
        interrupted: report.interrupted,
    }
}

/// Why a reload failed, in one line.
fn reload_failure_text(report: &ReloadReport) -> String {
    if report.interrupted && report.failed.is_empty() {
        return "the reload was cut short by a stop".into();
    }
    let view = reload_view(report);
    view.failed
        .iter()
        .map(|f| format!("slot {} kept worker {}: {}", f.slot, f.kept, f.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The status as the control protocol spells it.
pub(crate) fn status_view(stats: &Stats) -> control::Status {
    let mut rows: Vec<WorkerRow> = Vec::with_capacity(stats.workers.len() + stats.slots.len());
    for slot in &stats.slots {
        let last_exit = slot.last_exit.map(|e| match e.cause {
            // `signal SIGKILL` says both.
            crate::ExitCause::Signal => e.status.to_string(),
            cause => format!("{cause} ({})", e.status),
        });
        let mut workers: Vec<_> = stats
            .workers
            .iter()
            .filter(|w| w.slot == slot.slot)
            .collect();
        workers.sort_by_key(|w| w.id);
        if workers.is_empty() {
            rows.push(WorkerRow {
                slot: Some(slot.slot),
                worker: None,
                pid: None,
                state: if slot.failed { "failed" } else { "restarting" }.into(),
                uptime_ms: None,
                restarts: slot.restarts,
                last_exit: last_exit.clone(),
                cpu_percent: None,
                rss_bytes: None,
                handed: None,
                listening: Vec::new(),
                build: None,
            });
        }
        for worker in workers {
            rows.push(WorkerRow {
                slot: Some(slot.slot),
                worker: Some(worker.id.get()),
                pid: Some(worker.pid),
                state: worker.state.as_str().into(),
                uptime_ms: Some(millis(worker.uptime)),
                restarts: slot.restarts,
                last_exit: last_exit.clone(),
                cpu_percent: worker.usage.and_then(|u| u.cpu_percent),
                rss_bytes: worker.usage.map(|u| u.rss_bytes),
                handed: (stats.policy == crate::Policy::RoundRobin).then_some(worker.handed),
                listening: worker.listening.iter().map(ToString::to_string).collect(),
                build: worker.build.clone(),
            });
        }
    }
    // Warm spares, and workers whose slot is gone (removed by a scale-down, draining).
    for worker in stats
        .workers
        .iter()
        .filter(|w| !stats.slots.iter().any(|s| s.slot == w.slot))
    {
        rows.push(WorkerRow {
            slot: (!worker.spare).then_some(worker.slot),
            worker: Some(worker.id.get()),
            pid: Some(worker.pid),
            state: match worker.spare {
                true => "spare".into(),
                false => worker.state.as_str().into(),
            },
            uptime_ms: Some(millis(worker.uptime)),
            restarts: worker.restarts,
            last_exit: None,
            cpu_percent: worker.usage.and_then(|u| u.cpu_percent),
            rss_bytes: worker.usage.map(|u| u.rss_bytes),
            handed: (stats.policy == crate::Policy::RoundRobin).then_some(worker.handed),
            listening: worker.listening.iter().map(ToString::to_string).collect(),
            build: worker.build.clone(),
        });
    }
    // Slots in order, then the spares.
    rows.sort_by_key(|r| (r.slot.is_none(), r.slot, r.worker));
    control::Status {
        pid: std::process::id(),
        policy: stats.policy.as_str().into(),
        uptime_ms: millis(stats.uptime),
        ready: stats.ready,
        stopping: stats.stopping,
        reload: stats.reload.map(|r| control::ReloadProgress {
            done: r.done,
            total: r.total,
            slot: r.slot,
        }),
        last_reload: stats.last_reload.as_ref().map(reload_view),
        workers: rows,
        queued: stats.queued,
    }
}
