//! Unit tests of `node_link.rs`.

use super::*;

fn link() -> LinkState {
    link_with(2, 1)
}

fn link_with(messages: usize, handles: usize) -> LinkState {
    NodeLink::new(
        HoldBack {
            messages,
            bytes: 1024,
            handles,
        },
        1024,
        1,
    )
    .state
    .into_inner()
    .unwrap()
}

fn line(text: &str, fd: bool) -> Line {
    Line::new(
        Bytes::copy_from_slice(text.as_bytes()),
        fd.then(|| std::io::pipe().expect("pipe").0.into()),
    )
}

/// Takes what would be written, as the socket would.
fn written(state: &mut LinkState) -> String {
    let text = String::from_utf8(state.buf.to_vec()).unwrap();
    state.written += state.buf.len() as u64;
    state.buf.clear();
    state.fd_at_front = false;
    state.pump();
    text
}

#[test]
fn messages_after_a_handle_wait_for_its_acknowledgement() {
    let mut state = link();
    state.enqueue(line("a;", false)).unwrap();
    // A handle waits for the bytes ahead of it so that its fd rides on its first byte.
    state.enqueue(line("h1;", true)).unwrap();
    state.enqueue(line("b;", false)).unwrap();
    assert_eq!(written(&mut state), "a;");
    assert!(
        state.fd_at_front,
        "the descriptor rides on the handle's first byte"
    );
    assert_eq!(written(&mut state), "h1;");
    // Answers to the peer's handles are never held back.
    state.answer(b"ack;", None).unwrap();
    assert_eq!(written(&mut state), "ack;");
    assert!(state.acknowledged());
    assert_eq!(written(&mut state), "b;");
    assert!(state.is_open());
}

#[test]
fn the_hold_back_queue_is_bounded() {
    let mut state = link();
    state.enqueue(line("h;", true)).unwrap();
    state.enqueue(line("1;", false)).unwrap();
    state.enqueue(line("2;", false)).unwrap();
    let refused = state.enqueue(line("3;", false)).unwrap_err();
    assert_eq!(&refused.bytes[..], b"3;");
    written(&mut state);
    state.acknowledged();
    assert_eq!(written(&mut state), "1;2;");
    state.enqueue(refused).unwrap();
}

#[test]
fn a_refused_handle_is_sent_again_then_dropped() {
    let mut state = link();
    state.enqueue(line("h;", true)).unwrap();
    state.enqueue(line("after;", false)).unwrap();
    for _ in 0..MAX_RETRANSMISSIONS {
        assert_eq!(written(&mut state), "h;");
        state.refused();
        assert!(state.fd_at_front, "the descriptor goes again");
    }
    assert_eq!(written(&mut state), "h;");
    state.refused();
    let (attempts, line) = state.take_dropped().expect("dropped");
    assert_eq!((attempts, &line[..]), (MAX_RETRANSMISSIONS + 1, &b"h;"[..]));
    assert_eq!(state.take_dropped(), None, "reported once");
    assert_eq!(written(&mut state), "after;");
}

#[test]
fn several_handles_in_flight_each_start_a_write_and_are_answered_in_order() {
    let mut state = link_with(4, 2);
    state.enqueue(line("h1;", true)).unwrap();
    state.enqueue(line("h2;", true)).unwrap();
    state.enqueue(line("h3;", true)).unwrap();
    state.enqueue(line("m;", false)).unwrap();
    assert!(state.fd_at_front);
    assert_eq!(written(&mut state), "h1;");
    assert!(state.fd_at_front, "the second handle starts its own write");
    assert_eq!(written(&mut state), "h2;");
    // Two in flight: the third waits, and what is queued behind it keeps its place.
    assert_eq!(written(&mut state), "");
    assert_eq!(state.in_flight.len(), 2);
    // The peer refuses h1: it goes again at once (h2 alone is in flight), ahead of h3.
    state.refused();
    assert_eq!(written(&mut state), "h1;");
    assert_eq!(written(&mut state), "", "h3 waits for room");
    assert!(state.acknowledged(), "h2 answered: h3 may go");
    assert_eq!(written(&mut state), "h3;");
    // A plain message waits until every handle ahead of it is answered.
    assert!(!state.acknowledged(), "h3 is still in flight");
    assert_eq!(written(&mut state), "");
    assert!(state.acknowledged());
    assert_eq!(written(&mut state), "m;");
    assert!(state.in_flight.is_empty() && state.is_open());
}

#[test]
fn answers_the_peer_does_not_read_are_bounded() {
    let mut state = link();
    for _ in 0..MAX_UNWRITTEN_ANSWERS {
        state.answer(b"nack;", None).unwrap();
    }
    let err = state.answer(b"nack;", None).unwrap_err();
    assert!(
        matches!(err, Error::PeerNotReading { unwritten } if unwritten == MAX_UNWRITTEN_ANSWERS),
        "{err:?}"
    );
    assert_eq!(state.buf.len(), MAX_UNWRITTEN_ANSWERS * b"nack;".len());
    // Once written, answers no longer count.
    written(&mut state);
    assert_eq!(state.unwritten_answers(), 0);
    state.answer(b"ack;", None).unwrap();
    assert_eq!(state.unwritten_answers(), 1);
}
