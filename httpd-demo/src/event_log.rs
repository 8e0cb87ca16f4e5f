//! `--log-format json`: the primary's events as JSON lines on standard error, one object
//! per line, for programs that check what the primary did (`cargo xtask chaos`):
//!
//! ```text
//! {"event":"fork","id":3,"pid":4250,"primary":4242,"ts_ms":1718000000123}
//! {"asked":false,"event":"exit","id":3,"primary":4242,"status":"signal SIGKILL","ts_ms":1718000000456}
//! ```
//!
//! `ts_ms` is the wall clock in milliseconds since the Unix epoch, `primary` the pid of the
//! primary that saw the event (a new primary after `SIGUSR2` numbers its workers from 1
//! again), `event` one of `primary-start`, `primary-exit`, `fork`, `online`, `listening`,
//! `ready`, `disconnect`, `exit`, `going-down`, `misbehaved`, `slot-failed`,
//! `reload-failed`, `not-connected`, `listen-failed`, `other`. Worker output lines keep
//! their `worker N | ` text form.

use cluster::Event;

/// How the primary writes its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable log lines (tracing's format).
    Text,
    /// One JSON object per event (see the module docs).
    Json,
}

/// The JSON line of a primary-level record (`primary-start`, `primary-exit`): the same
/// `ts_ms` and `primary` as [`Event::json_line`] gives the events.
pub(crate) fn primary_line(event: &'static str) -> String {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!(
        "{{\"ts_ms\":{ts},\"primary\":{},\"event\":\"{event}\"}}",
        std::process::id()
    )
}

/// The JSON line of `event` ([`Event::json_line`]); `None` for worker output, which
/// stays text.
pub(crate) fn event_line(event: &Event) -> Option<String> {
    event.json_line()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_records_name_the_process() {
        let line = primary_line("primary-start");
        assert!(line.starts_with("{\"ts_ms\":"), "{line}");
        assert!(
            line.ends_with(&format!(
                "\"primary\":{},\"event\":\"primary-start\"}}",
                std::process::id()
            )),
            "{line}"
        );
    }
}
