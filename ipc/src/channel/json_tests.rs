//! Tests of Node JSON channels over real socketpairs in one process, some against a raw
//! peer that plays Node's side of the handle protocol by hand.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use nix::sys::socket::MsgFlags;

use super::*;
use crate::codec::Lane;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn json() -> Config {
    Config::new().format(Format::Json)
}

fn with_raw_peer() -> (Channel, StdUnixStream) {
    let (ours, theirs) = StdUnixStream::pair().expect("socketpair");
    (
        Channel::from_fd_with(ours.into(), &json()).expect("channel"),
        theirs,
    )
}

/// Reads what is there (waiting for at least one byte), with any descriptors.
fn raw_read(sock: &StdUnixStream) -> (String, Vec<OwnedFd>) {
    let mut fds = Vec::new();
    let mut buf = BytesMut::new();
    let mut control = sys::ControlBuffer::for_fds(4);
    let mut poll = [nix::poll::PollFd::new(
        sock.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    nix::poll::poll(&mut poll, nix::poll::PollTimeout::NONE).expect("poll");
    let got = sys::recv(sock.as_fd(), &mut buf, 64 * 1024, &mut fds, &mut control).expect("recv");
    assert!(matches!(got, sys::Received::Bytes(_)), "{got:?}");
    (String::from_utf8(buf.to_vec()).expect("utf-8"), fds)
}

fn nothing_to_read(sock: &StdUnixStream) -> bool {
    let peeked = nix::sys::socket::recv(
        sock.as_raw_fd(),
        &mut [0],
        MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
    );
    peeked == Err(nix::errno::Errno::EAGAIN)
}

fn json_link(receiver: &Receiver) -> &Arc<node_link::NodeLink> {
    match &receiver.side {
        receiver::ReceiveSide::Json(receiver::JsonReceive(link)) => link,
        receiver::ReceiveSide::Postcard(_) => panic!("a JSON channel"),
    }
}

fn pipe_end() -> OwnedFd {
    std::io::pipe().expect("pipe").1.into()
}

#[test]
fn both_lanes_and_a_handle_between_two_json_channels() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair_with(&json()).expect("pair");
        assert_eq!((a.format(), b.format()), (Format::Json, Format::Json));
        a.send(&serde_json::json!({"text": "line\nbreak", "n": [1, 2]}))
            .await
            .unwrap();
        let cluster = InternalMessage::new("NODE_CLUSTER")
            .unwrap()
            .with("act", "online");
        a.send_internal(&cluster, Vec::new()).await.unwrap();
        a.send_handle(&"with a pipe", pipe_end(), HandleType::NetSocket)
            .await
            .unwrap();
        // Queued behind the handle (`send` would wait here for b's ACK).
        a.sender()
            .feed(Lane::User, &"after the handle", Vec::new())
            .await
            .unwrap();

        let user = b.recv().await.unwrap().unwrap();
        assert_eq!(user.lane(), Lane::User);
        assert_eq!(user.payload(), br#"{"n":[1,2],"text":"line\nbreak"}"#);
        let control = b.recv().await.unwrap().unwrap();
        assert_eq!(
            (control.lane(), control.internal().unwrap()),
            (Lane::Control, cluster)
        );
        let mut handle = b.recv().await.unwrap().unwrap();
        assert_eq!(handle.decode::<String>().unwrap(), "with a pipe");
        assert_eq!(handle.handle_type(), Some(HandleType::NetSocket));
        assert_eq!(handle.take_fds().len(), 1);
        // `a` reads b's acknowledgement, which releases the held-back message.
        let after = tokio::select! {
            other = a.recv() => panic!("b sent nothing but the ACK: {other:?}"),
            after = b.recv() => after.unwrap().unwrap(),
        };
        assert_eq!(after.decode::<&str>().unwrap(), "after the handle");
    });
}

#[test]
fn later_messages_wait_for_the_acknowledgement_of_a_handle() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        channel.send_with_fds(&1, vec![pipe_end()]).await.unwrap();
        channel
            .sender()
            .feed(Lane::User, &2, Vec::new())
            .await
            .unwrap();
        let (text, fds) = raw_read(&raw);
        assert_eq!(
            text,
            "{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":1}\n"
        );
        assert_eq!(fds.len(), 1, "the descriptor rides on the handle's line");
        assert!(nothing_to_read(&raw), "2 is held back until the ACK");
        (&raw)
            .write_all(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n\"bye\"\n")
            .unwrap();
        let bye = channel.recv().await.unwrap().unwrap();
        assert_eq!(bye.decode::<String>().unwrap(), "bye");
        assert_eq!(raw_read(&raw).0, "2\n");
    });
}

#[test]
fn a_refused_handle_is_sent_again_with_its_descriptor() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        channel.send_with_fds(&"h", vec![pipe_end()]).await.unwrap();
        assert_eq!(raw_read(&raw).1.len(), 1);
        (&raw)
            .write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n\"x\"\n")
            .unwrap();
        assert!(channel.recv().await.unwrap().is_some());
        let (text, fds) = raw_read(&raw);
        assert!(text.starts_with("{\"cmd\":\"NODE_HANDLE\""), "{text}");
        assert_eq!(fds.len(), 1);
    });
}

#[test]
fn a_handle_refused_past_the_retries_is_reported_with_its_message_and_the_channel_goes_on() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        channel
            .send_with_fds(&"conn 7", vec![pipe_end()])
            .await
            .unwrap();
        // Refused every time: sent once and retransmitted up to Node's limit.
        loop {
            let (text, _) = raw_read(&raw);
            assert!(text.starts_with("{\"cmd\":\"NODE_HANDLE\""), "{text}");
            // A message after each NACK, so that `recv` returns once it is read.
            (&raw)
                .write_all(b"{\"cmd\":\"NODE_HANDLE_NACK\"}\n\"tick\"\n")
                .unwrap();
            match channel.recv().await {
                Err(Error::HandleDropped { attempts, message }) => {
                    assert_eq!(attempts, node_link::MAX_RETRANSMISSIONS + 1);
                    assert_eq!(message.decode::<String>().unwrap(), "conn 7");
                    let tick = channel.recv().await.unwrap().unwrap();
                    assert_eq!(tick.decode::<String>().unwrap(), "tick");
                    break;
                }
                Ok(Some(tick)) => assert_eq!(tick.decode::<String>().unwrap(), "tick"),
                other => panic!("{other:?}"),
            }
        }
        (&raw).write_all(b"\"still here\"\n").unwrap();
        let next = channel.recv().await.unwrap().unwrap();
        assert_eq!(next.decode::<String>().unwrap(), "still here");
    });
}

#[test]
fn a_handle_line_without_its_descriptor_is_answered_nack_and_dropped() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        (&raw)
            .write_all(b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":1}\n2\n")
            .unwrap();
        let next = channel.recv().await.unwrap().unwrap();
        assert_eq!(next.decode::<u32>().unwrap(), 2);
        assert_eq!(raw_read(&raw).0, "{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
    });
}

#[test]
fn a_line_that_is_no_json_loses_only_itself() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        (&raw).write_all(b"{oops\n\"fine\"\n").unwrap();
        let bad = channel.recv().await.unwrap().unwrap();
        assert!(matches!(
            bad.decode::<serde_json::Value>(),
            Err(Error::DecodeJson { .. })
        ));
        let good = channel.recv().await.unwrap().unwrap();
        assert_eq!(good.decode::<String>().unwrap(), "fine");
        drop(raw);
        assert!(channel.recv().await.unwrap().is_none());
    });
}

#[test]
fn a_peer_in_advanced_serialization_is_told_apart() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        (&raw)
            .write_all(&[0, 0, 0, 5, 0xff, 0x0f, 0x22, 1, b'x'])
            .unwrap();
        let err = channel.recv().await.unwrap_err();
        assert!(matches!(err, Error::NotNodeJson { .. }), "{err:?}");
        assert!(err.to_string().contains("'advanced'"), "{err}");
    });
}

#[test]
fn an_unfinished_line_at_the_end_is_an_error_and_json_refuses_wrong_lanes() {
    runtime().block_on(async {
        let (mut channel, mut raw) = with_raw_peer();
        let err = channel
            .send(&serde_json::json!({"cmd": "NODE_X"}))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidNodeMessage(_)), "{err:?}");
        let err = channel
            .send_with_fds(&1, vec![pipe_end(), pipe_end()])
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::TooManyFds { count: 2, max: 1 }),
            "{err:?}"
        );
        raw.write_all(b"\"half").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let err = channel.recv().await.unwrap_err();
        assert!(
            matches!(err, Error::UnexpectedEof { buffered: 5 }),
            "{err:?}"
        );
        drop(channel);
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
}

#[test]
fn hello_works_on_json_channels() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair_with(&json()).expect("pair");
        let (x, y) = tokio::join!(a.hello("jobs", 1), b.hello("jobs", 2));
        assert!(matches!(x, Err(Error::ProtocolMismatch { .. })), "{x:?}");
        assert!(matches!(y, Err(Error::ProtocolMismatch { .. })), "{y:?}");
    });
}

#[test]
fn a_peer_that_sends_handles_and_never_reads_the_answers_ends_the_channel() {
    runtime().block_on(async {
        let (mut channel, raw) = with_raw_peer();
        // The peer writes NODE_HANDLE lines without their descriptor, each answered by a
        // NACK it never reads, until the channel is gone.
        let flood = std::thread::spawn(move || {
            let lines = b"{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":1}\n".repeat(512);
            let mut sent = 0usize;
            while (&raw).write_all(&lines).is_ok() {
                sent += 512;
            }
            sent
        });
        let ended = tokio::time::timeout(std::time::Duration::from_secs(60), channel.recv())
            .await
            .expect("the channel ends instead of answering without bound");
        let err = ended.unwrap_err();
        assert!(
            matches!(err, Error::PeerNotReading { unwritten } if unwritten == node_link::MAX_UNWRITTEN_ANSWERS),
            "{err:?}"
        );
        assert!(err.to_string().contains("does not read its acknowledgements"), "{err}");
        {
            let link = json_link(&channel.receiver).lock();
            assert_eq!(link.unwritten_answers(), node_link::MAX_UNWRITTEN_ANSWERS);
            // Only the bounded answers wait in memory, nothing else.
            assert!(
                link.buf.len() <= node_link::MAX_UNWRITTEN_ANSWERS * crate::json::NACK_LINE.len(),
                "{} bytes unwritten",
                link.buf.len()
            );
        }
        assert!(matches!(channel.recv().await, Err(Error::Broken)));
        assert!(matches!(channel.send(&1).await, Err(Error::Closed)));
        drop(channel);
        let sent = flood.join().expect("the flood thread");
        assert!(sent > node_link::MAX_UNWRITTEN_ANSWERS, "{sent} lines");
    });
}

/// The raw peer's side of a handle: reads the handle line, writes `reply`, then returns
/// everything it reads until `until` ends it.
fn raw_peer_answering(
    raw: StdUnixStream,
    reply: &'static [u8],
    until: &'static str,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let (text, fds) = raw_read(&raw);
        assert!(text.starts_with("{\"cmd\":\"NODE_HANDLE\""), "{text}");
        assert_eq!(fds.len(), 1);
        (&raw).write_all(reply).unwrap();
        let mut got = String::new();
        while !got.ends_with(until) {
            got += &raw_read(&raw).0;
        }
        got
    })
}

#[test]
fn a_sender_reads_the_acknowledgement_itself_and_keeps_what_came_for_the_receiver() {
    runtime().block_on(async {
        let (channel, raw) = with_raw_peer();
        let (mut tx, mut rx) = channel.into_split();
        let peer = raw_peer_answering(
            raw,
            b"\"first\"\n{\"cmd\":\"NODE_HANDLE_ACK\"}\n\"second\"\n",
            "2\n",
        );
        tx.send_with_fds(&0, vec![pipe_end()]).await.unwrap();
        // Held behind the handle: `send` reads the ACK itself, nobody calls recv.
        tx.send(&1).await.unwrap();
        tx.send(&2).await.unwrap();
        assert_eq!(peer.join().expect("the peer"), "1\n2\n");
        for want in ["first", "second"] {
            let got = rx.recv().await.unwrap().expect("a message");
            assert_eq!(got.decode::<String>().unwrap(), want);
        }
    });
}

#[test]
fn a_sender_without_its_receiver_still_reads_acknowledgements() {
    runtime().block_on(async {
        let (channel, raw) = with_raw_peer();
        let (mut tx, rx) = channel.into_split();
        drop(rx);
        let peer = raw_peer_answering(raw, b"\"dropped\"\n{\"cmd\":\"NODE_HANDLE_ACK\"}\n", "1\n");
        tx.send_with_fds(&0, vec![pipe_end()]).await.unwrap();
        tx.send(&1).await.unwrap();
        assert_eq!(peer.join().expect("the peer"), "1\n");
    });
}

#[test]
fn what_a_waiting_sender_reads_is_bounded_and_waits_for_recv() {
    runtime().block_on(async {
        let (ours, raw) = StdUnixStream::pair().expect("socketpair");
        let config = json().hold_back(2, 1024);
        let channel = Channel::from_fd_with(ours.into(), &config).expect("channel");
        let (mut tx, mut rx) = channel.into_split();
        let link = Arc::clone(json_link(&rx));
        let peer = raw_peer_answering(
            raw,
            b"\"a\"\n\"b\"\n\"c\"\n{\"cmd\":\"NODE_HANDLE_ACK\"}\n",
            "1\n",
        );
        tx.send_with_fds(&0, vec![pipe_end()]).await.unwrap();
        let sending = async { tx.send(&1).await.unwrap() };
        let receiving = async {
            // The sender reads until its inbox for us is full (two messages), then waits.
            while link.lock().inbox_len() < 2 {
                tokio::task::yield_now().await;
            }
            let mut got = Vec::new();
            for _ in 0..3 {
                assert!(link.lock().inbox_len() <= 2);
                let msg = rx.recv().await.unwrap().expect("a message");
                got.push(msg.decode::<String>().unwrap());
            }
            got
        };
        let ((), got) = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(sending, receiving)
        })
        .await
        .expect("the sender goes on once recv took messages");
        assert_eq!(got, ["a", "b", "c"]);
        assert_eq!(peer.join().expect("the peer"), "1\n");
    });
}
