//! The load of `cargo xtask chaos`: a few keep-alive connections and a few threads that
//! open a new connection per request, all paced, recording every request.
//!
//! A [`Request`] records when it started and ended, its outcome (a status, or the kind of
//! error), the worker process that answered (the `x-worker-pid` response header) and the
//! connection it used, with the pid that last answered on that connection before it
//! (`None` on a connection's first request): the checker needs it to say which worker held
//! the connection when a request failed.
//!
//! Bounds: [`KEEP_ALIVE`] + [`FRESH`] threads, each paced (at most about 1,100 requests a
//! second in all, which a 2-core machine carries beside the servers), every read and write
//! bounded by [`IO_TIMEOUT`], and at most [`MAX_RECORDS`] requests recorded: the load
//! stops there (and says so) rather than grow.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// Keep-alive connections, each its own thread.
pub(crate) const KEEP_ALIVE: usize = 4;
/// Threads that open a new connection for every request.
pub(crate) const FRESH: usize = 2;
/// A keep-alive thread's pause between requests.
const KEEP_ALIVE_PACE: Duration = Duration::from_millis(4);
/// A new-connection thread's pause between requests.
const FRESH_PACE: Duration = Duration::from_millis(10);
/// No connect, read or write waits longer (a stopped worker holds a request up to 3 s,
/// a burning one 2 s more): past it the request failed with `timeout`.
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// The most requests one load records (10 minutes at the pace above is about 660,000).
pub(crate) const MAX_RECORDS: usize = 2_000_000;

/// Why a request got no response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum ErrorKind {
    Refused,
    Reset,
    Eof,
    Timeout,
    Other,
}

impl ErrorKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ErrorKind::Refused => "refused",
            ErrorKind::Reset => "reset",
            ErrorKind::Eof => "eof",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Other => "other",
        }
    }

    fn of(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
            io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ErrorKind::Timeout,
            _ => ErrorKind::Other,
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Status(u16),
    Error(ErrorKind),
}

/// One request of the load. Times are from the start of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) start: Duration,
    pub(crate) end: Duration,
    pub(crate) outcome: Outcome,
    /// The worker that answered (`x-worker-pid`).
    pub(crate) pid: Option<u32>,
    /// The connection, numbered from 1 in the order they were opened.
    pub(crate) conn: u64,
    /// The worker that answered the connection's previous request; `None` for its first.
    pub(crate) held_by: Option<u32>,
}

impl Request {
    pub(crate) fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Status(s) if (200..300).contains(&s))
    }
}

#[derive(Debug)]
struct Shared {
    records: Mutex<Vec<Request>>,
    stop: AtomicBool,
    connections: AtomicU64,
    requests: AtomicU64,
    failed: AtomicU64,
    capped: AtomicBool,
}

/// A running load; dropping it stops and joins its threads.
#[derive(Debug)]
pub(crate) struct Load {
    shared: Arc<Shared>,
    started: Instant,
    threads: Vec<thread::JoinHandle<()>>,
}

/// What the load recorded.
#[derive(Debug)]
pub(crate) struct History {
    pub(crate) requests: Vec<Request>,
    /// The load stopped at [`MAX_RECORDS`].
    pub(crate) capped: bool,
}

impl Load {
    /// Starts the load against `addr`; its clock starts at `started`.
    pub(crate) fn start(addr: SocketAddr, started: Instant) -> Self {
        let shared = Arc::new(Shared {
            records: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            capped: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for fresh in [false, true] {
            let count = if fresh { FRESH } else { KEEP_ALIVE };
            for _ in 0..count {
                let shared = Arc::clone(&shared);
                threads.push(thread::spawn(move || {
                    run_thread(addr, fresh, &shared, started);
                }));
            }
        }
        Self {
            shared,
            started,
            threads,
        }
    }

    /// Requests so far, and how many failed.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.failed.load(Ordering::Relaxed),
        )
    }

    /// The load's clock.
    pub(crate) fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the load, joins its threads and returns what it recorded, in order of end.
    pub(crate) fn stop(mut self) -> History {
        self.stop_threads();
        let mut requests = std::mem::take(
            &mut *self
                .shared
                .records
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        requests.sort_by_key(|r| r.end);
        History {
            requests,
            capped: self.shared.capped.load(Ordering::Relaxed),
        }
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// One open connection and the pid that last answered on it.
struct Connection {
    id: u64,
    stream: BufReader<TcpStream>,
    last_pid: Option<u32>,
}

fn run_thread(addr: SocketAddr, fresh: bool, shared: &Shared, started: Instant) {
    let request: &[u8] = if fresh {
        b"GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: chaos\r\n\r\n"
    };
    let pace = if fresh { FRESH_PACE } else { KEEP_ALIVE_PACE };
    let mut connection: Option<Connection> = None;
    while !shared.stop.load(Ordering::Acquire) {
        let start = started.elapsed();
        let result = match connection.as_mut() {
            Some(conn) => exchange(&mut conn.stream, request).map(|r| (r, conn.id, conn.last_pid)),
            None => open(addr).and_then(|stream| {
                let id = shared.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let conn = connection.insert(Connection {
                    id,
                    stream,
                    last_pid: None,
                });
                exchange(&mut conn.stream, request).map(|r| (r, id, None))
            }),
        };
        let record = match result {
            Ok((response, conn, held_by)) => {
                match connection.as_mut() {
                    Some(c) if !response.close && !fresh => c.last_pid = response.pid,
                    _ => connection = None,
                }
                Request {
                    start,
                    end: started.elapsed(),
                    outcome: Outcome::Status(response.status),
                    pid: response.pid,
                    conn,
                    held_by,
                }
            }
            Err(error) => {
                let (conn, held_by) = connection.take().map_or((0, None), |c| (c.id, c.last_pid));
                shared.failed.fetch_add(1, Ordering::Relaxed);
                Request {
                    start,
                    end: started.elapsed(),
                    outcome: Outcome::Error(ErrorKind::of(&error)),
                    pid: None,
                    conn,
                    held_by,
                }
            }
        };
        shared.requests.fetch_add(1, Ordering::Relaxed);
        {
            let mut records = shared
                .records
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if records.len() >= MAX_RECORDS {
                shared.capped.store(true, Ordering::Relaxed);
                return;
            }
            records.push(record);
        }
        thread::sleep(pace);
    }
}

fn open(addr: SocketAddr) -> io::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// A response as the load sees it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) close: bool,
    pub(crate) pid: Option<u32>,
}

/// Sends `request` and reads one response (`Content-Length` bodies).
pub(crate) fn exchange<S: Read + Write>(
    stream: &mut BufReader<S>,
    request: &[u8],
) -> io::Result<Response> {
    stream.get_mut().write_all(request)?;
    read_response(stream)
}

fn read_response<S: Read>(stream: &mut BufReader<S>) -> io::Result<Response> {
    let status_line = line(stream)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("status line {status_line:?}")))?;
    let (mut length, mut close, mut pid) = (0usize, false, None);
    loop {
        let header = line(stream)?;
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(invalid(format!("header {header:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .parse()
                .map_err(|_| invalid(format!("length {value:?}")))?;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("x-worker-pid") {
            pid = value.parse().ok();
        }
    }
    if length > 1 << 20 {
        return Err(invalid(format!("length {length}")));
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(Response { status, close, pid })
}

fn line<S: Read>(stream: &mut BufReader<S>) -> io::Result<String> {
    let mut line = String::new();
    if stream.by_ref().take(16 * 1024).read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(bytes: &str, expected: Option<Response>) {
        let got = read_response(&mut BufReader::new(bytes.as_bytes())).ok();
        assert_eq!(got, expected, "{bytes:?}");
    }

    #[test]
    fn responses_name_their_worker_and_say_close() {
        check(
            "HTTP/1.1 200 OK\r\nX-Worker-Pid: 42\r\ncontent-length: 2\r\n\r\nok",
            Some(Response {
                status: 200,
                close: false,
                pid: Some(42),
            }),
        );
        check(
            "HTTP/1.1 503 Nope\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            Some(Response {
                status: 503,
                close: true,
                pid: None,
            }),
        );
    }

    #[test]
    fn broken_responses_are_errors() {
        check("", None);
        check("garbage\r\n\r\n", None);
        check("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", None);
        check("HTTP/1.1 200 OK\r\nno colon\r\n\r\n", None);
    }

    #[test]
    fn error_kinds() {
        let kind = |k| ErrorKind::of(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::ConnectionRefused), ErrorKind::Refused);
        assert_eq!(kind(io::ErrorKind::BrokenPipe), ErrorKind::Reset);
        assert_eq!(kind(io::ErrorKind::UnexpectedEof), ErrorKind::Eof);
        assert_eq!(kind(io::ErrorKind::WouldBlock), ErrorKind::Timeout);
    }
}
