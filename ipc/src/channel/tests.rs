//! Tests of the channel over real socketpairs in one process.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use bytes::BytesMut;
use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;
use crate::codec::Lane;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    Ping(u32),
    Text(String),
    Blob(#[serde(with = "serde_bytes")] Vec<u8>),
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// The capacity of a postcard sender's write buffer.
fn written_capacity(sender: &Sender) -> usize {
    match &sender.writer {
        Writer::Postcard(postcard) => postcard.buf.capacity(),
        Writer::Json(_) => panic!("a postcard channel"),
    }
}

/// The identity of an open file: (device, inode).
fn identity(fd: impl AsFd) -> (u64, u64) {
    let st = nix::sys::stat::fstat(fd).expect("fstat");
    (st.st_dev, st.st_ino)
}

/// Makes `n` pipes and returns their write ends with their identities. The read ends are
/// dropped: only the identity matters.
fn pipe_fds(n: usize) -> (Vec<OwnedFd>, Vec<(u64, u64)>) {
    (0..n)
        .map(|_| {
            let (_read, write) = std::io::pipe().expect("pipe");
            let fd = OwnedFd::from(write);
            let id = identity(&fd);
            (fd, id)
        })
        .unzip()
}

/// A channel whose peer is a plain blocking socket, to write arbitrary bytes and
/// descriptors at it.
fn channel_with_raw_peer(config: &Config) -> (Channel, StdUnixStream) {
    let (ours, theirs) = StdUnixStream::pair().expect("socketpair");
    (
        Channel::from_fd_with(ours.into(), config).expect("channel"),
        theirs,
    )
}

fn raw_send(sock: &StdUnixStream, bytes: &[u8], fds: &[RawFd]) {
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let mut sent = 0;
    while sent < bytes.len() {
        let cm = if sent == 0 { cmsgs } else { &[] };
        sent += sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(&bytes[sent..])],
            cm,
            MsgFlags::empty(),
            None,
        )
        .expect("sendmsg");
    }
}

fn frame_bytes(lane: Lane, fd_count: usize, msg: &Msg) -> BytesMut {
    let mut buf = BytesMut::new();
    FrameCodec::default()
        .encode(lane, fd_count, msg, &mut buf)
        .expect("encode");
    buf
}

#[test]
fn both_lanes_both_directions_from_split_halves() {
    runtime().block_on(async {
        let (a, b) = Channel::pair().unwrap();
        let (mut a_tx, mut a_rx) = a.into_split();
        let (mut b_tx, mut b_rx) = b.into_split();
        let echo = tokio::spawn(async move {
            while let Some(msg) = b_rx.recv().await.unwrap() {
                match msg.lane() {
                    Lane::User => b_tx.send(&msg.decode::<Msg>().unwrap()).await.unwrap(),
                    Lane::Control => b_tx
                        .send_control(&(msg.decode::<u64>().unwrap() + 1), Vec::new())
                        .await
                        .unwrap(),
                }
            }
        });
        a_tx.send(&Msg::Text("hi".into())).await.unwrap();
        a_tx.send_control(&41u64, Vec::new()).await.unwrap();
        let first = a_rx.recv().await.unwrap().unwrap();
        assert_eq!(first.lane(), Lane::User);
        assert_eq!(first.decode::<Msg>().unwrap(), Msg::Text("hi".into()));
        let second = a_rx.recv().await.unwrap().unwrap();
        assert_eq!(second.lane(), Lane::Control);
        assert_eq!(second.decode::<u64>().unwrap(), 42);
        a_tx.shutdown().await.unwrap();
        echo.await.unwrap();
        assert!(a_rx.recv().await.unwrap().is_none(), "clean end of stream");
    });
}

#[test]
fn fed_messages_go_in_one_write_and_come_out_of_the_buffer() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair().unwrap();
        for i in 0..3 {
            a.sender()
                .feed(Lane::User, &Msg::Ping(i), Vec::new())
                .await
                .unwrap();
        }
        assert!(
            b.receiver().recv_buffered().unwrap().is_none(),
            "nothing read yet"
        );
        a.sender().flush().await.unwrap();
        let first = b.recv().await.unwrap().unwrap();
        assert_eq!(first.decode::<Msg>().unwrap(), Msg::Ping(0));
        // One read took the whole batch: the rest is already buffered.
        for i in 1..3 {
            let next = b.receiver().recv_buffered().unwrap().expect("buffered");
            assert_eq!(next.decode::<Msg>().unwrap(), Msg::Ping(i));
        }
        assert!(b.receiver().recv_buffered().unwrap().is_none());
    });
}

#[test]
fn oversized_send_is_refused_and_the_channel_goes_on() {
    runtime().block_on(async {
        let config = Config::new().max_frame_len(64);
        let (mut a, mut b) = Channel::pair_with(&config).unwrap();
        let err = a.send(&Msg::Blob(vec![7; 100])).await.unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { len: 102, max: 64 }),
            "{err:?}"
        );
        a.send(&Msg::Ping(1)).await.unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.decode::<Msg>().unwrap(), Msg::Ping(1));
    });
}

#[test]
fn oversized_receive_is_a_typed_error_then_broken() {
    runtime().block_on(async {
        let (mut small, peer) = channel_with_raw_peer(&Config::new().max_frame_len(16));
        raw_send(
            &peer,
            &frame_bytes(Lane::User, 0, &Msg::Blob(vec![0; 32])),
            &[],
        );
        let err = small.recv().await.unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { len: 34, max: 16 }),
            "{err:?}"
        );
        assert!(matches!(small.recv().await, Err(Error::Broken)));
    });
}

#[test]
fn a_payload_that_does_not_decode_loses_nothing_else() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair().unwrap();
        a.send(&"not a Msg variant tag \u{ff}").await.unwrap();
        a.send(&Msg::Ping(9)).await.unwrap();
        let bad = b.recv().await.unwrap().unwrap();
        assert!(matches!(
            bad.decode::<Msg>(),
            Err(Error::Decode {
                lane: Lane::User,
                ..
            })
        ));
        let good = b.recv().await.unwrap().unwrap();
        assert_eq!(good.decode::<Msg>().unwrap(), Msg::Ping(9));
    });
}

#[test]
fn end_of_stream_inside_a_frame_is_an_error() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        let bytes = frame_bytes(Lane::User, 0, &Msg::Text("cut short".into()));
        raw_send(&peer, &bytes[..bytes.len() - 3], &[]);
        drop(peer);
        let err = ours.recv().await.unwrap_err();
        // 17-byte frame, 14 sent: the 6-byte header was taken, 8 payload bytes wait.
        assert!(
            matches!(err, Error::UnexpectedEof { buffered: 8 }),
            "{err:?}"
        );
    });
}

#[test]
fn a_frame_whose_fds_never_came_is_an_error() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        raw_send(&peer, &frame_bytes(Lane::Control, 2, &Msg::Ping(0)), &[]);
        let err = ours.recv().await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::MissingFds {
                    declared: 2,
                    received: 0
                }
            ),
            "{err:?}"
        );
    });
}

#[test]
fn too_many_fds_in_one_message_is_control_truncated() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::new().max_fds(2));
        let (fds, _) = pipe_fds(5);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        raw_send(&peer, &frame_bytes(Lane::User, 0, &Msg::Ping(0)), &raw);
        let err = ours.recv().await.unwrap_err();
        assert!(matches!(err, Error::ControlTruncated), "{err:?}");
    });
}

#[test]
fn descriptors_no_frame_claims_are_an_error() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::new().max_fds(2));
        let (fds, _) = pipe_fds(2);
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        // Frames that declare no descriptors but bring two each.
        for _ in 0..3 {
            raw_send(&peer, &frame_bytes(Lane::User, 0, &Msg::Ping(0)), &raw);
        }
        let err = ours.recv().await.unwrap_err();
        assert!(matches!(err, Error::UnclaimedFds { count: 2 }), "{err:?}");
        assert!(matches!(ours.recv().await, Err(Error::Broken)));
    });
}

#[test]
fn a_descriptor_on_a_frame_that_declares_none_is_caught_at_that_frame() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        let (stray, _) = pipe_fds(1);
        let (own, _) = pipe_fds(1);
        raw_send(
            &peer,
            &frame_bytes(Lane::User, 0, &Msg::Ping(1)),
            &[stray[0].as_raw_fd()],
        );
        raw_send(
            &peer,
            &frame_bytes(Lane::User, 1, &Msg::Ping(2)),
            &[own[0].as_raw_fd()],
        );
        // Without the check, Ping(1) comes out clean and Ping(2) gets the stray descriptor.
        let err = ours.recv().await.unwrap_err();
        assert!(matches!(err, Error::UnclaimedFds { count: 1 }), "{err:?}");
        assert!(matches!(ours.recv().await, Err(Error::Broken)));
    });
}

#[test]
fn stray_descriptors_before_the_end_of_stream_are_an_error() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        let (stray, _) = pipe_fds(1);
        let mut bytes = frame_bytes(Lane::User, 0, &Msg::Ping(1));
        bytes.extend_from_slice(&frame_bytes(Lane::User, 0, &Msg::Ping(2)));
        raw_send(&peer, &bytes, &[stray[0].as_raw_fd()]);
        drop(peer);
        let mut results = Vec::new();
        loop {
            let result = ours.recv().await;
            let done = !matches!(result, Ok(Some(_)));
            results.push(result.map(|m| m.map(|m| m.decode::<Msg>().unwrap())));
            if done {
                break;
            }
        }
        assert!(
            matches!(results.last(), Some(Err(Error::UnclaimedFds { count: 1 }))),
            "{results:?}"
        );
    });
}

#[test]
fn a_json_peer_is_told_apart_from_an_oversized_frame() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        // What a Node parent writes on its channel.
        raw_send(&peer, b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n", &[]);
        let err = ours.recv().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::ForeignProtocol { .. }), "{err:?}");
        assert!(
            text.starts_with("the peer speaks another protocol") && text.contains("JSON"),
            "{text}"
        );
        // After a first good frame, a gigantic length is an oversized frame as before.
        let (mut ours, peer) = channel_with_raw_peer(&Config::new().max_frame_len(16));
        raw_send(&peer, &frame_bytes(Lane::User, 0, &Msg::Ping(1)), &[]);
        raw_send(&peer, &[0xff, 0xff, 0xff, 0xff, 0, 0], &[]);
        assert!(ours.recv().await.unwrap().is_some());
        let err = ours.recv().await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
    });
}

/// A message that serializes to `len` u64s without holding them.
struct Endless {
    len: usize,
}

impl Serialize for Endless {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq((0..self.len).map(|_| u64::MAX))
    }
}

#[test]
fn a_refused_oversized_send_allocates_no_more_than_the_limit() {
    runtime().block_on(async {
        const LIMIT: usize = 1024 * 1024;
        let config = Config::new().max_frame_len(LIMIT as u32);
        let (mut a, mut b) = Channel::pair_with(&config).unwrap();
        // 64 MiB of varints, produced on the fly.
        let err = a.send(&Endless { len: 6 << 20 }).await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
        assert!(
            written_capacity(&a.sender) <= 2 * LIMIT,
            "{} bytes kept",
            written_capacity(&a.sender)
        );
        // One slice far over the limit is refused without copying it.
        let blob = Msg::Blob(vec![0; 8 * LIMIT]);
        let err = a.send(&blob).await.unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { .. }), "{err:?}");
        assert!(
            written_capacity(&a.sender) <= 2 * LIMIT,
            "{} bytes kept",
            written_capacity(&a.sender)
        );
        a.send(&Msg::Ping(1)).await.unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.decode::<Msg>().unwrap(), Msg::Ping(1));
    });
}

#[test]
fn a_large_message_leaves_no_large_buffer_behind() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair().unwrap();
        let big = Msg::Blob(vec![5; 15 << 20]);
        let (sent, got) = tokio::join!(a.send(&big), b.recv());
        sent.unwrap();
        assert_eq!(got.unwrap().unwrap().decode::<Msg>().unwrap(), big);
        // A small message afterwards, so each buffer has been reused once.
        a.send(&Msg::Ping(1)).await.unwrap();
        let got = b.recv().await.unwrap().unwrap();
        assert_eq!(got.decode::<Msg>().unwrap(), Msg::Ping(1));
        drop(got);
        let ReceiveSide::Postcard(postcard) = &b.receiver.side else {
            panic!("a postcard channel");
        };
        let kept = (written_capacity(&a.sender), postcard.inbound.buf.capacity());
        assert!(
            kept.0 <= RETAINED_BUFFER && kept.1 <= RETAINED_BUFFER,
            "buffers kept after a 15 MiB message: {kept:?}"
        );
    });
}

#[test]
fn too_many_fds_to_send_is_refused_before_writing() {
    runtime().block_on(async {
        let (mut a, _b) = Channel::pair_with(&Config::new().max_fds(1)).unwrap();
        let (fds, _) = pipe_fds(2);
        let err = a.send_with_fds(&Msg::Ping(0), fds).await.unwrap_err();
        assert!(
            matches!(err, Error::TooManyFds { count: 2, max: 1 }),
            "{err:?}"
        );
    });
}

#[test]
fn cancelled_recv_loses_nothing() {
    runtime().block_on(async {
        let (mut ours, peer) = channel_with_raw_peer(&Config::default());
        let (fds, ids) = pipe_fds(1);
        let bytes = frame_bytes(Lane::User, 1, &Msg::Text("split".into()));
        raw_send(&peer, &bytes[..5], &[fds[0].as_raw_fd()]);
        // Poll recv once, with half a frame and its descriptor in the socket, then drop it.
        tokio::select! {
            biased;
            _ = ours.recv() => panic!("a half frame must not be delivered"),
            () = std::future::ready(()) => {}
        }
        raw_send(&peer, &bytes[5..], &[]);
        let mut got = ours.recv().await.unwrap().unwrap();
        assert_eq!(got.decode::<Msg>().unwrap(), Msg::Text("split".into()));
        let fds = got.take_fds();
        assert_eq!(fds.iter().map(identity).collect::<Vec<_>>(), ids);
    });
}

#[test]
fn send_waits_for_the_peer_and_a_cancelled_send_completes_on_flush() {
    runtime().block_on(async {
        let (mut a, mut b) = Channel::pair().unwrap();
        let blob = Msg::Blob(vec![1; 256 * 1024]);
        let mut sent = 0;
        // The socket buffer is far smaller than 64 MiB: sending must block at some point.
        let blocked = loop {
            assert!(sent < 256, "send never waited for the peer");
            tokio::select! {
                biased;
                r = a.send(&blob) => { r.unwrap(); sent += 1; }
                () = std::future::ready(()) => break true,
            }
        };
        assert!(blocked);
        let reader = tokio::spawn(async move {
            let mut count = 0;
            while let Some(msg) = b.recv().await.unwrap() {
                assert_eq!(msg.decode::<Msg>().unwrap(), Msg::Blob(vec![1; 256 * 1024]));
                count += 1;
            }
            count
        });
        // The cancelled message was wholly buffered; flushing writes the rest of it.
        a.sender().flush().await.unwrap();
        a.sender().shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent + 1);
    });
}

/// One message of a generated test sequence: lane, payload, how many descriptors.
fn arb_message() -> impl Strategy<Value = (Lane, Msg, usize)> {
    let lane = prop_oneof![Just(Lane::User), Just(Lane::Control)];
    let msg = prop_oneof![
        any::<u32>().prop_map(Msg::Ping),
        ".{0,20}".prop_map(Msg::Text),
        proptest::collection::vec(any::<u8>(), 0..70_000).prop_map(Msg::Blob),
    ];
    (lane, msg, prop_oneof![3 => Just(0usize), 2 => 1usize..=4])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Messages with and without descriptors, sent by the real sender, arrive in order
    /// with exactly their own descriptors.
    #[test]
    fn fds_arrive_with_their_own_message(messages in proptest::collection::vec(arb_message(), 1..40)) {
        runtime().block_on(async {
            let (a, mut b) = Channel::pair().unwrap();
            let (mut tx, _rx) = a.into_split();
            let mut expected = Vec::new();
            let mut outgoing = Vec::new();
            for (lane, msg, n) in &messages {
                let (fds, ids) = pipe_fds(*n);
                expected.push((*lane, msg.clone(), ids));
                outgoing.push((*lane, msg.clone(), fds));
            }
            let writer = tokio::spawn(async move {
                // Feed batches so several frames share one write, then flush.
                for (lane, msg, fds) in outgoing {
                    tx.feed(lane, &msg, fds).await.unwrap();
                }
                tx.flush().await.unwrap();
                tx.shutdown().await.unwrap();
            });
            for (lane, msg, ids) in expected {
                let mut got = b.recv().await.unwrap().expect("a message");
                prop_assert_eq!(got.lane(), lane);
                prop_assert_eq!(got.decode::<Msg>().unwrap(), msg);
                let fds = got.take_fds();
                prop_assert_eq!(fds.iter().map(identity).collect::<Vec<_>>(), ids);
            }
            prop_assert!(b.recv().await.unwrap().is_none());
            writer.await.unwrap();
            Ok(())
        })?;
    }

    /// The receiver's descriptor queue holds under any chunking of the byte stream, as
    /// long as each frame's descriptors come with its first byte.
    #[test]
    fn fds_survive_arbitrary_chunking(
        messages in proptest::collection::vec(arb_message(), 1..30),
        cuts in proptest::collection::vec(1usize..5000, 1..20),
    ) {
        runtime().block_on(async {
            let (mut ours, peer) = channel_with_raw_peer(&Config::default());
            let mut bytes = BytesMut::new();
            // (offset, descriptors) where a frame with descriptors starts.
            let mut fd_starts = Vec::new();
            let mut expected = Vec::new();
            for (lane, msg, n) in &messages {
                let (fds, ids) = pipe_fds(*n);
                if *n > 0 {
                    fd_starts.push((bytes.len(), fds));
                }
                bytes.extend_from_slice(&frame_bytes(*lane, *n, msg));
                expected.push((*lane, msg.clone(), ids));
            }
            let writer = std::thread::spawn(move || {
                let mut boundaries: Vec<usize> = fd_starts.iter().map(|(at, _)| *at).collect();
                let mut at = 0;
                for cut in cuts.iter().cycle() {
                    at += cut;
                    if at >= bytes.len() { break; }
                    boundaries.push(at);
                }
                boundaries.push(bytes.len());
                boundaries.sort_unstable();
                boundaries.dedup();
                let mut start = 0;
                let mut fd_starts = fd_starts.into_iter().peekable();
                for end in boundaries {
                    if end == start { continue; }
                    let owned = match fd_starts.peek() {
                        Some((at, _)) if *at == start => fd_starts.next().map(|(_, fds)| fds),
                        _ => None,
                    };
                    let raw: Vec<RawFd> = owned.iter().flatten().map(AsRawFd::as_raw_fd).collect();
                    raw_send(&peer, &bytes[start..end], &raw);
                    start = end;
                }
            });
            for (lane, msg, ids) in expected {
                let mut got = ours.recv().await.unwrap().expect("a message");
                prop_assert_eq!(got.lane(), lane);
                prop_assert_eq!(got.decode::<Msg>().unwrap(), msg);
                let fds = got.take_fds();
                prop_assert_eq!(fds.iter().map(identity).collect::<Vec<_>>(), ids);
            }
            writer.join().unwrap();
            prop_assert!(ours.recv().await.unwrap().is_none());
            Ok(())
        })?;
    }
}
