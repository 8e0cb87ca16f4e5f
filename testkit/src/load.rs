//! [`KeepAliveLoad`]: a bounded keep-alive HTTP/1.1 client load, for tests and xtask that
//! must count every failed request while a server reloads or stops.
//!
//! Each of `connections` threads sends `GET path` on one keep-alive connection, reads the
//! whole response (`Content-Length` bodies only), and records a [`Sample`]. A response
//! with `Connection: close` is a success and the thread opens a new connection, as wrk
//! does; an error (refused connect, reset, early EOF, timeout) is a failed request and
//! the thread reconnects. Every thread stops at [`KeepAliveLoad::stop`], after
//! `max_requests` in all or after `max_duration`, whichever comes first, so the load is
//! bounded in count and time even when its owner fails.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// No connect, read or write of the load waits longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// What the load sends and for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Concurrent keep-alive connections (one thread each).
    pub connections: usize,
    /// The path of every `GET`.
    pub path: String,
    /// At most this many requests in all.
    pub max_requests: u64,
    /// At most this long.
    pub max_duration: Duration,
    /// Each connection waits this long between its requests (`None`: as fast as it can).
    pub pace: Option<Duration>,
    /// A response header (lower-case) whose value each sample records, such as the
    /// balancer's `x-upstream`.
    pub tag_header: Option<String>,
}

impl LoadConfig {
    /// `connections` connections sending `GET path` unpaced, for at most a million
    /// requests and 60 seconds.
    pub fn new(connections: usize, path: &str) -> Self {
        Self {
            connections,
            path: path.to_owned(),
            max_requests: 1_000_000,
            max_duration: Duration::from_secs(60),
            pace: None,
            tag_header: None,
        }
    }
}

/// Fails the calling test unless every sample is a 2xx response, naming how many failed
/// and the first of them.
#[track_caller]
pub fn assert_none_failed(samples: &[Sample]) {
    let failed: Vec<&Sample> = samples.iter().filter(|s| !s.is_ok()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, first: {:?}",
        failed.len(),
        samples.len(),
        failed.first()
    );
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response: what went wrong.
    Failed(String),
}

/// One request of the load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// When it ended, from the start of the load.
    pub at: Duration,
    /// Its outcome.
    pub outcome: Outcome,
    /// The value of [`LoadConfig::tag_header`] in the response, if any.
    pub tag: Option<String>,
}

impl Sample {
    /// A 2xx response.
    pub fn is_ok(&self) -> bool {
        matches!(self.outcome, Outcome::Status(s) if (200..300).contains(&s))
    }
}

#[derive(Debug)]
struct Shared {
    samples: Mutex<Vec<Sample>>,
    changed: Condvar,
    stop: AtomicBool,
    sent: AtomicU64,
}

impl Shared {
    fn samples(&self) -> MutexGuard<'_, Vec<Sample>> {
        self.samples.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running load; dropping it stops and joins its threads.
#[derive(Debug)]
pub struct KeepAliveLoad {
    shared: Arc<Shared>,
    started: Instant,
    threads: Vec<thread::JoinHandle<()>>,
}

impl KeepAliveLoad {
    /// Starts the load against `addr`.
    pub fn start(addr: SocketAddr, config: LoadConfig) -> Self {
        let shared = Arc::new(Shared {
            samples: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        });
        let started = Instant::now();
        let threads = (0..config.connections)
            .map(|_| {
                let (shared, config) = (Arc::clone(&shared), config.clone());
                thread::spawn(move || run_connection(addr, &config, &shared, started))
            })
            .collect();
        Self {
            shared,
            started,
            threads,
        }
    }

    /// Time since the load started, on the clock of [`Sample::at`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// How many samples there are so far.
    pub fn count(&self) -> usize {
        self.shared.samples().len()
    }

    /// A copy of the samples from index `from` on.
    pub fn samples_from(&self, from: usize) -> Vec<Sample> {
        let samples = self.shared.samples();
        samples.get(from..).unwrap_or_default().to_vec()
    }

    /// Waits up to `timeout`, woken by each sample, until `done` holds for the samples so
    /// far (all of them, from index 0); returns whether it did.
    pub fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&[Sample]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut samples = self.shared.samples();
        loop {
            if done(&samples) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.threads.iter().all(|t| t.is_finished()) {
                return done(&samples);
            }
            samples = self
                .shared
                .changed
                .wait_timeout(samples, left.min(Duration::from_millis(200)))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Stops the load, joins its threads and returns every sample.
    pub fn stop(mut self) -> Vec<Sample> {
        self.stop_threads();
        std::mem::take(&mut *self.shared.samples())
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for KeepAliveLoad {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn run_connection(addr: SocketAddr, config: &LoadConfig, shared: &Shared, started: Instant) {
    let request = format!("GET {} HTTP/1.1\r\nHost: load\r\n\r\n", config.path);
    let mut connection: Option<BufReader<TcpStream>> = None;
    loop {
        let over = started.elapsed() >= config.max_duration
            || shared.stop.load(Ordering::Acquire)
            || shared.sent.fetch_add(1, Ordering::AcqRel) >= config.max_requests;
        if over {
            return;
        }
        let result = match connection.as_mut() {
            Some(stream) => exchange(stream, &request, config.tag_header.as_deref()),
            None => open(addr).and_then(|stream| {
                exchange(
                    connection.insert(stream),
                    &request,
                    config.tag_header.as_deref(),
                )
            }),
        };
        let sample = match result {
            Ok(response) => {
                if response.close {
                    connection = None;
                }
                Sample {
                    at: started.elapsed(),
                    outcome: Outcome::Status(response.status),
                    tag: response.tag,
                }
            }
            Err(err) => {
                connection = None;
                Sample {
                    at: started.elapsed(),
                    outcome: Outcome::Failed(err.to_string()),
                    tag: None,
                }
            }
        };
        let failed = !matches!(sample.outcome, Outcome::Status(_));
        shared.samples().push(sample);
        shared.changed.notify_all();
        match config.pace {
            Some(pace) => thread::sleep(pace),
            // Do not spin on a refused port.
            None if failed => thread::sleep(Duration::from_millis(1)),
            None => {}
        }
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
#[derive(Debug)]
struct Response {
    status: u16,
    close: bool,
    tag: Option<String>,
}

fn exchange(
    stream: &mut BufReader<TcpStream>,
    request: &str,
    tag_header: Option<&str>,
) -> io::Result<Response> {
    stream.get_mut().write_all(request.as_bytes())?;
    let status_line = line(stream)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("status line {status_line:?}")))?;
    let (mut length, mut close, mut tag) = (0usize, false, None);
    loop {
        let header = line(stream)?;
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(invalid(format!("header {header:?}")));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = value
                    .parse()
                    .map_err(|_| invalid(format!("length {value:?}")))?;
            }
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ if Some(name.as_str()) == tag_header => tag = Some(value.to_owned()),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok(Response { status, close, tag })
}

fn line<S: Read>(stream: &mut BufReader<S>) -> io::Result<String> {
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
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

/// `GET path` on a new connection: the status and the body. For readiness checks.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    http_exchange(open(addr)?.into_inner(), "GET", path, None)
}

/// One request with `Connection: close` on `stream` (TCP or a Unix socket, with its
/// timeouts set), with an optional JSON body: the status and the whole response body.
pub fn http_exchange<S: Read + Write>(
    mut stream: S,
    method: &str,
    path: &str,
    json: Option<&str>,
) -> io::Result<(u16, String)> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: check\r\nConnection: close\r\n");
    if let Some(body) = json {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("\r\n");
    }
    stream.write_all(request.as_bytes())?;
    let mut stream = BufReader::new(stream);
    let status_line = line(&mut stream)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("status line {status_line:?}")))?;
    while !line(&mut stream)?.is_empty() {}
    let mut body = String::new();
    stream.read_to_string(&mut body)?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A server that answers `count` requests on each connection, the last with
    /// `Connection: close`, tagging each with `x-n`.
    fn server(count: usize) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    for n in 1..=count {
                        loop {
                            let mut l = String::new();
                            if reader.read_line(&mut l).unwrap_or(0) == 0 {
                                return;
                            }
                            if l == "\r\n" {
                                break;
                            }
                        }
                        let close = if n == count {
                            "Connection: close\r\n"
                        } else {
                            ""
                        };
                        let reply = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-n: {n}\r\n{close}\r\nok\n"
                        );
                        let _ = reader.get_mut().write_all(reply.as_bytes());
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn stops_at_max_requests_and_reconnects_after_close() {
        let mut config = LoadConfig::new(2, "/");
        config.max_requests = 50;
        config.tag_header = Some("x-n".into());
        let load = KeepAliveLoad::start(server(3), config);
        assert!(load.wait_until(Duration::from_secs(10), |s| s.len() == 50));
        let samples = load.stop();
        assert_eq!(samples.len(), 50);
        assert!(samples.iter().all(Sample::is_ok), "{samples:?}");
        let tags: Vec<_> = samples.iter().filter_map(|s| s.tag.as_deref()).collect();
        assert!(tags.contains(&"3") && tags.contains(&"1"), "{tags:?}");
    }

    #[test]
    fn a_refused_connection_is_a_failed_request() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = LoadConfig::new(1, "/");
        config.max_requests = 3;
        let samples = KeepAliveLoad::start(addr, config);
        assert!(samples.wait_until(Duration::from_secs(10), |s| s.len() == 3));
        assert!(samples.stop().iter().all(|s| !s.is_ok()));
    }
}
