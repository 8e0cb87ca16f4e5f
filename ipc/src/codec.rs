//! The pure frame codec: bytes in, frames out, no I/O.
//!
//! Every message on a channel travels as one frame:
//!
//! ```text
//!  0               4        5        6                       6 + len
//!  +---------------+--------+--------+-----------------------+
//!  |      len      |  lane  |  fds   |        payload        |
//!  |   u32, BE     |   u8   |   u8   |      (len bytes)      |
//!  +---------------+--------+--------+-----------------------+
//! ```
//!
//! - `len` is the payload length, header excluded. A decoder rejects a length above its
//!   limit as soon as it has read the 6 header bytes, before it allocates anything for the
//!   payload.
//! - `lane` is [`Lane::User`] (0) or [`Lane::Control`] (1); any other value is an error.
//! - `fds` is how many file descriptors belong to the frame. They are not in the byte
//!   stream: they travel as one `SCM_RIGHTS` control message on the `sendmsg` that carries
//!   the first byte of the frame, and the receiver hands each frame that many descriptors
//!   from the queue of descriptors it has received, in order.
//! - `payload` is the message serialized with `postcard`.

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;

use crate::Error;

/// Bytes taken by the frame header.
pub const HEADER_LEN: usize = 6;

/// The default limit on a frame's payload: 16 MiB.
pub const DEFAULT_MAX_FRAME_LEN: u32 = 16 * 1024 * 1024;

/// Which of the two independent message streams of a channel a frame belongs to.
///
/// User messages are what applications exchange; control messages carry a protocol that a
/// library runs beside them on the same channel (as Node does with its `NODE_` messages),
/// so neither ever sees the other's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Lane {
    /// Application messages.
    User = 0,
    /// Internal protocol messages of a library layered on the channel.
    Control = 1,
}

impl Lane {
    fn from_byte(byte: u8) -> Result<Self, Error> {
        match byte {
            0 => Ok(Lane::User),
            1 => Ok(Lane::Control),
            other => Err(Error::UnknownLane(other)),
        }
    }
}

impl std::fmt::Display for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Lane::User => "user",
            Lane::Control => "control",
        })
    }
}

/// The decoded header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The lane the frame belongs to.
    pub lane: Lane,
    /// How many file descriptors the frame carries.
    pub fd_count: u8,
    /// Payload length in bytes.
    pub len: u32,
}

/// One decoded frame: its header and its payload bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The lane the frame belongs to.
    pub lane: Lane,
    /// How many file descriptors the frame carries.
    pub fd_count: u8,
    /// The serialized message.
    pub payload: bytes::Bytes,
}

#[derive(Debug, Clone, Copy)]
enum DecodeState {
    Head,
    Payload(FrameHeader),
}

/// Splits a byte stream into [`Frame`]s and encodes messages into frames.
///
/// A state machine over a `BytesMut`: [`decode`](FrameCodec::decode) returns `Ok(None)`
/// when it needs more bytes and never allocates for a payload longer than the limit.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_frame_len: u32,
    max_fds: u8,
    state: DecodeState,
}

impl Default for FrameCodec {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME_LEN, crate::DEFAULT_MAX_FDS)
    }
}

impl FrameCodec {
    /// A codec that accepts payloads of up to `max_frame_len` bytes carrying up to
    /// `max_fds` descriptors.
    pub fn new(max_frame_len: u32, max_fds: u8) -> Self {
        Self {
            max_frame_len,
            max_fds,
            state: DecodeState::Head,
        }
    }

    /// The payload limit of this codec.
    pub fn max_frame_len(&self) -> u32 {
        self.max_frame_len
    }

    /// Whether the decoder is between two frames (it has consumed no header of a frame it
    /// has not yet returned).
    pub fn is_between_frames(&self) -> bool {
        matches!(self.state, DecodeState::Head)
    }

    /// How many more bytes the frame being decoded needs before it is complete, given
    /// that `buffered` bytes are already in the buffer (a hint for how much to read).
    pub fn bytes_wanted(&self, buffered: usize) -> usize {
        let total = match self.state {
            DecodeState::Head => HEADER_LEN,
            DecodeState::Payload(header) => header.len as usize,
        };
        total.saturating_sub(buffered)
    }

    /// Decodes the next frame from the front of `src`.
    ///
    /// Returns `Ok(None)` when `src` does not hold a whole frame yet; what it holds stays
    /// there. An error leaves the stream unusable: the caller must stop decoding.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Error> {
        let header = match self.state {
            DecodeState::Payload(header) => header,
            DecodeState::Head => {
                if src.len() < HEADER_LEN {
                    return Ok(None);
                }
                let header = self.parse_header(&src[..HEADER_LEN])?;
                src.advance(HEADER_LEN);
                self.state = DecodeState::Payload(header);
                header
            }
        };
        let len = header.len as usize;
        if src.len() < len {
            // Room for the rest of this frame: bounded by the checked length.
            src.reserve(len - src.len());
            return Ok(None);
        }
        self.state = DecodeState::Head;
        Ok(Some(Frame {
            lane: header.lane,
            fd_count: header.fd_count,
            payload: src.split_to(len).freeze(),
        }))
    }

    fn parse_header(&self, head: &[u8]) -> Result<FrameHeader, Error> {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if len > self.max_frame_len {
            return Err(Error::FrameTooLarge {
                len: u64::from(len),
                max: self.max_frame_len,
            });
        }
        let lane = Lane::from_byte(head[4])?;
        let fd_count = head[5];
        if fd_count > self.max_fds {
            return Err(Error::TooManyFds {
                count: usize::from(fd_count),
                max: usize::from(self.max_fds),
            });
        }
        Ok(FrameHeader {
            lane,
            fd_count,
            len,
        })
    }

    /// Appends one frame holding `message` to `dst`.
    ///
    /// A message longer than the limit is refused as soon as encoding passes the limit, so it
    /// never takes more than about the limit in memory; the error's `len` is then the length
    /// reached when encoding stopped, not the whole message's. On error `dst` holds exactly
    /// what it held before (its capacity may have grown, up to the limit).
    pub fn encode<T: Serialize + ?Sized>(
        &self,
        lane: Lane,
        fd_count: usize,
        message: &T,
        dst: &mut BytesMut,
    ) -> Result<(), Error> {
        if fd_count > usize::from(self.max_fds) {
            return Err(Error::TooManyFds {
                count: fd_count,
                max: usize::from(self.max_fds),
            });
        }
        let start = dst.len();
        dst.put_bytes(0, HEADER_LEN);
        let mut flavor = BoundedFlavor {
            dst,
            room: self.max_frame_len as usize,
            wanted: 0,
        };
        let encoded = postcard::serialize_with_flavor(message, &mut flavor);
        let wanted = flavor.wanted;
        if let Err(source) = encoded {
            dst.truncate(start);
            return Err(if wanted > self.max_frame_len as usize {
                Error::FrameTooLarge {
                    len: wanted as u64,
                    max: self.max_frame_len,
                }
            } else {
                Error::Encode(source)
            });
        }
        let len = dst.len() - start - HEADER_LEN;
        let head = &mut dst[start..start + HEADER_LEN];
        head[..4].copy_from_slice(&(len as u32).to_be_bytes());
        head[4] = lane as u8;
        head[5] = fd_count as u8;
        Ok(())
    }
}

/// A postcard output flavor that appends to a `BytesMut` a slice at a time and stops as
/// soon as the payload would pass `room` bytes, before copying (or allocating for) the
/// slice that passes it: a refused message never costs more memory than the limit.
struct BoundedFlavor<'a> {
    dst: &'a mut BytesMut,
    /// Payload bytes still allowed.
    room: usize,
    /// Payload bytes asked for so far, including a refused slice.
    wanted: usize,
}

impl BoundedFlavor<'_> {
    fn take(&mut self, len: usize) -> postcard::Result<()> {
        self.wanted = self.wanted.saturating_add(len);
        if len > self.room {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.room -= len;
        Ok(())
    }
}

impl postcard::ser_flavors::Flavor for &mut BoundedFlavor<'_> {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.take(1)?;
        self.dst.put_u8(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.take(data.len())?;
        self.dst.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    enum Msg {
        Ping(u64),
        Text(String),
        Blob(#[serde(with = "serde_bytes")] Vec<u8>),
    }

    fn arb_msg() -> impl Strategy<Value = Msg> {
        prop_oneof![
            any::<u64>().prop_map(Msg::Ping),
            ".{0,40}".prop_map(Msg::Text),
            proptest::collection::vec(any::<u8>(), 0..3000).prop_map(Msg::Blob),
        ]
    }

    fn arb_lane() -> impl Strategy<Value = Lane> {
        prop_oneof![Just(Lane::User), Just(Lane::Control)]
    }

    fn encode_all(codec: &FrameCodec, frames: &[(Lane, usize, Msg)]) -> BytesMut {
        let mut buf = BytesMut::new();
        for (lane, fds, msg) in frames {
            codec.encode(*lane, *fds, msg, &mut buf).unwrap();
        }
        buf
    }

    /// Feeds `bytes` to a fresh decoder in chunks of the given sizes (cycled) and
    /// returns every frame decoded, or the first error.
    fn decode_chunked(
        codec: &mut FrameCodec,
        bytes: &[u8],
        chunks: &[usize],
    ) -> Result<Vec<Frame>, Error> {
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        let mut rest = bytes;
        let mut sizes = chunks.iter().copied().cycle();
        while !rest.is_empty() {
            let n = sizes.next().unwrap_or(rest.len()).clamp(1, rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(frame) = codec.decode(&mut buf)? {
                frames.push(frame);
            }
        }
        assert!(buf.is_empty(), "bytes left over after the last frame");
        Ok(frames)
    }

    #[track_caller]
    fn check_header(bytes: &[u8], expected: Result<FrameHeader, Error>) {
        let codec = FrameCodec::new(1024, 4);
        let got = codec.parse_header(bytes);
        assert_eq!(format!("{got:?}"), format!("{expected:?}"));
    }

    #[test]
    fn header_ok() {
        check_header(
            &[0, 0, 1, 0, 1, 2],
            Ok(FrameHeader {
                lane: Lane::Control,
                fd_count: 2,
                len: 256,
            }),
        );
    }

    #[test]
    fn header_too_long() {
        check_header(
            &[0, 0, 4, 1, 0, 0],
            Err(Error::FrameTooLarge {
                len: 1025,
                max: 1024,
            }),
        );
    }

    #[test]
    fn header_unknown_lane() {
        check_header(&[0, 0, 0, 1, 7, 0], Err(Error::UnknownLane(7)));
    }

    #[test]
    fn header_too_many_fds() {
        check_header(
            &[0, 0, 0, 1, 0, 5],
            Err(Error::TooManyFds { count: 5, max: 4 }),
        );
    }

    #[test]
    fn oversized_length_is_rejected_before_allocating() {
        let mut codec = FrameCodec::new(1024, 4);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0, 0][..]);
        let before = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(
            err,
            Error::FrameTooLarge {
                len: 0xffff_ffff,
                max: 1024
            }
        ));
        assert_eq!(buf.capacity(), before);
    }

    #[test]
    fn encode_too_large_leaves_buffer_untouched() {
        let codec = FrameCodec::new(8, 4);
        let mut buf = BytesMut::from(&b"abc"[..]);
        let err = codec
            .encode(Lane::User, 0, &Msg::Text("far too long".into()), &mut buf)
            .unwrap_err();
        assert!(matches!(err, Error::FrameTooLarge { len: 14, max: 8 }));
        assert_eq!(&buf[..], b"abc");
    }

    #[test]
    fn encode_too_many_fds_is_an_error() {
        let codec = FrameCodec::new(8, 1);
        let mut buf = BytesMut::new();
        let err = codec.encode(Lane::User, 2, &0u8, &mut buf).unwrap_err();
        assert!(matches!(err, Error::TooManyFds { count: 2, max: 1 }));
        assert!(buf.is_empty());
    }

    #[test]
    fn wire_layout_matches_the_diagram() {
        let codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(Lane::Control, 3, &300u16, &mut buf).unwrap();
        // postcard writes 300 as the varint ac 02.
        assert_eq!(&buf[..], &[0, 0, 0, 2, 1, 3, 0xac, 0x02]);
    }

    proptest! {
        #[test]
        fn round_trip_through_any_chunking(
            frames in proptest::collection::vec((arb_lane(), 0usize..=4, arb_msg()), 0..24),
            chunks in proptest::collection::vec(1usize..200, 1..16),
        ) {
            let mut codec = FrameCodec::new(1 << 20, 4);
            let bytes = encode_all(&codec, &frames);
            let decoded = decode_chunked(&mut codec, &bytes, &chunks).unwrap();
            prop_assert_eq!(decoded.len(), frames.len());
            for (frame, (lane, fds, msg)) in decoded.iter().zip(&frames) {
                prop_assert_eq!(frame.lane, *lane);
                prop_assert_eq!(usize::from(frame.fd_count), *fds);
                prop_assert_eq!(&postcard::from_bytes::<Msg>(&frame.payload).unwrap(), msg);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_nor_overallocate(
            bytes in proptest::collection::vec(any::<u8>(), 0..4096),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let limit = 512u32;
            let mut codec = FrameCodec::new(limit, 4);
            let mut buf = BytesMut::new();
            let mut sizes = chunks.iter().copied().cycle();
            let mut rest = &bytes[..];
            'feed: while !rest.is_empty() {
                let n = sizes.next().unwrap().min(rest.len());
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(frame)) => prop_assert!(frame.payload.len() <= limit as usize),
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                    // The decoder only reserves room for one checked frame; a decoder that
                    // trusted an unchecked length would reserve up to 4 GiB here.
                    prop_assert!(buf.capacity() <= 4 * (limit as usize + HEADER_LEN + 64));
                }
            }
        }

        #[test]
        fn any_length_over_the_limit_is_rejected(len in 1025u32.., lane in 0u8..2) {
            let mut codec = FrameCodec::new(1024, 4);
            let mut buf = BytesMut::new();
            buf.put_u32(len);
            buf.put_u8(lane);
            buf.put_u8(0);
            let is_too_large = matches!(codec.decode(&mut buf), Err(Error::FrameTooLarge { .. }));
            prop_assert!(is_too_large);
        }
    }
}
