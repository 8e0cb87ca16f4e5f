//! Sorting a received line the way a Node receiver does, in one parse of it: its `cmd`
//! says what it is (a user or internal message, a handle, an answer to ours), and for a
//! `NODE_HANDLE` line the same parse finds the handle's `type` and delimits its `msg`.

use std::fmt;

use bytes::Bytes;
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::{HANDLE_ACK_CMD, HANDLE_CMD, HANDLE_NACK_CMD, HandleType, INTERNAL_PREFIX};
use crate::Lane;

/// What a line is for the channel: what its `cmd` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LineKind {
    /// A user message (including a line that is no JSON: it fails to decode later).
    User,
    /// An internal message for the control lane.
    Internal,
    /// A message that carries a descriptor.
    Handle,
    /// The peer acknowledged our handle.
    Ack,
    /// The peer did not get our handle's descriptor.
    Nack,
}

impl LineKind {
    /// The kind of a line whose `cmd` is the string `cmd`.
    fn of_cmd(cmd: &str) -> Self {
        match cmd {
            HANDLE_CMD => LineKind::Handle,
            HANDLE_ACK_CMD => LineKind::Ack,
            HANDLE_NACK_CMD => LineKind::Nack,
            cmd if cmd.starts_with(INTERNAL_PREFIX) => LineKind::Internal,
            _ => LineKind::User,
        }
    }

    /// The lane a message of this kind arrives on.
    pub(crate) fn lane(self) -> Lane {
        match self {
            LineKind::User => Lane::User,
            _ => Lane::Control,
        }
    }
}

/// A received line, sorted.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A message whose body is the line itself, for this lane.
    Message(Lane),
    /// A `NODE_HANDLE` line: the handle's type and inner message, or what is wrong with
    /// them (the line is still a handle: its descriptor is answered for).
    Handle(Result<HandleLine, String>),
    /// `NODE_HANDLE_ACK`.
    Ack,
    /// `NODE_HANDLE_NACK`.
    Nack,
}

/// What a `NODE_HANDLE` line carries.
#[derive(Debug)]
pub(crate) struct HandleLine {
    pub(crate) handle_type: HandleType,
    /// The inner message: the bytes of the line that hold it, not decoded.
    pub(crate) msg: Bytes,
}

impl HandleLine {
    /// The lane the inner message arrives on (a look at its own `cmd`).
    pub(crate) fn lane(&self) -> Lane {
        kind(&self.msg).lane()
    }
}

/// Sorts a received line (without its newline), parsing it once.
pub(crate) fn sort(line: &Bytes) -> Incoming {
    let Some(head) = parse_head(line) else {
        return Incoming::Message(Lane::User);
    };
    match head.kind {
        LineKind::User => Incoming::Message(Lane::User),
        LineKind::Internal => Incoming::Message(Lane::Control),
        LineKind::Ack => Incoming::Ack,
        LineKind::Nack => Incoming::Nack,
        LineKind::Handle => Incoming::Handle(head.handle(line)),
    }
}

/// What a message (a JSON text without its newline) is, as [`sort`] would find it.
pub(crate) fn kind(message: &[u8]) -> LineKind {
    parse_head(message).map_or(LineKind::User, |head| head.kind)
}

#[cfg(test)]
thread_local! {
    /// How many times this thread parsed a text with serde_json to sort it.
    pub(crate) static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The top level of a line that is a JSON object; `None` for anything else (another
/// value, or no valid JSON at all: a user message that fails to decode later).
fn parse_head(line: &[u8]) -> Option<Head<'_>> {
    if line.first() != Some(&b'{') {
        return None;
    }
    #[cfg(test)]
    PARSES.with(|parses| parses.set(parses.get() + 1));
    let mut de = serde_json::Deserializer::from_slice(line);
    let head = de.deserialize_map(HeadVisitor).ok()?;
    de.end().ok()?;
    Some(head)
}

/// One field of the top level, as found: what [`Head::handle`] needs of `type` and `msg`.
#[derive(Debug)]
enum Field<T> {
    Missing,
    Found(T),
    /// Present, but no value of its kind (the reason).
    Invalid(String),
    Duplicate,
}

/// The top level of an object line: its `cmd`, matched where it lies in the line (never
/// copied unless it holds escapes), and the `type` and `msg` fields, which only a handle
/// line uses; every other field is skipped. serde_json skips a value without building it,
/// but keeps a stack of the brackets it is inside of, which allocates for nested values.
#[derive(Debug)]
struct Head<'a> {
    kind: LineKind,
    handle_type: Field<HandleType>,
    msg: Field<&'a RawValue>,
}

impl Head<'_> {
    /// The handle of a `NODE_HANDLE` line (`line` is what was parsed).
    fn handle(self, line: &Bytes) -> Result<HandleLine, String> {
        let handle_type = match self.handle_type {
            Field::Found(handle_type) => handle_type,
            Field::Missing => return Err("missing field `type`".into()),
            Field::Invalid(reason) => return Err(reason),
            Field::Duplicate => return Err("duplicate field `type`".into()),
        };
        let msg = match self.msg {
            Field::Found(msg) => line.slice_ref(msg.get().as_bytes()),
            Field::Missing => return Err("missing field `msg`".into()),
            Field::Invalid(reason) => return Err(reason),
            Field::Duplicate => return Err("duplicate field `msg`".into()),
        };
        Ok(HandleLine { handle_type, msg })
    }
}

struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head<'de>, A::Error> {
        let mut kind = None;
        let mut head = Head {
            kind: LineKind::User,
            handle_type: Field::Missing,
            msg: Field::Missing,
        };
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match key {
                Key::Cmd if kind.is_some() => return Err(de::Error::duplicate_field("cmd")),
                Key::Cmd => kind = Some(map.next_value_seed(CmdSeed)?),
                Key::Type => {
                    let value = map.next_value_seed(TypeSeed)?;
                    head.handle_type = match head.handle_type {
                        Field::Missing => value,
                        _ => Field::Duplicate,
                    };
                }
                Key::Msg => {
                    let value = map.next_value_seed(MsgSeed)?;
                    head.msg = match head.msg {
                        Field::Missing => value,
                        _ => Field::Duplicate,
                    };
                }
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        head.kind = kind.unwrap_or(LineKind::User);
        Ok(head)
    }
}

/// A top-level key, compared where it lies.
enum Key {
    Cmd,
    Type,
    Msg,
    Other,
}

struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Key;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Key, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Key, E> {
        Ok(match key {
            "cmd" => Key::Cmd,
            "type" => Key::Type,
            "msg" => Key::Msg,
            _ => Key::Other,
        })
    }
}

/// Drains the rest of a map or sequence that a visitor does not want.
fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// The `cmd` value: a string says what the line is; any other value makes it a user
/// message.
struct CmdSeed;

impl<'de> DeserializeSeed<'de> for CmdSeed {
    type Value = LineKind;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<LineKind, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CmdSeed {
    type Value = LineKind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_str<E: de::Error>(self, cmd: &str) -> Result<LineKind, E> {
        Ok(LineKind::of_cmd(cmd))
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<LineKind, E> {
        Ok(LineKind::User)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<LineKind, E> {
        Ok(LineKind::User)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<LineKind, E> {
        Ok(LineKind::User)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<LineKind, E> {
        Ok(LineKind::User)
    }

    fn visit_unit<E: de::Error>(self) -> Result<LineKind, E> {
        Ok(LineKind::User)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LineKind, A::Error> {
        skip_map(map).map(|()| LineKind::User)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<LineKind, A::Error> {
        skip_seq(seq).map(|()| LineKind::User)
    }
}

/// The `type` value: one of Node's handle type names, or why not.
struct TypeSeed;

impl<'de> DeserializeSeed<'de> for TypeSeed {
    type Value = Field<HandleType>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl TypeSeed {
    fn invalid(what: &str) -> Field<HandleType> {
        Field::Invalid(format!("invalid type: {what}, expected a handle type name"))
    }
}

impl<'de> Visitor<'de> for TypeSeed {
    type Value = Field<HandleType>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(match HandleType::from_name(name) {
            Some(handle_type) => Field::Found(handle_type),
            None => Field::Invalid(format!("unknown handle type `{name}`")),
        })
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Self::invalid("boolean"))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Self::invalid("integer"))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Self::invalid("integer"))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Self::invalid("number"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Self::invalid("null"))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        skip_map(map).map(|()| Self::invalid("map"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        skip_seq(seq).map(|()| Self::invalid("sequence"))
    }
}

/// The `msg` value, delimited (skipped, not built) and borrowed from the line.
struct MsgSeed;

impl<'de> DeserializeSeed<'de> for MsgSeed {
    type Value = Field<&'de RawValue>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        match <&RawValue as serde::Deserialize>::deserialize(d) {
            Ok(msg) => Ok(Field::Found(msg)),
            // The one error serde_json finds once the value is wholly read (and skipped):
            // it holds bytes that are no UTF-8, which a raw value must be. The line is still
            // a valid one; the handle it may be is refused.
            Err(err) if err.to_string().starts_with("invalid unicode code point") => {
                Ok(Field::Invalid(err.to_string()))
            }
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_kind(line: &str, expected: LineKind) {
        assert_eq!(kind(line.as_bytes()), expected, "{line}");
    }

    #[test]
    fn lines_are_sorted_as_node_sorts_them() {
        check_kind(r#""text""#, LineKind::User);
        check_kind(r#"{"cmd":"hello"}"#, LineKind::User);
        check_kind(r#"{"cmd":5,"x":"NODE_"}"#, LineKind::User);
        check_kind(r#"{"cmd":null}"#, LineKind::User);
        check_kind(r#"{"cmd":{"cmd":"NODE_X"}}"#, LineKind::User);
        check_kind(r#"{"a":{"cmd":"NODE_X"}}"#, LineKind::User);
        check_kind(r#"{"cmd":"NODE_X","cmd":"NODE_X"}"#, LineKind::User);
        check_kind(r#"{"cmd":"NODE_X"} x"#, LineKind::User);
        check_kind(
            r#"{"cmd":"NODE_CLUSTER","act":"online"}"#,
            LineKind::Internal,
        );
        check_kind(r#"{"seq":1, "cmd" : "NODE_X"}"#, LineKind::Internal);
        check_kind(r#"{"c\u006dd":"NODE_\u0058"}"#, LineKind::Internal);
        check_kind(r#"{"msg":1,"msg":2,"cmd":"NODE_X"}"#, LineKind::Internal);
        check_kind(
            r#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":1}"#,
            LineKind::Handle,
        );
        check_kind(r#"{"cmd":"NODE_HANDLE_ACK"}"#, LineKind::Ack);
        check_kind(r#"{"cmd":"NODE_HANDLE_NACK"}"#, LineKind::Nack);
        check_kind("{not json", LineKind::User);
        check_kind("", LineKind::User);
    }

    #[track_caller]
    fn handle_of(line: &[u8]) -> Result<HandleLine, String> {
        match sort(&Bytes::copy_from_slice(line)) {
            Incoming::Handle(handle) => handle,
            other => panic!("not a handle: {other:?}"),
        }
    }

    #[test]
    fn a_handle_line_gives_its_type_and_message_or_what_is_wrong() {
        let handle = handle_of(
            br#"{"msg": {"cmd":"NODE_X","a":[1]} ,"type":"net.Server","cmd":"NODE_HANDLE"}"#,
        )
        .unwrap();
        assert_eq!(handle.handle_type, HandleType::NetServer);
        assert_eq!(&handle.msg[..], br#"{"cmd":"NODE_X","a":[1]}"#);
        assert_eq!(handle.lane(), Lane::Control);
        for (line, reason) in [
            (
                &br#"{"cmd":"NODE_HANDLE","type":"net.Bogus","msg":1}"#[..],
                "unknown handle type",
            ),
            (
                br#"{"cmd":"NODE_HANDLE","type":[1],"msg":1}"#,
                "invalid type",
            ),
            (br#"{"cmd":"NODE_HANDLE","msg":1}"#, "missing field `type`"),
            (
                br#"{"cmd":"NODE_HANDLE","type":"net.Native"}"#,
                "missing field `msg`",
            ),
            (
                br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":1,"msg":2}"#,
                "duplicate field `msg`",
            ),
            (
                b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":\"\xff\"}",
                "invalid unicode",
            ),
        ] {
            let err = handle_of(line).unwrap_err();
            assert!(err.contains(reason), "{err}");
        }
        // A user line may have such fields: they are not looked at.
        assert!(matches!(
            sort(&Bytes::from_static(
                b"{\"type\":1,\"msg\":\"\xff\",\"msg\":2}"
            )),
            Incoming::Message(Lane::User)
        ));
    }

    fn parses(line: &[u8]) -> usize {
        PARSES.with(|parses| parses.set(0));
        let line = Bytes::copy_from_slice(line);
        if let Incoming::Handle(Ok(handle)) = sort(&line) {
            let _ = handle.lane();
        }
        PARSES.with(|parses| parses.get())
    }

    /// Before this module, a handle line cost three parses (its kind, its fields, the lane
    /// of its message); each line is now parsed once, and a handle's message once more
    /// for its own lane when it is an object.
    #[test]
    fn a_line_is_parsed_once() {
        assert_eq!(parses(br#""text""#), 0);
        assert_eq!(parses(br#"{"a":[1,{"b":2}]}"#), 1);
        assert_eq!(
            parses(br#"{"cmd":"NODE_CLUSTER","act":"online","seq":0}"#),
            1
        );
        assert_eq!(parses(br#"{"cmd":"NODE_HANDLE_ACK"}"#), 1);
        assert_eq!(
            parses(br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":"text"}"#),
            1
        );
        assert_eq!(
            parses(br#"{"cmd":"NODE_HANDLE","type":"net.Native","msg":{"cmd":"NODE_CLUSTER","act":"newconn"}}"#),
            2
        );
    }
}
