//! The pure codec of Node's own IPC format (`serialization: 'json'`): bytes in, lines
//! out, no I/O.
//!
//! ```text
//!  {"cmd":"NODE_HANDLE","type":"net.Native","msg":{"hello":1}}\n   <- + one fd (SCM_RIGHTS)
//!  {"cmd":"NODE_HANDLE_ACK"}\n                                       <- the answer
//!  "any JSON value"\n
//!  {"cmd":"NODE_CLUSTER","act":"online","seq":0}\n                  <- control lane
//! ```
//!
//! - One `JSON.stringify` value per line, UTF-8, ended by `\n`. serde_json escapes every
//!   control character inside strings, so an encoded message never contains a raw newline.
//! - An object whose `cmd` is a string starting with `NODE_` is internal: it belongs to the
//!   [`Lane::Control`]; everything else is [`Lane::User`].
//! - A descriptor travels as `{"cmd":"NODE_HANDLE","type":T,"msg":<message>}`, written by
//!   one `sendmsg` with the descriptor as `SCM_RIGHTS`; the receiver answers
//!   `{"cmd":"NODE_HANDLE_ACK"}` (or `NODE_HANDLE_NACK` when the descriptor did not come),
//!   and the sender holds back every later message until then.
//! - A decoder refuses a line longer than its limit once that many bytes are buffered
//!   without a newline: it never holds more than the limit plus one read.
//! - What Node writes, this crate reads: a lone UTF-16 surrogate, which `JSON.stringify`
//!   writes as an escape such as `"a\ud800b"` and which no Rust string can hold, is received
//!   as U+FFFD (`"a\ufffdb"`, the escape replaced in place in the received line); values
//!   nest up to [`MAX_DEPTH`] levels (Node's `JSON.stringify` stops near 4,000), decoded on a
//!   stack that grows on the heap as needed, never on the thread's own stack alone; deeper
//!   is an [`Error::DecodeJson`] for that message.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::{Error, Lane};

mod incoming;

pub(crate) use incoming::{Incoming, LineKind, kind, sort};

/// The prefix of an internal message's `cmd`.
pub const INTERNAL_PREFIX: &str = "NODE_";
/// The `cmd` of a message that carries a descriptor.
pub const HANDLE_CMD: &str = "NODE_HANDLE";
/// The `cmd` of the answer to a [`HANDLE_CMD`] line that came with its descriptor.
pub const HANDLE_ACK_CMD: &str = "NODE_HANDLE_ACK";
/// The `cmd` of the answer to a [`HANDLE_CMD`] line whose descriptor did not come.
pub const HANDLE_NACK_CMD: &str = "NODE_HANDLE_NACK";

/// How deep a received JSON value may nest (arrays and objects): deeper is a decode error
/// for that message, so that a hostile peer cannot make decoding use unbounded stack.
pub const MAX_DEPTH: usize = 10_000;

/// The line of an acknowledgement, newline included.
pub(crate) const ACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n";
/// The line of a negative acknowledgement, newline included.
pub(crate) const NACK_LINE: &[u8] = b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n";

/// What kind of handle a `NODE_HANDLE` line says it carries: the `type` field, which tells
/// a Node receiver what object to make of the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum HandleType {
    /// A raw TCP or Unix socket (a listening or a connected one) that Node hands over as
    /// its native handle: `server.listen(handle)` or `new net.Socket({ handle })` use it.
    /// What `cluster` sends, and the default of this crate.
    #[serde(rename = "net.Native")]
    NetNative,
    /// A connected socket: Node makes a `net.Socket` of it.
    #[serde(rename = "net.Socket")]
    NetSocket,
    /// A listening socket: Node makes a `net.Server` of it, already listening.
    #[serde(rename = "net.Server")]
    NetServer,
    /// A UDP socket: Node makes a `dgram.Socket` of it.
    #[serde(rename = "dgram.Socket")]
    DgramSocket,
    /// A raw UDP handle.
    #[serde(rename = "dgram.Native")]
    DgramNative,
}

impl HandleType {
    /// The handle type Node names `name` in the `type` field.
    fn from_name(name: &str) -> Option<Self> {
        [
            HandleType::NetNative,
            HandleType::NetSocket,
            HandleType::NetServer,
            HandleType::DgramSocket,
            HandleType::DgramNative,
        ]
        .into_iter()
        .find(|handle_type| handle_type.as_str() == name)
    }

    /// The name Node writes in the `type` field, such as `"net.Native"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HandleType::NetNative => "net.Native",
            HandleType::NetSocket => "net.Socket",
            HandleType::NetServer => "net.Server",
            HandleType::DgramSocket => "dgram.Socket",
            HandleType::DgramNative => "dgram.Native",
        }
    }
}

/// Decodes a received JSON text as a `T`: nesting up to [`MAX_DEPTH`] levels, on a stack
/// that grows on the heap when the thread's own runs low.
pub(crate) fn from_slice<'de, T: Deserialize<'de>>(json: &'de [u8]) -> serde_json::Result<T> {
    if nests_deeper_than(json, MAX_DEPTH) {
        return Err(serde::de::Error::custom(format_args!(
            "JSON nests deeper than {MAX_DEPTH} levels"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    let value = T::deserialize(serde_stacker::Deserializer::new(&mut de))?;
    de.end()?;
    Ok(value)
}

/// Whether the arrays and objects of a JSON text nest deeper than `max` (brackets inside
/// strings do not count). Cheap: each level takes at least two bytes.
fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    if json.len() <= 2 * max {
        return false;
    }
    let mut depth = 0usize;
    let mut at = 0;
    while at < json.len() {
        match json[at] {
            b'"' => {
                // Skip the string: to its closing quote, past escapes.
                at += 1;
                while let Some(found) = memchr::memchr2(b'"', b'\\', &json[at..]) {
                    at += found;
                    if json[at] == b'"' {
                        break;
                    }
                    at += 2;
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        at += 1;
    }
    false
}

/// A received line with every lone UTF-16 surrogate escape (`\ud800` not followed by a low
/// surrogate's escape, or a low one alone) replaced by `\ufffd`, the replacement
/// character, which has the same length. Node's `JSON.stringify` writes lone surrogates so;
/// a Rust string cannot hold one. Lines without any `\u` escape are returned as they are.
pub(crate) fn replace_lone_surrogates(line: Bytes) -> Bytes {
    if memchr::memmem::find(&line, b"\\u").is_none() {
        return line;
    }
    let mut fixed: Option<BytesMut> = None;
    let mut at = 0;
    while let Some(found) = memchr::memchr(b'\\', &line[at..]) {
        at += found;
        if line.get(at + 1) != Some(&b'u') {
            // Any other escape, `\\` included, is two bytes.
            at += 2;
            continue;
        }
        match surrogate_at(&line, at) {
            Some(Surrogate::High) if surrogate_at(&line, at + 6) == Some(Surrogate::Low) => {
                at += 12;
            }
            Some(_) => {
                let fixed = fixed.get_or_insert_with(|| BytesMut::from(&line[..]));
                fixed[at..at + 6].copy_from_slice(b"\\ufffd");
                at += 6;
            }
            None => at += 2,
        }
    }
    match fixed {
        Some(fixed) => fixed.freeze(),
        None => line,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Surrogate {
    High,
    Low,
}

/// The kind of surrogate the `\uXXXX` escape at `at` encodes, if it is one.
fn surrogate_at(line: &[u8], at: usize) -> Option<Surrogate> {
    let escape = line.get(at..at + 6)?;
    if &escape[..2] != b"\\u" {
        return None;
    }
    let hex = std::str::from_utf8(&escape[2..]).ok()?;
    match u16::from_str_radix(hex, 16).ok()? {
        0xD800..=0xDBFF => Some(Surrogate::High),
        0xDC00..=0xDFFF => Some(Surrogate::Low),
        _ => None,
    }
}

/// A `std::io::Write` into a `BytesMut` that refuses to pass `room` bytes.
struct BoundedWriter<'a> {
    dst: &'a mut BytesMut,
    room: usize,
    wanted: usize,
}

impl std::io::Write for BoundedWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.wanted = self.wanted.saturating_add(data.len());
        if data.len() > self.room {
            return Err(std::io::ErrorKind::OutOfMemory.into());
        }
        self.room -= data.len();
        self.dst.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends `message` as JSON to `dst`, refusing it once it passes `max` bytes. On error
/// `dst` holds what it held before.
fn encode_value<T: Serialize + ?Sized>(
    message: &T,
    max: u32,
    dst: &mut BytesMut,
) -> Result<(), Error> {
    let start = dst.len();
    let mut writer = BoundedWriter {
        dst,
        room: max as usize,
        wanted: 0,
    };
    let result = serde_json::to_writer(&mut writer, message);
    let wanted = writer.wanted;
    if let Err(source) = result {
        dst.truncate(start);
        return Err(if wanted > max as usize {
            Error::FrameTooLarge {
                len: wanted as u64,
                max,
            }
        } else {
            Error::EncodeJson(source)
        });
    }
    Ok(())
}

/// Checks that `message` (its JSON) arrives on `lane`, and is not one of the handle
/// protocol's own messages, which the channel writes itself.
fn check_lane(message: &[u8], lane: Lane) -> Result<(), Error> {
    // Fast path: a user message can only be internal if it names such a `cmd` somewhere.
    if lane == Lane::User
        && (message.first() != Some(&b'{')
            || memchr::memmem::find(message, b"\"cmd\":\"NODE_").is_none())
    {
        return Ok(());
    }
    match (kind(message), lane) {
        (LineKind::User, Lane::User) | (LineKind::Internal, Lane::Control) => Ok(()),
        (LineKind::User, Lane::Control) => Err(Error::InvalidNodeMessage(
            "a control message must be an object whose cmd starts with NODE_",
        )),
        (LineKind::Internal, Lane::User) => Err(Error::InvalidNodeMessage(
            "a user message whose cmd starts with NODE_ would arrive on the control lane",
        )),
        _ => Err(Error::InvalidNodeMessage(
            "NODE_HANDLE, NODE_HANDLE_ACK and NODE_HANDLE_NACK are written by the channel itself",
        )),
    }
}

/// Appends one line holding `message` for `lane` to `dst`: the message itself, or, with a
/// handle, the `NODE_HANDLE` line that wraps it. The message alone may take `max` bytes.
///
/// On error `dst` holds what it held before.
pub(crate) fn encode_line<T: Serialize + ?Sized>(
    lane: Lane,
    handle: Option<HandleType>,
    message: &T,
    max: u32,
    dst: &mut BytesMut,
) -> Result<(), Error> {
    let start = dst.len();
    if let Some(handle) = handle {
        dst.extend_from_slice(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"");
        dst.extend_from_slice(handle.as_str().as_bytes());
        dst.extend_from_slice(b"\",\"msg\":");
    }
    let body = dst.len();
    let encoded = encode_value(message, max, dst).and_then(|()| check_lane(&dst[body..], lane));
    if let Err(err) = encoded {
        dst.truncate(start);
        return Err(err);
    }
    if handle.is_some() {
        dst.put_u8(b'}');
    }
    dst.put_u8(b'\n');
    Ok(())
}

/// Splits a byte stream into lines, at most `max_line_len` bytes each (newline excluded).
///
/// A state machine over a `BytesMut`: [`decode`](LineCodec::decode) returns `Ok(None)`
/// when no whole line is buffered, and remembers how far it looked so that a long line
/// arriving in many reads is scanned once.
#[derive(Debug, Clone)]
pub struct LineCodec {
    max_line_len: u32,
    /// Bytes at the front of the buffer already known to hold no newline.
    scanned: usize,
    /// Whether the stream's first bytes were checked (see [`decode`](LineCodec::decode)).
    checked_start: bool,
}

impl LineCodec {
    /// A codec for lines of up to `max_line_len` bytes.
    pub fn new(max_line_len: u32) -> Self {
        Self {
            max_line_len,
            scanned: 0,
            checked_start: false,
        }
    }

    /// Whether the decoder holds no part of a line (given the buffer is empty).
    pub fn is_between_lines(&self) -> bool {
        self.scanned == 0
    }

    /// Decodes the next line from the front of `src`, without its newline.
    ///
    /// Returns `Ok(None)` when `src` holds no whole line yet. Errors end the stream: a line
    /// over the limit ([`Error::LineTooLong`]), or first bytes that no JSON text starts with
    /// ([`Error::NotNodeJson`]: Node's 'advanced' serialization starts with a 4-byte length,
    /// this crate's postcard frames with one too).
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, Error> {
        if !self.checked_start {
            if src.is_empty() {
                return Ok(None);
            }
            if !starts_like_json(src[0]) {
                if src.len() < 6 {
                    return Ok(None);
                }
                let mut head = [0; 6];
                head.copy_from_slice(&src[..6]);
                return Err(Error::NotNodeJson { head });
            }
            self.checked_start = true;
        }
        let Some(pos) = memchr::memchr(b'\n', &src[self.scanned..]) else {
            self.scanned = src.len();
            if src.len() > self.max_line_len as usize {
                return Err(Error::LineTooLong {
                    len: src.len() as u64,
                    max: self.max_line_len,
                });
            }
            return Ok(None);
        };
        let end = self.scanned + pos;
        self.scanned = 0;
        if end > self.max_line_len as usize {
            return Err(Error::LineTooLong {
                len: end as u64,
                max: self.max_line_len,
            });
        }
        let mut line = src.split_to(end + 1).freeze();
        line.truncate(end);
        Ok(Some(line))
    }
}

/// Whether a JSON text (as `JSON.stringify` writes it, or with leading whitespace) can
/// start with `byte`.
fn starts_like_json(byte: u8) -> bool {
    matches!(
        byte,
        b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
    ) || byte.is_ascii_whitespace()
}

/// An internal message of Node's protocol (an object whose `cmd` starts with `NODE_`), as
/// raw JSON: what a library such as `cluster` sends and receives on the control lane of a
/// Node channel, with [`Sender::send_internal`](crate::Sender::send_internal) and
/// [`Received::internal`](crate::Received::internal).
///
/// ```
/// let msg = ipc::InternalMessage::new("NODE_CLUSTER")?
///     .with("act", "online")
///     .with("seq", 0);
/// assert_eq!(msg.cmd(), "NODE_CLUSTER");
/// // Fields are written in key order (serde_json's map), which a JSON peer does not mind.
/// assert_eq!(serde_json::to_string(&msg).unwrap(), r#"{"act":"online","cmd":"NODE_CLUSTER","seq":0}"#);
/// # Ok::<(), ipc::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct InternalMessage(serde_json::Map<String, serde_json::Value>);

impl InternalMessage {
    /// A message with only its `cmd`, which must start with `NODE_` and not be one of the
    /// handle protocol's own commands.
    pub fn new(cmd: &str) -> Result<Self, Error> {
        let mut map = serde_json::Map::new();
        map.insert("cmd".into(), cmd.into());
        Self::from_map(map)
    }

    /// The message `value`, if it is an object with an internal `cmd`.
    pub fn from_value(value: serde_json::Value) -> Result<Self, Error> {
        match value {
            serde_json::Value::Object(map) => Self::from_map(map),
            _ => Err(Error::InvalidNodeMessage(
                "an internal message is an object",
            )),
        }
    }

    fn from_map(map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Error> {
        match map.get("cmd").and_then(|c| c.as_str()) {
            Some(HANDLE_CMD | HANDLE_ACK_CMD | HANDLE_NACK_CMD) => Err(Error::InvalidNodeMessage(
                "NODE_HANDLE, NODE_HANDLE_ACK and NODE_HANDLE_NACK are written by the channel itself",
            )),
            Some(cmd) if cmd.starts_with(INTERNAL_PREFIX) => Ok(Self(map)),
            _ => Err(Error::InvalidNodeMessage(
                "an internal message's cmd is a string that starts with NODE_",
            )),
        }
    }

    /// Adds (or replaces) a field; `cmd` cannot be changed this way.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        if key != "cmd" {
            self.0.insert(key.into(), value.into());
        }
        self
    }

    /// The `cmd`, such as `"NODE_CLUSTER"`.
    pub fn cmd(&self) -> &str {
        self.0
            .get("cmd")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
    }

    /// A field.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)
    }

    /// All fields, `cmd` included.
    pub fn fields(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.0
    }

    /// The message as a JSON value.
    pub fn into_value(self) -> serde_json::Value {
        serde_json::Value::Object(self.0)
    }
}

#[cfg(test)]
mod tests;
