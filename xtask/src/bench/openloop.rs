//! An open-loop HTTP/1.1 client: requests go out on a fixed schedule (`rate` per second)
//! whether or not earlier ones were answered, and each latency is measured from the
//! request's *scheduled* time, so a server that stalls is charged for every request that
//! waited behind the stall (the coordinated-omission trap of closed-loop tools such as
//! wrk, which only send when an answer came back).
//!
//! ```text
//!   schedule: t0, t0 + 1/rate, t0 + 2/rate, ...   (slot k at t0 + k/rate)
//!   thread i: take the next slot k, sleep until t0 + k/rate (not at all if late),
//!             send, read the whole response, latency = now - (t0 + k/rate)
//! ```
//!
//! Bounded: `connections` threads, each with at most one request outstanding (its own
//! keep-alive connection, or a new connection per request with `Connection: close`). When
//! every thread is busy the next slots wait and count as late from their scheduled time.
//! A run ends at `duration`; threads still behind the schedule go on for at most
//! [`CATCH_UP`], and slots never sent are recorded with their lateness at the end and
//! counted as `unsent`, never dropped. Each response's `x-worker-pid` header is counted
//! per worker (fairness).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long threads behind the schedule may go on after the run's duration.
const CATCH_UP: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// One paced run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenLoop {
    pub(crate) addr: SocketAddr,
    /// Requests per second.
    pub(crate) rate: f64,
    pub(crate) duration: Duration,
    /// Threads, hence connections and requests outstanding at most.
    pub(crate) connections: usize,
    /// A new connection per request (`Connection: close`) instead of keep-alive.
    pub(crate) close: bool,
}

/// When each request is due: slot `k` at `start + k / rate`, `count` slots in all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    start: Instant,
    interval: Duration,
    count: u64,
}

impl Schedule {
    pub(crate) fn new(start: Instant, rate: f64, duration: Duration) -> Self {
        let rate = rate.max(1.0);
        Self {
            start,
            interval: Duration::from_secs_f64(1.0 / rate),
            count: (rate * duration.as_secs_f64()).round() as u64,
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// When slot `k` is due.
    pub(crate) fn at(&self, k: u64) -> Instant {
        // Nanoseconds in u128: exact for any run this client makes.
        let nanos = self.interval.as_nanos() * u128::from(k);
        self.start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// What a run measured. `latencies_us` is sorted.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunResult {
    pub(crate) latencies_us: Vec<u64>,
    /// Requests that failed (connect, reset, timeout, not 2xx).
    pub(crate) errors: u64,
    /// Slots never sent (the client could not keep up with the schedule).
    pub(crate) unsent: u64,
    /// Requests answered per `x-worker-pid`.
    pub(crate) by_worker: HashMap<u32, u64>,
    /// From the first slot to the last answer.
    pub(crate) elapsed: Duration,
}

impl RunResult {
    /// The value at quantile `q` (0..=1) by nearest rank; `None` without samples.
    pub(crate) fn percentile_us(&self, q: f64) -> Option<u64> {
        percentile(&self.latencies_us, q)
    }

    /// Answered requests per second.
    pub(crate) fn achieved_rate(&self) -> f64 {
        let answered = self.latencies_us.len() as u64 - self.unsent - self.errors;
        answered as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `q` of the
/// values at or below it.
pub(crate) fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// max/min of the requests each of `workers` answered (a worker that answered none makes
/// it infinite); `None` without workers. Pids not in `workers` are ignored.
pub(crate) fn fairness(by_worker: &HashMap<u32, u64>, workers: &[u32]) -> Option<f64> {
    let counts: Vec<u64> = workers
        .iter()
        .map(|pid| by_worker.get(pid).copied().unwrap_or(0))
        .collect();
    let max = *counts.iter().max()?;
    let min = *counts.iter().min()?;
    Some(if min == 0 {
        f64::INFINITY
    } else {
        max as f64 / min as f64
    })
}

/// Per thread: latencies, errors, worker counts.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: u64,
    by_worker: HashMap<u32, u64>,
}

/// Runs `run` and returns what it measured.
pub(crate) fn run(config: OpenLoop) -> RunResult {
    let start = Instant::now() + Duration::from_millis(20);
    let schedule = Schedule::new(start, config.rate, config.duration);
    let next = AtomicU64::new(0);
    let hard_end = start + config.duration + CATCH_UP;
    let tallies = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for _ in 0..config.connections.max(1) {
            scope.spawn(|| {
                // Wake-ups as close to the schedule as the kernel allows (the default
                // slack of 50 us would show up in every latency).
                let _ = nix::sys::prctl::set_timerslack(1000);
                let tally = client_thread(&config, &schedule, &next, hard_end);
                tallies
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(tally);
            });
        }
    });
    let end = Instant::now();
    let mut result = RunResult::default();
    for tally in tallies
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        result.latencies_us.extend(tally.latencies_us);
        result.errors += tally.errors;
        for (pid, n) in tally.by_worker {
            *result.by_worker.entry(pid).or_default() += n;
        }
    }
    // Slots never taken: late by at least the time to the end of the run.
    let first_unsent = next.load(Ordering::SeqCst).min(schedule.count());
    for k in first_unsent..schedule.count() {
        result
            .latencies_us
            .push(end.saturating_duration_since(schedule.at(k)).as_micros() as u64);
        result.unsent += 1;
    }
    result.latencies_us.sort_unstable();
    result.elapsed = end.saturating_duration_since(start);
    result
}

fn client_thread(
    config: &OpenLoop,
    schedule: &Schedule,
    next: &AtomicU64,
    hard_end: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    let request: &[u8] = if config.close {
        b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    };
    loop {
        if Instant::now() >= hard_end {
            break;
        }
        let k = next.fetch_add(1, Ordering::SeqCst);
        if k >= schedule.count() {
            break;
        }
        let due = schedule.at(k);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        let outcome = exchange(config.addr, &mut conn, request, &mut buf, config.close);
        let latency = due.elapsed().as_micros() as u64;
        tally.latencies_us.push(latency);
        match outcome {
            Ok(Answer { ok, pid, keep }) => {
                if !ok {
                    tally.errors += 1;
                }
                if let Some(pid) = pid {
                    *tally.by_worker.entry(pid).or_default() += 1;
                }
                if !keep {
                    conn = None;
                }
            }
            Err(_) => {
                tally.errors += 1;
                conn = None;
            }
        }
    }
    tally
}

/// One response, as far as the bench cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// 2xx.
    pub(crate) ok: bool,
    /// The `x-worker-pid` header.
    pub(crate) pid: Option<u32>,
    /// The connection can carry the next request.
    pub(crate) keep: bool,
}

fn exchange(
    addr: SocketAddr,
    conn: &mut Option<TcpStream>,
    request: &[u8],
    buf: &mut Vec<u8>,
    close: bool,
) -> io::Result<Answer> {
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        *conn = Some(stream);
    }
    let stream = conn.as_mut().expect("connected above");
    stream.write_all(request)?;
    buf.clear();
    let mut chunk = [0u8; 2048];
    let (head_end, head) = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break (end + 4, parse_head(&buf[..end])?);
        }
        if buf.len() > 64 * 1024 {
            return Err(io::Error::other("response head too long"));
        }
    };
    let mut body = buf.len() - head_end;
    while body < head.content_length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        body += n;
    }
    Ok(Answer {
        ok: (200..300).contains(&head.status),
        pid: head.pid,
        keep: !close && !head.close,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) status: u16,
    pub(crate) content_length: usize,
    pub(crate) pid: Option<u32>,
    pub(crate) close: bool,
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response head (without its blank line): status, `content-length`,
/// `x-worker-pid`, `connection: close`.
pub(crate) fn parse_head(head: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(head).map_err(|_| io::Error::other("head not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("no status line"))?;
    let mut parsed = Head {
        status,
        content_length: 0,
        pid: None,
        close: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            parsed.content_length = value
                .parse()
                .map_err(|_| io::Error::other("bad content-length"))?;
        } else if name.eq_ignore_ascii_case("x-worker-pid") {
            parsed.pid = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            parsed.close = value.eq_ignore_ascii_case("close");
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spaces_slots_evenly_from_the_start() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 1000.0, Duration::from_secs(2));
        assert_eq!(s.count(), 2000);
        assert_eq!(s.at(0), t0);
        assert_eq!(s.at(1), t0 + Duration::from_millis(1));
        assert_eq!(s.at(1500), t0 + Duration::from_millis(1500));
        let odd = Schedule::new(t0, 3.0, Duration::from_secs(1));
        assert_eq!(odd.count(), 3);
        assert!(odd.at(2) - t0 > Duration::from_millis(666));
    }

    #[track_caller]
    fn check_percentile(values: &[u64], q: f64, expected: Option<u64>) {
        assert_eq!(percentile(values, q), expected, "q={q} of {values:?}");
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let hundred: Vec<u64> = (1..=100).collect();
        check_percentile(&hundred, 0.5, Some(50));
        check_percentile(&hundred, 0.99, Some(99));
        check_percentile(&hundred, 0.999, Some(100));
        check_percentile(&hundred, 1.0, Some(100));
        check_percentile(&hundred, 0.0, Some(1));
        check_percentile(&[7], 0.99, Some(7));
        check_percentile(&[], 0.5, None);
    }

    #[test]
    fn fairness_is_max_over_min_of_the_known_workers() {
        let counts: HashMap<u32, u64> = [(10, 130), (11, 100), (99, 5)].into();
        assert_eq!(fairness(&counts, &[10, 11]), Some(1.3));
        assert_eq!(fairness(&counts, &[10, 11, 12]), Some(f64::INFINITY));
        assert_eq!(fairness(&counts, &[]), None);
    }

    #[test]
    fn parses_the_fields_of_a_response_head() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nX-Worker-Pid: 4242\r\n\
                     Content-Length: 12\r\nConnection: close";
        assert_eq!(
            parse_head(head).unwrap(),
            Head {
                status: 200,
                content_length: 12,
                pid: Some(4242),
                close: true
            }
        );
        let plain = parse_head(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0").unwrap();
        assert_eq!((plain.status, plain.pid, plain.close), (503, None, false));
        assert!(parse_head(b"garbage").is_err());
    }

    #[test]
    fn a_paced_run_against_a_local_server_counts_every_slot() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    let mut pending = Vec::new();
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = find(&pending, b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\nx-worker-pid: 7\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(reply).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let result = run(OpenLoop {
            addr,
            rate: 500.0,
            duration: Duration::from_millis(200),
            connections: 4,
            close: false,
        });
        assert_eq!(result.latencies_us.len(), 100);
        assert_eq!((result.errors, result.unsent), (0, 0));
        assert_eq!(result.by_worker.get(&7), Some(&100));
        assert!(result.latencies_us.windows(2).all(|w| w[0] <= w[1]));
    }
}
