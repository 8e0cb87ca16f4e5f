//! Unit tests of `json.rs`.

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
    let msg = InternalMessage::from_value(serde_json::json!({"cmd": "NODE_X", "a": 1})).unwrap();
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
