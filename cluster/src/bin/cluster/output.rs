//! The command's output: worker lines and the primary's own log lines go through a bounded
//! queue per stream, written by a thread of its own, so a stream nobody reads (a paused
//! terminal, a stuck log shipper, a full pipe) never blocks the primary's loop.
//!
//! Policy when a queue is full ([`QUEUE_BYTES`]): the new line is dropped and counted; once
//! a line fits again (the stream moved), `cluster: dropped N lines of worker output` (and
//! `N lines of the primary's log`) is written where the lines went missing, and also when
//! the writer empties its queue with drops still unreported.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How many bytes of lines may wait for one stream; past it new lines are dropped.
pub(crate) const QUEUE_BYTES: usize = 1 << 20;

/// Whose line it is, for the count of what was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A worker's output line.
    Worker,
    /// The primary's own message or log line.
    Log,
}

#[derive(Debug, Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    dropped_worker: u64,
    dropped_log: u64,
    /// The writer is in a write (or about to be): the queue is not yet written out.
    writing: bool,
    /// No more lines come: the writer ends once the queue is written.
    closed: bool,
}

impl Queue {
    /// Takes the count of dropped lines as a notice, if there is one.
    fn take_notice(&mut self) -> Option<Vec<u8>> {
        let (worker, log) = (self.dropped_worker, self.dropped_log);
        if worker == 0 && log == 0 {
            return None;
        }
        (self.dropped_worker, self.dropped_log) = (0, 0);
        let lines = |n: u64| if n == 1 { "line" } else { "lines" };
        let mut parts = Vec::new();
        if worker > 0 {
            parts.push(format!("{worker} {} of worker output", lines(worker)));
        }
        if log > 0 {
            parts.push(format!("{log} {} of the primary's log", lines(log)));
        }
        Some(
            format!(
                "cluster: dropped {} (the stream was not read)\n",
                parts.join(" and ")
            )
            .into(),
        )
    }

    fn push(&mut self, line: Vec<u8>) {
        self.bytes += line.len();
        self.lines.push_back(line);
    }
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued (for the writer) and when the queue empties.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One output stream (stdout or stderr) and its writer thread.
#[derive(Debug, Clone)]
pub(crate) struct Sink {
    shared: Arc<Shared>,
}

impl Sink {
    /// A sink that writes to `out` (the process's stdout or stderr: no descriptor is
    /// opened) from a thread of its own.
    pub(crate) fn new(out: impl Write + Send + 'static, name: &str) -> Sink {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        let spawned = std::thread::Builder::new()
            .name(format!("cluster-{name}"))
            .spawn(move || write_lines(&writer, out));
        if spawned.is_err() {
            // No thread, no writer: everything would be dropped and counted; say so once
            // where it can still be said without blocking for long.
            let _ = writeln!(std::io::stderr(), "cluster: cannot start the {name} writer");
        }
        Sink { shared }
    }

    /// Queues `text` and a newline, or drops and counts it if the queue is full. Never
    /// blocks for longer than it takes to take the lock.
    pub(crate) fn line(&self, kind: Kind, text: &str) {
        let mut line = Vec::with_capacity(text.len() + 1);
        line.extend_from_slice(text.as_bytes());
        line.push(b'\n');
        self.push(kind, line);
    }

    fn push(&self, kind: Kind, line: Vec<u8>) {
        let mut queue = self.shared.lock();
        if queue.bytes + line.len() > QUEUE_BYTES {
            match kind {
                Kind::Worker => queue.dropped_worker += 1,
                Kind::Log => queue.dropped_log += 1,
            }
            return;
        }
        if let Some(notice) = queue.take_notice() {
            queue.push(notice);
        }
        queue.push(line);
        drop(queue);
        self.shared.changed.notify_all();
    }

    /// Waits until everything queued is written, at most `wait` (a stream still stalled
    /// then keeps the rest), and lets the writer end once it is.
    pub(crate) fn finish(&self, wait: Duration) {
        let deadline = Instant::now() + wait;
        let mut queue = self.shared.lock();
        queue.closed = true;
        self.shared.changed.notify_all();
        while !queue.lines.is_empty() || queue.writing {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return;
            };
            queue = match self.shared.changed.wait_timeout(queue, left) {
                Ok((queue, _)) => queue,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// A writer for `tracing`: each log event becomes one line of this sink.
    pub(crate) fn log_writer(&self) -> LogWriter {
        LogWriter {
            sink: self.clone(),
            buffer: Vec::new(),
        }
    }
}

/// The writer thread: takes lines in order and writes each, blocking only itself.
fn write_lines(shared: &Shared, out: impl Write) {
    let mut out = Some(out);
    let mut queue = shared.lock();
    loop {
        let line = match queue.lines.pop_front() {
            Some(line) => {
                queue.bytes -= line.len();
                line
            }
            None => match queue.take_notice() {
                Some(notice) => notice,
                None => {
                    queue.writing = false;
                    shared.changed.notify_all();
                    if queue.closed {
                        return;
                    }
                    queue = match shared.changed.wait(queue) {
                        Ok(queue) => queue,
                        Err(poisoned) => poisoned.into_inner(),
                    };
                    continue;
                }
            },
        };
        queue.writing = true;
        drop(queue);
        if let Some(stream) = out.as_mut()
            && stream
                .write_all(&line)
                .and_then(|()| stream.flush())
                .is_err()
        {
            // The reader is gone (EPIPE) or the descriptor broke: discard from now on.
            out = None;
        }
        queue = shared.lock();
    }
}

/// A `tracing` writer (see [`Sink::log_writer`]): buffers one event and queues it on drop.
#[derive(Debug)]
pub(crate) struct LogWriter {
    sink: Sink,
    buffer: Vec<u8>,
}

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        if !self.buffer.is_empty() {
            let line = std::mem::take(&mut self.buffer);
            self.sink.push(Kind::Log, line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A sink on a pipe nobody reads takes every line at once (none blocks), keeps what
    /// its bound holds, drops and counts the rest, and reports the count once the stream
    /// moves again, after the lines that were kept.
    #[test]
    fn a_stalled_stream_drops_and_counts_and_reports_once_it_moves() {
        let (mut read, write) = std::io::pipe().expect("pipe");
        let sink = Sink::new(write, "test");
        let line = "x".repeat(999);
        // Far more than the pipe (64 KiB) and the queue hold together.
        let count = 4 * QUEUE_BYTES / 1000;
        for _ in 0..count {
            sink.line(Kind::Worker, &line);
        }
        // Small enough to fit where the long ones did not: it comes after the notice.
        sink.line(Kind::Log, "the last line");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            read.read_to_string(&mut text).expect("read");
            text
        });
        sink.finish(Duration::from_secs(60));
        let text = reader.join().expect("reader");
        // While the loop above ran, the writer filled the pipe: a line it took made room
        // for one more, so several stretches may have gone missing, each with its notice.
        let (mut kept, mut dropped, mut notices) = (0, 0, 0);
        let mut lines = text.lines().peekable();
        while let Some(got) = lines.next_if(|l| *l != "the last line") {
            if got == line {
                kept += 1;
                continue;
            }
            let number = got
                .strip_prefix("cluster: dropped ")
                .and_then(|rest| {
                    rest.strip_suffix(" lines of worker output (the stream was not read)")
                })
                .unwrap_or_else(|| panic!("a notice: {got:?}"));
            dropped += number.parse::<usize>().expect("a count");
            notices += 1;
        }
        assert_eq!(
            lines.collect::<Vec<_>>(),
            ["the last line"],
            "last, after the notices"
        );
        assert!(
            notices >= 1 && dropped > 0,
            "{notices} notices, {dropped} dropped"
        );
        assert_eq!(kept + dropped, count, "every line kept or counted");
        assert!(
            kept >= QUEUE_BYTES / 1000,
            "the queue's bound was kept: {kept}"
        );
    }

    /// Lines queued after a stall come after the notice of what the stall cost.
    #[test]
    fn the_notice_stands_where_the_lines_went_missing() {
        let mut queue = Queue {
            dropped_worker: 3,
            ..Queue::default()
        };
        let notice = queue.take_notice().expect("a notice");
        assert_eq!(
            String::from_utf8(notice).expect("utf-8"),
            "cluster: dropped 3 lines of worker output (the stream was not read)\n"
        );
        assert_eq!(queue.take_notice(), None, "reported once");
    }
}
