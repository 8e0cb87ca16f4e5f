//! `--log-format json`: the primary's events as JSON lines on standard error, one object
//! per line, for programs that check what the primary did (`cargo xtask chaos`):
//!
//! ```text
//! {"ts_ms":1718000000123,"primary":4242,"event":"fork","id":3,"pid":4250}
//! {"ts_ms":1718000000456,"primary":4242,"event":"exit","id":3,"status":"signal 9","asked":false}
//! ```
//!
//! `ts_ms` is the wall clock in milliseconds since the Unix epoch, `primary` the pid of the
//! primary that saw the event (a new primary after `SIGUSR2` numbers its workers from 1
//! again), `event` one of `primary-start`, `primary-exit`, `fork`, `online`, `listening`,
//! `ready`, `disconnect`, `exit`, `going-down`, `misbehaved`, `slot-failed`,
//! `reload-failed`, `not-connected`, `listen-failed`, `other`. Worker output lines keep
//! their `worker N | ` text form.

use std::fmt::Write as _;

use cluster::Event;

/// How the primary writes its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable log lines (tracing's format).
    Text,
    /// One JSON object per event (see the module docs).
    Json,
}

/// The JSON line of a primary-level record (`primary-start`, `primary-exit`).
pub(crate) fn primary_line(event: &str) -> String {
    let mut line = head(event);
    line.push('}');
    line
}

/// The JSON line of `event`; `None` for worker output, which stays text.
pub(crate) fn event_line(event: &Event) -> Option<String> {
    let (name, id) = match event {
        Event::Output { .. } => return None,
        Event::Fork { id, .. } => ("fork", Some(id)),
        Event::Online { id } => ("online", Some(id)),
        Event::Listening { id, .. } => ("listening", Some(id)),
        Event::Ready { id } => ("ready", Some(id)),
        Event::Disconnect { id } => ("disconnect", Some(id)),
        Event::Exit { id, .. } => ("exit", Some(id)),
        Event::GoingDown { id, .. } => ("going-down", Some(id)),
        Event::Misbehaved { id, .. } => ("misbehaved", Some(id)),
        Event::SlotFailed { id, .. } => ("slot-failed", Some(id)),
        Event::ReloadFailed { id, .. } => ("reload-failed", id.as_ref()),
        Event::NotConnected { id, .. } => ("not-connected", Some(id)),
        Event::ListenFailed { id, .. } => ("listen-failed", Some(id)),
        Event::Message { id, .. } => ("message", Some(id)),
        _ => {
            let mut line = head("other");
            push_str(&mut line, "detail", &format!("{event:?}"));
            line.push('}');
            return Some(line);
        }
    };
    let mut line = head(name);
    if let Some(id) = id {
        let _ = write!(line, ",\"id\":{}", id.get());
    }
    match event {
        Event::Fork { pid, .. } => {
            let _ = write!(line, ",\"pid\":{pid}");
        }
        Event::Listening { address, .. } => push_str(&mut line, "address", &address.to_string()),
        Event::Exit {
            status,
            exited_after_disconnect,
            ..
        } => {
            push_str(&mut line, "status", &status.to_string());
            let _ = write!(line, ",\"asked\":{exited_after_disconnect}");
        }
        Event::GoingDown { reason, .. } => push_str(&mut line, "reason", reason),
        Event::Misbehaved { reason, .. } => push_str(&mut line, "reason", reason),
        Event::SlotFailed { slot, cause, .. } => {
            let _ = write!(line, ",\"slot\":{slot}");
            push_str(&mut line, "reason", &cause.to_string());
        }
        Event::ReloadFailed {
            slot, kept, reason, ..
        } => {
            let _ = write!(line, ",\"slot\":{slot},\"kept\":{}", kept.get());
            push_str(&mut line, "reason", &format!("{reason:?}"));
        }
        _ => {}
    }
    line.push('}');
    Some(line)
}

fn head(event: &str) -> String {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut line = format!("{{\"ts_ms\":{ts},\"primary\":{}", std::process::id());
    push_str(&mut line, "event", event);
    line
}

/// Appends `,"key":"value"` with `value` escaped as JSON.
fn push_str(line: &mut String, key: &str, value: &str) {
    let _ = write!(line, ",\"{key}\":\"");
    for c in value.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", u32::from(c));
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped() {
        let mut line = String::new();
        push_str(&mut line, "k", "a\"b\\c\nd\u{1}");
        assert_eq!(line, ",\"k\":\"a\\\"b\\\\c\\nd\\u0001\"");
    }

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
