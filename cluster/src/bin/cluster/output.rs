//! The command's output: worker lines and the primary's own log lines go through a bounded
//! queue per stream, written by a thread of its own, so a stream nobody reads (a paused
//! terminal, a stuck log shipper, a full pipe) never blocks the primary's loop.
//!
//! Policy when a queue is full ([`QUEUE_BYTES`]): the new line is dropped and counted; once
//! a line fits again (the stream moved), `cluster: dropped N lines of worker output` (and
//! `N lines of the primary's log`) is written where the lines went missing, and also when
//! the writer empties its queue with drops still unreported.
//!
//! With `--log-file`, stdout's and stderr's sinks are [redirected](Sink::redirect) to a
//! third sink whose writer writes the file (`logfile.rs`): one queue, so the file has the
//! lines of both streams in the order they were queued. A [reopen](Sink::reopen) is not a
//! queued line but a count beside the queue (so a full queue never drops it): the writer
//! compares it with the count it has acted on each time it takes the lock, before it takes
//! the next line, so it reopens between two lines and every line queued after the request
//! goes to the new file.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::logfile::LogFile;

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
    /// How many reopens were asked for: the writer reopens its file when this differs
    /// from the count it has acted on (see [`Sink::reopen`]).
    reopens: u64,
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

    /// Queues `line` (after the notice of what was dropped before it), or drops and
    /// counts it if it does not fit; whether it was queued.
    fn offer(&mut self, kind: Kind, line: Vec<u8>) -> bool {
        if self.bytes + line.len() > QUEUE_BYTES {
            match kind {
                Kind::Worker => self.dropped_worker += 1,
                Kind::Log => self.dropped_log += 1,
            }
            return false;
        }
        if let Some(notice) = self.take_notice() {
            self.push(notice);
        }
        self.push(line);
        true
    }
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a line is queued or a reopen asked for (for the writer), and when
    /// the queue empties.
    changed: Condvar,
    /// Whether the writer writes a log file (which a reopen reopens).
    file: bool,
    /// The sink this one's lines go to instead (the log file's), once redirected.
    redirect: OnceLock<Sink>,
    /// Where dropped lines are counted too, once set (the primary's metrics).
    dropped: OnceLock<Arc<AtomicU64>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues `line` on this sink's own queue, never redirected.
    fn enqueue(&self, kind: Kind, line: Vec<u8>) {
        if self.lock().offer(kind, line) {
            self.changed.notify_all();
        } else if let Some(dropped) = self.dropped.get() {
            dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Where a writer thread writes.
enum Out {
    /// The process's stdout or stderr.
    Stream(Box<dyn Write + Send>),
    /// The log file; what goes wrong with it is also said on `terminal` (stderr's sink,
    /// whose own queue still reaches the terminal).
    File {
        file: LogFile,
        terminal: Weak<Shared>,
    },
    /// The stream broke (EPIPE, a closed descriptor): lines are discarded.
    Gone,
}

impl Out {
    /// Writes one line, in one write(2) as far as the stream takes it.
    fn write(&mut self, line: &[u8]) {
        match self {
            Out::Stream(stream) => {
                if stream
                    .write_all(line)
                    .and_then(|()| stream.flush())
                    .is_err()
                {
                    // The reader is gone (EPIPE) or the descriptor broke: discard from now on.
                    *self = Out::Gone;
                }
            }
            Out::File { file, terminal } => {
                if let Err(e) = file.write_line(line) {
                    let message = format!(
                        "cluster: cannot write to the log file {}: {e}; lines are lost until \
                         it takes them again",
                        file.path().display()
                    );
                    say(terminal, &message);
                }
            }
            Out::Gone => {}
        }
    }

    /// Reopens the log file; a failure is said once, in the file it keeps and on the
    /// terminal.
    fn reopen(&mut self) {
        let Out::File { file, terminal } = self else {
            return;
        };
        if let Err(e) = file.reopen() {
            let message = format!(
                "cluster: cannot reopen the log file {}: {e}; still writing to the file it had \
                 open",
                file.path().display()
            );
            let _ = file.write_line(format!("{message}\n").as_bytes());
            say(terminal, &message);
        }
    }
}

/// Queues `message` on the terminal's own queue, if it is still there.
fn say(terminal: &Weak<Shared>, message: &str) {
    if let Some(terminal) = terminal.upgrade() {
        terminal.enqueue(Kind::Log, format!("{message}\n").into_bytes());
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
        Sink::start(Out::Stream(Box::new(out)), name)
    }

    /// A sink that writes the log file at `path` (opened here, by the caller's thread),
    /// and says what goes wrong with it on `terminal` too.
    pub(crate) fn log_file(path: &Path, terminal: &Sink) -> std::io::Result<Sink> {
        let file = LogFile::open(path)?;
        let terminal = Arc::downgrade(&terminal.shared);
        Ok(Sink::start(Out::File { file, terminal }, "log-file"))
    }

    fn start(out: Out, name: &str) -> Sink {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            file: matches!(out, Out::File { .. }),
            redirect: OnceLock::new(),
            dropped: OnceLock::new(),
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

    /// Queues `text` here and, when this sink is redirected, where it is redirected to:
    /// for the error that ends the command, which the terminal shows with a log file too.
    pub(crate) fn line_and_terminal(&self, kind: Kind, text: &str) {
        let line = format!("{text}\n").into_bytes();
        if let Some(to) = self.shared.redirect.get() {
            to.shared.enqueue(kind, line.clone());
        }
        self.shared.enqueue(kind, line);
    }

    fn push(&self, kind: Kind, line: Vec<u8>) {
        self.target().shared.enqueue(kind, line);
    }

    /// The sink lines go to: this one, or the one it is redirected to.
    fn target(&self) -> &Sink {
        self.shared.redirect.get().unwrap_or(self)
    }

    /// Sends every line queued from now on to `to` (the log file's sink) instead; lines
    /// already queued here are still written here. Once only: a later call is ignored.
    pub(crate) fn redirect(&self, to: &Sink) {
        let _ = self.shared.redirect.set(to.clone());
    }

    /// Counts every line this sink (and the sink it is redirected to) drops from now on
    /// in `dropped` too, beside its notices. Once only: a later call is ignored.
    pub(crate) fn count_drops(&self, dropped: Arc<AtomicU64>) {
        if let Some(to) = self.shared.redirect.get() {
            let _ = to.shared.dropped.set(Arc::clone(&dropped));
        }
        let _ = self.shared.dropped.set(dropped);
    }

    /// Asks the log file's writer to reopen it between two lines: every line queued after
    /// this call goes to the reopened file. Never blocks but on the lock, and is never
    /// dropped, however full the queue. False when there is no log file to reopen.
    pub(crate) fn reopen(&self) -> bool {
        let target = self.target();
        if !target.shared.file {
            return false;
        }
        target.shared.lock().reopens += 1;
        target.shared.changed.notify_all();
        true
    }

    /// Waits until everything queued is written, at most `wait` (a stream still stalled
    /// then keeps the rest), and lets the writer end once it is. The same for the sink
    /// this one is redirected to.
    pub(crate) fn finish(&self, wait: Duration) {
        self.finish_own(wait);
        if let Some(to) = self.shared.redirect.get() {
            to.finish_own(wait);
        }
    }

    fn finish_own(&self, wait: Duration) {
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

/// The writer thread: takes lines in order and writes each, blocking only itself; reopens
/// its file between two lines when asked.
fn write_lines(shared: &Shared, mut out: Out) {
    let mut reopened = 0;
    let mut queue = shared.lock();
    loop {
        if queue.reopens != reopened {
            // Under the same lock as the line taken next: any line queued after the
            // request is written after the reopen.
            reopened = queue.reopens;
            queue.writing = true;
            drop(queue);
            out.reopen();
            queue = shared.lock();
            continue;
        }
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
        out.write(&line);
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
    /// its bound holds, drops and counts the rest (in the metrics' counter too), and
    /// reports the count once the stream moves again, after the lines that were kept.
    #[test]
    fn a_stalled_stream_drops_and_counts_and_reports_once_it_moves() {
        let (mut read, write) = std::io::pipe().expect("pipe");
        let sink = Sink::new(write, "test");
        let counted = Arc::new(AtomicU64::new(0));
        sink.count_drops(Arc::clone(&counted));
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
        assert_eq!(
            counted.load(Ordering::Relaxed),
            dropped as u64,
            "the metrics' count is the notices' count"
        );
        assert!(
            kept >= QUEUE_BYTES / 1000,
            "the queue's bound was kept: {kept}"
        );
    }

    /// Waits until the writer has written everything queued so far (a minute at most).
    fn written(sink: &Sink) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut queue = sink.shared.lock();
        while !queue.lines.is_empty() || queue.writing {
            let left = deadline.checked_duration_since(Instant::now());
            let left = left.expect("the writer wrote the queue out within a minute");
            queue = sink
                .shared
                .changed
                .wait_timeout(queue, left)
                .expect("lock")
                .0;
        }
    }

    /// A reopen asked for while the log file stalls and the queue is full is not dropped:
    /// the writer finishes the line it is in, reopens, and writes the rest (and every
    /// later line) to the new file, which begins with the reopen's line. No line is lost
    /// or cut: each was written whole to one file or dropped and counted.
    #[test]
    fn a_reopen_with_a_full_queue_happens_between_two_lines() {
        let dir = testkit::TempDir::new("full-queue");
        // A FIFO stands for a log file on a disk that stalls: nobody reads it yet.
        let path = dir.path().join("cluster.log");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .expect("mkfifo");
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let reader = std::thread::spawn({
            let path = path.clone();
            move || {
                let mut fifo = std::fs::File::open(path).expect("open the FIFO");
                wait.recv().expect("go");
                let mut text = String::new();
                fifo.read_to_string(&mut text).expect("read");
                text
            }
        });
        let terminal = Sink::new(std::io::sink(), "terminal");
        let sink = Sink::log_file(&path, &terminal).expect("open the log file");
        let count = 4 * QUEUE_BYTES / 1000;
        let line = |n: usize| format!("{n:>6} {}", "x".repeat(992));
        for n in 0..count {
            sink.line(Kind::Worker, &line(n));
        }
        // The writer has written a line (the old file will not be empty) and may be
        // stuck in the next; the queue is then filled up again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let queue = sink.shared.lock();
            let taken = count - queue.dropped_worker as usize - queue.lines.len();
            if taken >= 2 {
                break;
            }
            drop(queue);
            assert!(Instant::now() < deadline, "the writer took no line");
            std::thread::yield_now();
        }
        for n in count..2 * count {
            sink.line(Kind::Worker, &line(n));
        }
        assert!(
            sink.shared.lock().bytes + 1000 > QUEUE_BYTES,
            "the queue is full"
        );
        let rotated = dir.path().join("cluster.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        assert!(sink.reopen(), "a log file reopens");
        // The old file moves again; its writer closes it at the reopen (the reader's end).
        go.send(()).expect("go");
        let old = reader.join().expect("reader");
        written(&sink);
        sink.line(Kind::Log, "after the reopen");
        sink.finish(Duration::from_secs(60));

        let new = std::fs::read_to_string(&path).expect("the new file");
        let mut new_lines = new.lines();
        assert_eq!(new_lines.next(), Some(super::super::logfile::REOPENED));
        assert_eq!(new_lines.next_back(), Some("after the reopen"));
        assert!(
            !old.contains("reopen"),
            "nothing of the reopen in the old file"
        );
        assert!(old.ends_with('\n'), "the old file ends with a whole line");
        let (mut numbers, mut dropped) = (Vec::new(), 0);
        for line in old.lines().chain(new_lines) {
            if let Some(rest) = line.strip_prefix("cluster: dropped ") {
                let number = rest.split(' ').next().expect("a count");
                dropped += number.parse::<usize>().expect("a count");
                continue;
            }
            assert_eq!(line.len(), 999, "a whole line: {line:.20}");
            numbers.push(line[..6].trim().parse::<usize>().expect("a number"));
        }
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "in order, once each"
        );
        assert!(
            !old.is_empty() && numbers.len() > old.lines().count(),
            "both files have lines"
        );
        assert_eq!(
            numbers.len() + dropped,
            2 * count,
            "every line written or counted"
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
