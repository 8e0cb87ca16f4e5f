//! What the command makes of the primary's events: it shows them (through the bounded
//! output sinks) and decides when the cluster cannot serve, so that the command ends
//! with a message instead of running on without a word:
//!
//! - a listen that retrying cannot fix (another program holds the port), whether the
//!   worker then dies or, like an Express app that ignores the error, lives on;
//! - every worker of the first generation exited on its own before it listened (a syntax
//!   error, a missing module, an exit at once), with the last lines of one worker's stderr
//!   (one killed for breaking the protocol does not count: the slots' limit decides);
//! - no worker of the first generation connected to its channel within the connect
//!   timeout (a program that speaks no cluster protocol);
//! - every slot given up after a crash loop.
//!
//! With `--log-format json` the event lines are JSON objects instead, one per event, for
//! programs that check what the primary did (`cargo xtask chaos`):
//! `{"event":"fork","id":3,"pid":4250,"primary":4242,"ts_ms":1718000000123}` (`ts_ms` the
//! wall clock in milliseconds, `primary` this process; `event` one of `fork`, `online`,
//! `listening`, `ready`, `disconnect`, `exit` (with `status` and `asked`), `going-down`,
//! `misbehaved`, `slot-failed`, `reload-failed`, `not-connected`, `listen-failed`,
//! `other`). `listening on ADDRESS` on stdout and worker output lines stay as they are.

use std::collections::{HashMap, HashSet, VecDeque};

use cluster::{Event, ExitCause, OutputStream, SlotFailure, WorkerId};

use super::output::{Kind, Sink};

/// How many stderr lines are kept per worker for a start-up failure's report (enough for
/// a Node error: its message and its ten stack frames).
const TAIL_LINES: usize = 20;
/// How much of one such line is kept.
const TAIL_LINE_BYTES: usize = 500;
/// How many workers' tails are kept at once (the oldest go first).
const TAILS: usize = 16;

/// How the command writes the primary's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// `cluster: worker 3 started (pid 4250)` lines.
    Text,
    /// One JSON object per event (see the module docs).
    Json,
}

/// Why the command ends.
#[derive(Debug, Clone)]
pub(crate) enum Fatal {
    /// A listen that retrying cannot fix.
    Listen(String),
    /// Every first-generation worker exited before it listened; the last one's id.
    ExitedBeforeListening { last: WorkerId, status: String },
    /// No first-generation worker connected to its channel.
    NeverConnected { waited: std::time::Duration },
    /// Every slot was given up.
    CrashLoop(String),
}

/// A first-generation worker's start.
#[derive(Debug, Default)]
struct Start {
    online: bool,
    listened: bool,
    /// Killed by the primary for breaking the protocol: not a failure to start (a
    /// crash loop of such workers ends the command by the slots' limit).
    misbehaved: bool,
    /// Gone without having listened, or never connected: this worker failed to start.
    failed: bool,
}

/// The command's view of the cluster.
#[derive(Debug)]
pub(crate) struct Watch {
    name: String,
    program: String,
    workers: usize,
    stdout: Sink,
    stderr: Sink,
    format: LogFormat,
    announced: HashSet<String>,
    pids: HashMap<WorkerId, u32>,
    /// The workers forked first, one per slot, and how their start went.
    first: HashMap<WorkerId, Start>,
    failed_slots: usize,
    /// The last stderr lines of recent workers, oldest worker first.
    tails: VecDeque<(WorkerId, VecDeque<String>)>,
}

impl Watch {
    pub(crate) fn new(
        name: String,
        program: String,
        workers: usize,
        stdout: Sink,
        stderr: Sink,
    ) -> Self {
        Watch {
            name,
            program,
            workers,
            stdout,
            stderr,
            format: LogFormat::Text,
            announced: HashSet::new(),
            pids: HashMap::new(),
            first: HashMap::new(),
            failed_slots: 0,
            tails: VecDeque::new(),
        }
    }

    /// Writes the events in `format`.
    pub(crate) fn log_format(mut self, format: LogFormat) -> Self {
        self.format = format;
        self
    }

    /// PROGRAM as shown in messages.
    pub(crate) fn program(&self) -> &str {
        &self.program
    }

    /// Shows events until one says the cluster cannot serve; `None` once they end.
    pub(crate) async fn until_fatal(&mut self, events: &mut cluster::Events) -> Option<Fatal> {
        while let Some(event) = events.recv().await {
            self.show(&event);
            if let Some(fatal) = self.judge(&event) {
                return Some(fatal);
            }
        }
        None
    }

    /// An event's text line (none with `--log-format json`, which writes its own).
    fn say(&self, line: &str) {
        if self.format == LogFormat::Text {
            self.stderr.line(Kind::Log, line);
        }
    }

    /// Shows one event: output lines with their worker's prefix, the rest as `cluster:`
    /// lines on stderr.
    pub(crate) fn show(&mut self, event: &Event) {
        if self.format == LogFormat::Json
            && let Some(line) = event.json_line()
        {
            self.stderr.line(Kind::Log, &line);
        }
        let name = &self.name;
        match event {
            Event::Output { id, stream, line } => {
                let text = format!("{name} {id} | {line}");
                match stream {
                    OutputStream::Stdout => self.stdout.line(Kind::Worker, &text),
                    _ => {
                        self.stderr.line(Kind::Worker, &text);
                        self.remember(*id, line);
                    }
                }
            }
            Event::Fork { id, pid } => {
                self.pids.insert(*id, *pid);
                if self.first.len() < self.workers && !self.first.contains_key(id) {
                    self.first.insert(*id, Start::default());
                }
                self.say(&format!("cluster: worker {id} started (pid {pid})"));
            }
            Event::Online { id } => {
                if let Some(start) = self.first.get_mut(id) {
                    start.online = true;
                }
            }
            Event::Listening { id, address, .. } => {
                if let Some(start) = self.first.get_mut(id) {
                    start.listened = true;
                }
                if self.announced.insert(address.to_string()) {
                    self.stdout
                        .line(Kind::Log, &format!("listening on {address}"));
                }
                self.say(&format!("cluster: worker {id} is listening on {address}"));
            }
            Event::Ready { id } => self.say(&format!("cluster: worker {id} is ready")),
            Event::ListenFailed { id, key, errno, .. } => {
                let error = std::io::Error::from_raw_os_error(*errno);
                self.say(&format!(
                    "cluster: worker {id} cannot listen on {}:{}: {error}",
                    key.address(),
                    key.port()
                ));
            }
            Event::NotConnected { id, waited } => {
                let pid = self.pids.get(id).copied().unwrap_or_default();
                self.say(&format!(
                    "cluster: worker {id} (pid {pid}) has not connected to the cluster channel \
                     after {}s: is {} a Node script or a program built on the cluster crate?",
                    waited.as_secs_f64(),
                    self.program
                ));
            }
            Event::Exit {
                id, status, cause, ..
            } => self.say(&format!(
                "cluster: worker {id} exited ({status}{})",
                match cause {
                    ExitCause::Asked => ", asked to stop".to_owned(),
                    ExitCause::MemoryLimit => ", replaced: memory limit".to_owned(),
                    ExitCause::Disconnect => ", disconnected itself".to_owned(),
                    _ => String::new(),
                }
            )),
            Event::MemoryLimit {
                id,
                slot,
                rss_bytes,
                limit,
            } => self.say(&format!(
                "cluster: worker {id} (slot {slot}) uses {} MiB, above the limit of {} MiB: \
                 replacing it",
                rss_bytes >> 20,
                limit >> 20
            )),
            Event::ReloadEnded { report } => {
                let failed = report.failed.len();
                self.say(&format!(
                    "cluster: reload {} in {:.1}s: {} replaced, {failed} kept their old worker{}",
                    if report.succeeded() { "done" } else { "failed" },
                    report.took.as_secs_f64(),
                    report.replaced.len(),
                    if report.interrupted {
                        " (cut short by a stop)"
                    } else {
                        ""
                    }
                ));
            }
            Event::GoingDown { id, reason } => {
                self.say(&format!("cluster: worker {id} going down: {reason}"))
            }
            Event::Misbehaved { id, reason } => {
                if let Some(start) = self.first.get_mut(id) {
                    start.misbehaved = true;
                }
                self.say(&format!("cluster: worker {id} misbehaved: {reason}"))
            }
            Event::SlotFailed { slot, id, cause } => self.say(&format!(
                "cluster: slot {slot} given up (last worker {id}): {cause}"
            )),
            Event::ReloadFailed { slot, kept, .. } => self.say(&format!(
                "cluster: reload failed for slot {slot}; worker {kept} keeps serving"
            )),
            other => tracing::debug!(?other, "cluster event"),
        }
    }

    /// Whether `event` means the cluster cannot serve.
    fn judge(&mut self, event: &Event) -> Option<Fatal> {
        match event {
            Event::ListenFailed {
                key,
                errno,
                lasting: true,
                ..
            } => {
                let cause = SlotFailure::Listen {
                    key: key.clone(),
                    errno: *errno,
                };
                Some(Fatal::Listen(format!("cannot listen: {cause}")))
            }
            Event::SlotFailed { cause, .. } => {
                self.failed_slots += 1;
                if matches!(cause, SlotFailure::Listen { .. }) {
                    return Some(Fatal::Listen(format!("cannot listen: {cause}")));
                }
                (self.failed_slots >= self.workers).then(|| {
                    Fatal::CrashLoop(
                        "every worker keeps crashing (or leaving within --min-uptime): each \
                         slot was given up"
                            .into(),
                    )
                })
            }
            Event::Exit {
                id,
                status,
                exited_after_disconnect: false,
                ..
            } => {
                let start = self.first.get_mut(id)?;
                if start.listened || start.misbehaved {
                    return None;
                }
                start.failed = true;
                self.first_generation_failed()
                    .then(|| Fatal::ExitedBeforeListening {
                        last: *id,
                        status: status.to_string(),
                    })
            }
            Event::NotConnected { id, waited } => {
                let start = self.first.get_mut(id)?;
                start.failed = true;
                let none_online = self.first.values().all(|s| !s.online);
                (none_online && self.first_generation_failed())
                    .then_some(Fatal::NeverConnected { waited: *waited })
            }
            _ => None,
        }
    }

    /// Whether every worker of the first generation has failed to start.
    fn first_generation_failed(&self) -> bool {
        self.first.len() == self.workers && self.first.values().all(|s| s.failed)
    }

    /// Keeps the last stderr lines of worker `id`.
    fn remember(&mut self, id: WorkerId, line: &str) {
        let at = match self.tails.iter().position(|(w, _)| *w == id) {
            Some(at) => at,
            None => {
                if self.tails.len() == TAILS {
                    self.tails.pop_front();
                }
                self.tails.push_back((id, VecDeque::new()));
                self.tails.len() - 1
            }
        };
        let tail = &mut self.tails[at].1;
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        let mut end = line.len().min(TAIL_LINE_BYTES);
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        tail.push_back(line[..end].to_owned());
    }

    /// The message for `fatal`, with what helps to act on it.
    pub(crate) fn explain(&self, fatal: Fatal) -> String {
        match fatal {
            Fatal::Listen(reason) | Fatal::CrashLoop(reason) => reason,
            Fatal::NeverConnected { waited } => format!(
                "no worker connected to the cluster channel within {}s: run a Node script \
                 (cluster -- app.js, or cluster -- node app.js) or a program built on the \
                 cluster crate",
                waited.as_secs_f64()
            ),
            Fatal::ExitedBeforeListening { last, status } => {
                let mut message =
                    format!("every worker exited before it listened (worker {last}: {status})");
                let tail = self.tails.iter().find(|(id, _)| *id == last).or_else(|| {
                    self.tails
                        .iter()
                        .rev()
                        .find(|(id, _)| self.first.contains_key(id))
                });
                match tail {
                    Some((id, lines)) => {
                        message.push_str(&format!("; the last lines of worker {id}'s stderr:"));
                        for line in lines {
                            message.push_str(&format!("\n  | {line}"));
                        }
                    }
                    None => message.push_str("; it wrote nothing on stderr"),
                }
                message
            }
        }
    }
}
