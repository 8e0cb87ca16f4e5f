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
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line_of<T: Serialize>(lane: Lane, handle: Option<HandleType>, msg: &T) -> String {
        let mut buf = BytesMut::new();
        encode_line(lane, handle, msg, 1 << 20, &mut buf).expect("encode");
        String::from_utf8(buf.to_vec()).expect("utf-8")
    }

    #[test]
    fn encoded_lines_are_what_node_writes() {
        assert_eq!(line_of(Lane::User, None, &"a\nb"), "\"a\\nb\"\n");
        assert_eq!(
            line_of(Lane::User, Some(HandleType::NetServer), &"x"),
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Server\",\"msg\":\"x\"}\n"
        );
        let internal = InternalMessage::new("NODE_CLUSTER").unwrap().with("seq", 1);
        assert_eq!(
            line_of(Lane::Control, None, &internal),
            "{\"cmd\":\"NODE_CLUSTER\",\"seq\":1}\n"
        );
        assert_eq!(kind(ACK_LINE.trim_ascii_end()), LineKind::Ack);
        assert_eq!(kind(NACK_LINE.trim_ascii_end()), LineKind::Nack);
    }

    #[test]
    fn a_message_on_the_wrong_lane_is_refused() {
        let mut buf = BytesMut::from(&b"kept"[..]);
        for (lane, msg) in [
            (Lane::Control, serde_json::json!("user text")),
            (Lane::Control, serde_json::json!({"cmd": "mine"})),
            (Lane::User, serde_json::json!({"cmd": "NODE_CLUSTER"})),
            (Lane::Control, serde_json::json!({"cmd": "NODE_HANDLE_ACK"})),
        ] {
            let err = encode_line(lane, None, &msg, 1024, &mut buf).unwrap_err();
            assert!(
                matches!(err, Error::InvalidNodeMessage(_)),
                "{msg}: {err:?}"
            );
            assert_eq!(&buf[..], b"kept");
        }
        // Nested, or inside a string, it is an ordinary user message.
        for msg in [
            serde_json::json!({"a": {"cmd": "NODE_X"}}),
            serde_json::json!({"s": "\"cmd\":\"NODE_X"}),
        ] {
            encode_line(Lane::User, None, &msg, 1024, &mut buf).expect("a user message");
        }
    }

    #[test]
    fn an_oversized_message_is_refused_at_the_limit() {
        let mut buf = BytesMut::new();
        let err = encode_line(Lane::User, None, &"x".repeat(100), 50, &mut buf).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { max: 50, .. }),
            "{err:?}"
        );
        assert!(buf.is_empty());
        let err = encode_line(Lane::User, None, &f64::NAN, 50, &mut buf);
        assert!(err.is_ok(), "NaN is null, as in JSON.stringify");
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), 3);
        let err = encode_line(Lane::User, None, &map, 50, &mut buf).unwrap_err();
        assert!(matches!(err, Error::EncodeJson(_)), "{err:?}");
    }

    /// The type and message of a handle line.
    #[track_caller]
    fn parse_handle(line: &Bytes) -> (HandleType, Bytes) {
        match sort(line) {
            Incoming::Handle(Ok(handle)) => (handle.handle_type, handle.msg),
            other => panic!("no valid handle line: {other:?}"),
        }
    }

    #[test]
    fn a_handle_line_gives_its_type_and_message() {
        let line = line_of(
            Lane::User,
            Some(HandleType::NetNative),
            &serde_json::json!({"a": [1]}),
        );
        let line = Bytes::copy_from_slice(line.trim_end().as_bytes());
        let (handle, msg) = parse_handle(&line);
        assert_eq!(handle, HandleType::NetNative);
        assert_eq!(&msg[..], br#"{"a":[1]}"#);
    }

    #[test]
    fn advanced_serialization_and_postcard_frames_are_not_json() {
        for head in [
            &[0, 0, 0, 9, 0xff, 0x0f][..],
            &[0, 0, 0, 2, 1, 0, 0xac, 0x02],
        ] {
            let mut codec = LineCodec::new(1024);
            let mut buf = BytesMut::from(&head[..5]);
            assert!(
                codec.decode(&mut buf).unwrap().is_none(),
                "waits for 6 bytes"
            );
            buf.extend_from_slice(&head[5..]);
            let err = codec.decode(&mut buf).unwrap_err();
            assert!(matches!(err, Error::NotNodeJson { .. }), "{err:?}");
        }
        let err = LineCodec::new(1024)
            .decode(&mut BytesMut::from(&[0, 0, 0, 9, 0xff, 0x0f][..]))
            .unwrap_err();
        assert!(err.to_string().contains("'advanced'"), "{err}");
    }

    #[test]
    fn a_line_over_the_limit_is_refused_without_its_newline() {
        let mut codec = LineCodec::new(8);
        let mut buf = BytesMut::from(&b"\"1234567"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b"89");
        assert!(matches!(
            codec.decode(&mut buf),
            Err(Error::LineTooLong { len: 10, max: 8 })
        ));
        let mut codec = LineCodec::new(8);
        let mut buf = BytesMut::from(&b"\"123456\"\n\"1234567\"\n"[..]);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"\"123456\"");
        assert!(matches!(
            codec.decode(&mut buf),
            Err(Error::LineTooLong { len: 9, max: 8 })
        ));
    }

    #[test]
    fn internal_messages_need_an_internal_cmd() {
        assert!(InternalMessage::new("cluster").is_err());
        assert!(InternalMessage::new("NODE_HANDLE").is_err());
        assert!(InternalMessage::from_value(serde_json::json!([1])).is_err());
        let msg =
            InternalMessage::from_value(serde_json::json!({"cmd": "NODE_X", "a": 1})).unwrap();
        assert_eq!(
            (msg.cmd(), msg.get("a")),
            ("NODE_X", Some(&serde_json::json!(1)))
        );
        assert_eq!(msg.with("cmd", "other").cmd(), "NODE_X");
    }

    #[track_caller]
    fn check_surrogates(received: &str, decoded: &str) {
        let line = replace_lone_surrogates(Bytes::copy_from_slice(received.as_bytes()));
        assert_eq!(from_slice::<String>(&line).unwrap(), decoded, "{received}");
    }

    #[test]
    fn lone_surrogates_are_received_as_the_replacement_character() {
        check_surrogates(r#""a\ud800b""#, "a\u{fffd}b");
        check_surrogates(r#""\udc00\ud800""#, "\u{fffd}\u{fffd}");
        check_surrogates(r#""\ud800""#, "\u{fffd}");
        check_surrogates(r#""x\uDBFF\u0041""#, "x\u{fffd}A");
        // A pair is a character; an escaped backslash is no escape.
        check_surrogates(r#""\ud83d\ude00""#, "\u{1f600}");
        check_surrogates(r#""\\ud800""#, "\\ud800");
        check_surrogates(r#""\\\ud800""#, "\\\u{fffd}");
        check_surrogates(r#""plain \n \u00e9""#, "plain \n é");
        // In a handle's message too, and the line keeps its length.
        let line = br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":"\udfff"}"#;
        let fixed = replace_lone_surrogates(Bytes::from_static(line));
        assert_eq!(fixed.len(), line.len());
        let (_, msg) = parse_handle(&fixed);
        assert_eq!(from_slice::<String>(&msg).unwrap(), "\u{fffd}");
    }

    fn nested(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn deep_values_decode_up_to_the_limit_and_deeper_is_an_error() {
        // On a thread with a tokio worker's stack (2 MiB), the value dropped there too.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                let deep: serde_json::Value = from_slice(nested(MAX_DEPTH).as_bytes()).unwrap();
                assert!(deep.is_array());
                let object = format!("{}1{}", r#"{"a":"#.repeat(1000), "}".repeat(1000));
                from_slice::<serde_json::Value>(object.as_bytes()).unwrap();
                for hostile in [nested(MAX_DEPTH + 1), nested(100_000)] {
                    let err = from_slice::<serde_json::Value>(hostile.as_bytes()).unwrap_err();
                    assert!(err.to_string().contains("nests deeper"), "{err}");
                }
                // Brackets inside strings do not count.
                let text = format!("[\"{}\\\"{}\"]", "[".repeat(30_000), "{".repeat(30_000));
                from_slice::<serde_json::Value>(text.as_bytes()).unwrap();
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            // Eighths print and parse back exactly.
            (-1_000_000i64..1_000_000).prop_map(|n| serde_json::Value::from(n as f64 / 8.0)),
            "\\PC*".prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\n\"]{0,6}", inner, 0..8)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A user-lane message: a JSON value that is not an internal object.
    fn arb_user_json() -> impl Strategy<Value = serde_json::Value> {
        arb_json().prop_filter("not internal", |v| {
            kind(serde_json::to_string(v).unwrap().as_bytes()) == LineKind::User
        })
    }

    proptest! {
        #[test]
        fn values_round_trip_through_any_read_split(
            values in proptest::collection::vec((arb_user_json(), any::<bool>()), 0..12),
            chunks in proptest::collection::vec(1usize..200, 1..16),
        ) {
            let mut bytes = BytesMut::new();
            for (value, handle) in &values {
                let handle = handle.then_some(HandleType::NetNative);
                encode_line(Lane::User, handle, value, 1 << 20, &mut bytes).unwrap();
            }
            let mut codec = LineCodec::new(1 << 20);
            let mut buf = BytesMut::new();
            let mut lines = Vec::new();
            let mut rest = &bytes[..];
            let mut sizes = chunks.iter().copied().cycle();
            while !rest.is_empty() {
                let n = sizes.next().unwrap().min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(line) = codec.decode(&mut buf).unwrap() {
                    lines.push(line);
                }
            }
            prop_assert!(buf.is_empty() && codec.is_between_lines());
            prop_assert_eq!(lines.len(), values.len());
            for (line, (value, handle)) in lines.iter().zip(&values) {
                prop_assert!(!line.contains(&b'\n'));
                let decoded: serde_json::Value = if *handle {
                    serde_json::from_slice(&parse_handle(line).1).unwrap()
                } else {
                    prop_assert!(matches!(sort(line), Incoming::Message(Lane::User)));
                    serde_json::from_slice(line).unwrap()
                };
                prop_assert_eq!(&decoded, value);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_overallocate(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            newlines in proptest::collection::vec(0usize..4096, 0..8),
            chunks in proptest::collection::vec(1usize..300, 1..8),
        ) {
            let mut bytes = bytes;
            for at in newlines {
                if let Some(b) = bytes.get_mut(at) {
                    *b = b'\n';
                }
            }
            let limit = 256u32;
            let mut codec = LineCodec::new(limit);
            let mut buf = BytesMut::new();
            let mut rest = &bytes[..];
            let mut sizes = chunks.iter().copied().cycle();
            'feed: while !rest.is_empty() {
                let n = sizes.next().unwrap().min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(line)) => {
                            prop_assert!(line.len() <= limit as usize);
                            if let Incoming::Handle(Ok(handle)) = sort(&line) {
                                let _ = handle.lane();
                            }
                            let _ = from_slice::<serde_json::Value>(&replace_lone_surrogates(line.clone()));
                            let _ = serde_json::from_slice::<serde_json::Value>(&line);
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
                // Never more than the limit plus one chunk without a newline.
                prop_assert!(buf.len() <= limit as usize + 300);
            }
        }
    }
}
