//! Performing one fault of the schedule on a running target, on a thread of its own so
//! that faults overlap, and recording what was done: when it started and ended, which
//! process it hit, and what came of it (a burst's answered connections, say).
//!
//! A fault undoes itself before it returns on every path: a stopped worker is sent
//! `SIGCONT`, a lowered limit is put back, a slowloris connection is closed. Signals go
//! through [`Registry::signal`], which refuses a pid that is no longer the process it
//! registered.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::Registry;
use super::client::{self, IO_TIMEOUT};
use super::schedule::{FaultKind, Planned};
use super::sys;
use super::target::Target;

/// A lowered `RLIMIT_NOFILE` leaves the process this many descriptors above those it holds.
const FEW_FDS: u64 = 3;
const BURST: usize = 1000;
const SLOWLORIS: usize = 500;
/// Threads that open a burst's or a slowloris' connections.
const OPENERS: usize = 8;
const BURN_MS: u64 = 2000;

/// What a fault did.
#[derive(Debug, Clone)]
pub(crate) struct FaultRecord {
    pub(crate) kind: FaultKind,
    /// From the start of the load.
    pub(crate) start: Duration,
    pub(crate) end: Duration,
    /// The process it hit (a worker, or the primary for a signal or a limit).
    pub(crate) pid: Option<u32>,
    /// What came of it, for the report.
    pub(crate) detail: String,
}

/// Performs `planned` on `target`; `started` is the load's clock.
pub(crate) fn perform(
    planned: &Planned,
    target: &Target,
    registry: &Registry,
    started: Instant,
) -> FaultRecord {
    let now = || started.elapsed();
    let start = now();
    let (pid, detail) = match planned.kind {
        FaultKind::Kill => match pick(target, planned.pick) {
            Some(pid) => {
                // The time recorded is taken before the signal is sent, so it is never
                // later than the failures the kill causes.
                let at = now();
                let sent = registry.signal(pid, Signal::SIGKILL);
                return FaultRecord {
                    kind: planned.kind,
                    start: at,
                    end: at,
                    pid: sent.then_some(pid),
                    detail: if sent { String::new() } else { "gone".into() },
                };
            }
            None => (None, "no worker".into()),
        },
        FaultKind::Stop => match pick(target, planned.pick) {
            Some(pid) => {
                let stopped = registry.signal(pid, Signal::SIGSTOP);
                thread::sleep(planned.hold);
                // Always continued, even if it was gone: a pid the registry no longer
                // owns is not signalled.
                registry.signal(pid, Signal::SIGCONT);
                let detail = format!("{} ms", planned.hold.as_millis());
                (stopped.then_some(pid), detail)
            }
            None => (None, "no worker".into()),
        },
        FaultKind::Hup => primary_signal(target, registry, Signal::SIGHUP),
        FaultKind::Upgrade => primary_signal(target, registry, Signal::SIGUSR2),
        FaultKind::Scale => {
            let primary = target.primary();
            let grown = registry.signal(primary, Signal::SIGTTIN);
            thread::sleep(planned.hold);
            // To the primary that grew: a new one (after SIGUSR2) started with the
            // configured count.
            let shrunk = grown && registry.signal(primary, Signal::SIGTTOU);
            (Some(primary), format!("ttou sent: {shrunk}"))
        }
        FaultKind::WorkerFds => match pick(target, planned.pick) {
            Some(pid) => (Some(pid), lower_fds(pid, planned.hold, registry)),
            None => (None, "no worker".into()),
        },
        FaultKind::PrimaryFds => {
            let primary = target.primary();
            (Some(primary), lower_fds(primary, planned.hold, registry))
        }
        FaultKind::Burst => (None, burst(target.addr)),
        FaultKind::Slowloris => (None, slowloris(target.addr, planned.hold)),
        FaultKind::Burn => burn(target.addr),
    };
    FaultRecord {
        kind: planned.kind,
        start,
        end: now(),
        pid,
        detail,
    }
}

/// One of the current primary's live workers, `pick` modulo their number.
fn pick(target: &Target, pick: u64) -> Option<u32> {
    let workers = target.workers();
    let n = u64::try_from(workers.len()).ok().filter(|&n| n > 0)?;
    workers.get(usize::try_from(pick % n).ok()?).copied()
}

fn primary_signal(target: &Target, registry: &Registry, signal: Signal) -> (Option<u32>, String) {
    let primary = target.primary();
    let sent = registry.signal(primary, signal);
    (
        Some(primary),
        if sent { String::new() } else { "gone".into() },
    )
}

/// Lowers `pid`'s soft `RLIMIT_NOFILE` to [`FEW_FDS`] above the descriptors it holds for
/// `hold`, then puts it back.
fn lower_fds(pid: u32, hold: Duration, registry: &Registry) -> String {
    let Some(open) = open_fds(pid) else {
        return "gone".into();
    };
    let lowered = || {
        registry
            .lowered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    let before = {
        let mut lowered = lowered();
        match lowered.get_mut(&pid) {
            // Another fault holds it lowered: its original limits are the ones to keep.
            Some((original, holders)) => {
                *holders += 1;
                *original
            }
            None => match sys::nofile(pid) {
                Ok(limits) => {
                    lowered.insert(pid, (limits, 1));
                    limits
                }
                Err(err) => return format!("prlimit: {err}"),
            },
        }
    };
    let few = (open + FEW_FDS).min(before.0);
    let set = sys::set_nofile(pid, (few, before.1));
    if set.is_ok() {
        thread::sleep(hold);
    }
    {
        let mut lowered = lowered();
        let last = match lowered.get_mut(&pid) {
            Some((_, holders)) => {
                *holders -= 1;
                *holders == 0
            }
            None => true,
        };
        if last {
            lowered.remove(&pid);
            if registry.is_ours_and_running(pid) {
                let _ = sys::set_nofile(pid, before);
            }
        }
    }
    if let Err(err) = set {
        return format!("prlimit: {err}");
    }
    format!("{few} of {} fds for {} ms", before.0, hold.as_millis())
}

/// How many descriptors `pid` holds.
pub(crate) fn open_fds(pid: u32) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(entries.count() as u64)
}

/// Opens `count` connections from [`OPENERS`] threads; each thread then runs `each` on its
/// connections. Returns how many connected and what `each` counted.
fn connections(
    addr: SocketAddr,
    count: usize,
    each: impl Fn(Vec<TcpStream>) -> usize + Sync,
) -> (usize, usize) {
    let per_thread = count.div_ceil(OPENERS);
    thread::scope(|scope| {
        let handles: Vec<_> = (0..OPENERS)
            .map(|_| {
                let each = &each;
                scope.spawn(move || {
                    let streams: Vec<TcpStream> = (0..per_thread)
                        .filter_map(|_| TcpStream::connect_timeout(&addr, IO_TIMEOUT).ok())
                        .collect();
                    for stream in &streams {
                        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
                    }
                    let opened = streams.len();
                    (opened, each(streams))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().ok())
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    })
}

/// [`BURST`] connections open at once, then one request on each.
fn burst(addr: SocketAddr) -> String {
    let (opened, answered) = connections(addr, BURST, |streams| {
        let request = b"GET / HTTP/1.1\r\nHost: burst\r\nConnection: close\r\n\r\n";
        let mut answered = 0;
        for mut stream in streams {
            if stream.write_all(request).is_ok() {
                let mut reader = BufReader::new(stream);
                if client::exchange(&mut reader, b"").is_ok_and(|r| r.status == 200) {
                    answered += 1;
                }
            }
        }
        answered
    });
    format!("{opened} connected, {answered} answered")
}

/// [`SLOWLORIS`] connections that send half a request head, held for `hold`.
fn slowloris(addr: SocketAddr, hold: Duration) -> String {
    let (opened, sent) = connections(addr, SLOWLORIS, |streams| {
        let sent = streams
            .iter()
            .filter(|s| {
                let mut stream: &TcpStream = s;
                stream.write_all(b"GET / HTTP/1.1\r\nHost: slow").is_ok()
            })
            .count();
        thread::sleep(hold);
        sent
    });
    format!("{opened} connected, {sent} half heads")
}

/// `GET /burn?ms=2000` on a new connection: the worker that burnt and how it ended.
fn burn(addr: SocketAddr) -> (Option<u32>, String) {
    let request =
        format!("GET /burn?ms={BURN_MS} HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n");
    let result = TcpStream::connect_timeout(&addr, IO_TIMEOUT).and_then(|stream| {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        client::exchange(&mut BufReader::new(stream), request.as_bytes())
    });
    match result {
        Ok(response) => (response.pid, format!("status {}", response.status)),
        Err(err) => (None, format!("no answer: {err}")),
    }
}
