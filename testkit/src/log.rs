//! [`LineLog`]: every line some processes print, collected as it arrives, and a way to
//! wait for the line that says something happened (`worker listening`, `reload
//! complete`) without sleeping.
//!
//! Lines are numbered from 0 in the order they were read. A caller keeps a mark (an
//! index) and asks for the first line at the mark or later that contains a needle, so two
//! waits never see the same line unless asked to.

use std::io::{BufRead, BufReader, Read};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How many lines of the log an error shows.
const TAIL_LINES: usize = 40;

/// One line and the instant it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Its index in the log.
    pub index: usize,
    /// When the reader thread read it.
    pub at: Instant,
    /// The line without its line ending.
    pub text: String,
}

/// Why [`LineLog::wait_for`] found no line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// No such line arrived in time.
    #[error(
        "no line with {needle:?} from line {from} on within {timeout:?}; the log ends:\n{tail}"
    )]
    Timeout {
        /// What was looked for.
        needle: String,
        /// The first index looked at.
        from: usize,
        /// How long the wait took.
        timeout: Duration,
        /// The last lines of the log.
        tail: String,
    },
    /// Every stream reached its end (the processes exited) before such a line.
    #[error("the log ended without a line with {needle:?} from line {from} on; it ends:\n{tail}")]
    Ended {
        /// What was looked for.
        needle: String,
        /// The first index looked at.
        from: usize,
        /// The last lines of the log.
        tail: String,
    },
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<Line>,
    /// Streams still being read.
    open: usize,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// The lines of one or more streams (a child's stdout and stderr), each read by a thread.
/// Clones share the log.
#[derive(Debug, Clone, Default)]
pub struct LineLog {
    shared: Arc<Shared>,
}

impl LineLog {
    /// An empty log with no stream; add streams with [`LineLog::collect`].
    pub fn new() -> Self {
        Self::default()
    }

    /// A log of one stream.
    pub fn of(stream: impl Read + Send + 'static) -> Self {
        let log = Self::new();
        log.collect(stream);
        log
    }

    /// Reads `stream` line by line into the log, in a thread, until its end.
    pub fn collect(&self, stream: impl Read + Send + 'static) {
        self.state().open += 1;
        let shared = Arc::clone(&self.shared);
        let log = Self { shared };
        thread::spawn(move || {
            for text in BufReader::new(stream).lines().map_while(Result::ok) {
                let at = Instant::now();
                let mut state = log.state();
                let index = state.lines.len();
                state.lines.push(Line { index, at, text });
                drop(state);
                log.shared.changed.notify_all();
            }
            log.state().open -= 1;
            log.shared.changed.notify_all();
        });
    }

    /// The state, also after a thread panicked while holding it.
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The number of lines so far: where to start looking for what happens next.
    pub fn mark(&self) -> usize {
        self.state().lines.len()
    }

    /// The texts of the lines from index `from` on.
    pub fn lines_from(&self, from: usize) -> Vec<String> {
        let state = self.state();
        let lines = state.lines.get(from..).unwrap_or_default();
        lines.iter().map(|l| l.text.clone()).collect()
    }

    /// The last `count` lines, joined with newlines, for error messages.
    pub fn tail(&self, count: usize) -> String {
        tail(&self.state(), count)
    }

    /// Waits for a new line or a stream's end, for at most `left`.
    fn wait_change<'a>(
        &'a self,
        state: MutexGuard<'a, State>,
        left: Duration,
    ) -> MutexGuard<'a, State> {
        self.shared
            .changed
            .wait_timeout(state, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }

    /// Waits until every stream has reached its end (all its lines are in the log), for at
    /// most `timeout`; returns whether they all did.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while state.open > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self.wait_change(state, left);
        }
        true
    }

    /// Waits up to `timeout` for the first line at index `from` or later that contains
    /// `needle`. Fails at the deadline, or once every stream has ended without one.
    pub fn wait_for(&self, from: usize, needle: &str, timeout: Duration) -> Result<Line, LogError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            let lines = state.lines.get(from..).unwrap_or_default();
            if let Some(line) = lines.iter().find(|l| l.text.contains(needle)) {
                return Ok(line.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if state.open == 0 || left.is_zero() {
                let (needle, tail) = (needle.to_owned(), tail(&state, TAIL_LINES));
                return Err(if state.open == 0 {
                    LogError::Ended { needle, from, tail }
                } else {
                    LogError::Timeout {
                        needle,
                        from,
                        timeout,
                        tail,
                    }
                });
            }
            state = self.wait_change(state, left);
        }
    }
}

fn tail(state: &State, count: usize) -> String {
    let start = state.lines.len().saturating_sub(count);
    let texts: Vec<&str> = state.lines[start..]
        .iter()
        .map(|l| l.text.as_str())
        .collect();
    texts.join("\n")
}

/// Checks a primary's log after a start with `LISTEN_FDS` = `counted` of which only the
/// first `passed` (from fd 3) were open: exactly `passed` sockets adopted, and the rest of
/// the count reported as not open, in one warning.
#[track_caller]
pub fn assert_listen_fds_log(lines: &[String], passed: usize, counted: usize) {
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("adopted an inherited listening socket"), passed);
    let not_open: Vec<usize> = (3 + passed..3 + counted).collect();
    let warning =
        format!("LISTEN_FDS counts descriptors that are not open; ignored fds={not_open:?}");
    assert_eq!(count(&warning), 1, "{lines:#?}");
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn wait_closed_returns_once_every_stream_has_ended_with_all_its_lines() {
        let log = LineLog::of(&b"one\ntwo\n"[..]);
        log.collect(&b"three\n"[..]);
        assert!(log.wait_closed(Duration::from_secs(10)));
        assert_eq!(log.lines_from(0).len(), 3);
    }

    #[test]
    fn finds_lines_from_a_mark_on() {
        let log = LineLog::of(&b"worker started id=1\nworker listening\nworker started id=2\n"[..]);
        let first = log.wait_for(0, "started", WAIT).unwrap();
        assert_eq!(
            (first.index, first.text.as_str()),
            (0, "worker started id=1")
        );
        let second = log.wait_for(first.index + 1, "started", WAIT).unwrap();
        assert_eq!(second.index, 2);
        assert_eq!(
            log.lines_from(1),
            ["worker listening", "worker started id=2"]
        );
        assert_eq!(log.tail(1), "worker started id=2");
    }

    #[test]
    fn the_end_of_every_stream_ends_the_wait() {
        let log = LineLog::of(&b"one\n"[..]);
        log.collect(&b"two\n"[..]);
        let err = log.wait_for(0, "three", WAIT).unwrap_err();
        assert!(matches!(err, LogError::Ended { .. }), "{err}");
        assert_eq!(log.mark(), 2);
    }

    #[test]
    fn a_quiet_stream_times_out_and_a_later_line_wakes_the_wait() {
        let (mut ours, theirs) = UnixStream::pair().unwrap();
        let log = LineLog::of(theirs);
        let err = log
            .wait_for(0, "ready", Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(err, LogError::Timeout { .. }), "{err}");
        let waiter = thread::spawn({
            let log = log.clone();
            move || log.wait_for(0, "ready", WAIT)
        });
        ours.write_all(b"not yet\nready now\n").unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().text, "ready now");
    }
}
