//! The channel: a connected Unix stream socket, a sending half and a receiving half.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::codec::{FrameCodec, HEADER_LEN, Lane};
use crate::{Error, sys};

/// The environment variable through which a parent tells a child which inherited
/// descriptor is its channel: the decimal descriptor number, such as `3`.
///
/// It plays the part of Node's `NODE_CHANNEL_FD`. [`Channel::from_env`] reads it.
pub const CHANNEL_FD_ENV: &str = "IPC_CHANNEL_FD";

/// The default limit on descriptors per message.
pub const DEFAULT_MAX_FDS: u8 = 32;

/// The kernel's limit on descriptors in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub const MAX_FDS_LIMIT: u8 = 253;

const READ_CHUNK: usize = 256 * 1024;
/// The most buffer capacity a sender or receiver keeps between messages: a buffer grown
/// past it for one large message is given back once that message is written or decoded.
pub(crate) const RETAINED_BUFFER: usize = 1024 * 1024;
/// A first frame length from which an oversized frame means a foreign peer: any text, such
/// as JSON, read as a header declares at least this much (its first byte is printable).
const FOREIGN_LEN: u64 = 1 << 28;
const DEFAULT_WRITE_BUFFER: usize = 256 * 1024;
const DEFAULT_SOCKET_SEND_BUFFER: usize = 4 * 1024 * 1024;

/// Limits and buffer sizes of a channel. Both ends should use the same limits.
#[derive(Debug, Clone)]
pub struct Config {
    max_frame_len: u32,
    max_fds: u8,
    write_buffer: usize,
    socket_send_buffer: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_len: crate::codec::DEFAULT_MAX_FRAME_LEN,
            max_fds: DEFAULT_MAX_FDS,
            write_buffer: DEFAULT_WRITE_BUFFER,
            socket_send_buffer: Some(DEFAULT_SOCKET_SEND_BUFFER),
        }
    }
}

impl Config {
    /// The default limits: 16 MiB frames, 32 descriptors per message, 256 KiB write
    /// buffer, 4 MiB socket send buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest payload, in bytes, that may be sent or received.
    pub fn max_frame_len(mut self, bytes: u32) -> Self {
        self.max_frame_len = bytes;
        self
    }

    /// The most descriptors one message may carry (at most [`MAX_FDS_LIMIT`]).
    pub fn max_fds(mut self, count: u8) -> Self {
        self.max_fds = count.min(MAX_FDS_LIMIT);
        self
    }

    /// How many bytes of small messages [`Sender::feed`] gathers before it writes them.
    pub fn write_buffer(mut self, bytes: usize) -> Self {
        self.write_buffer = bytes;
        self
    }

    /// The socket's send buffer (`SO_SNDBUF`), which bounds the bytes in flight towards
    /// the peer; `None` keeps the system default. The default, 4 MiB, lets large
    /// messages stream without a context switch every 200 KiB; the kernel caps it at
    /// `net.core.wmem_max`.
    pub fn socket_send_buffer(mut self, bytes: Option<usize>) -> Self {
        self.socket_send_buffer = bytes;
        self
    }

    fn codec(&self) -> FrameCodec {
        FrameCodec::new(self.max_frame_len, self.max_fds)
    }
}

/// A bidirectional message channel over a connected `AF_UNIX` `SOCK_STREAM` socket.
///
/// Use it whole, or split it with [`into_split`](Channel::into_split) to send and
/// receive from different tasks.
#[derive(Debug)]
pub struct Channel {
    sender: Sender,
    receiver: Receiver,
}

impl Channel {
    /// Two channels connected to each other, with default limits.
    ///
    /// Must be called within a tokio runtime.
    pub fn pair() -> Result<(Channel, Channel), Error> {
        Self::pair_with(&Config::default())
    }

    /// Two channels connected to each other.
    pub fn pair_with(config: &Config) -> Result<(Channel, Channel), Error> {
        let (a, b) = std::os::unix::net::UnixStream::pair()?;
        Ok((
            Self::from_fd_with(a.into(), config)?,
            Self::from_fd_with(b.into(), config)?,
        ))
    }

    /// A channel over `fd`, which must be a connected `AF_UNIX` `SOCK_STREAM` socket.
    ///
    /// Must be called within a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, Error> {
        Self::from_fd_with(fd, &Config::default())
    }

    /// A channel over `fd` with the given limits.
    pub fn from_fd_with(fd: OwnedFd, config: &Config) -> Result<Channel, Error> {
        let stream = std::os::unix::net::UnixStream::from(fd);
        stream.set_nonblocking(true)?;
        if let Some(bytes) = config.socket_send_buffer {
            // Capped by the kernel at net.core.wmem_max; a refusal is not an error.
            let _ =
                nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &bytes);
        }
        let io = Arc::new(UnixStream::from_std(stream)?);
        Ok(Channel {
            sender: Sender {
                io: Arc::clone(&io),
                codec: config.codec(),
                buf: BytesMut::new(),
                fds: Vec::new(),
                high_water: config.write_buffer,
                grown: false,
            },
            receiver: Receiver {
                io,
                codec: config.codec(),
                buf: BytesMut::new(),
                received: 0,
                batches: VecDeque::new(),
                control: sys::ControlBuffer::for_fds(usize::from(config.max_fds)),
                max_fds: usize::from(config.max_fds),
                seen_frame: false,
                eof: false,
                broken: false,
            },
        })
    }

    /// The channel this process inherited from its parent, if the parent gave it one.
    ///
    /// Reads [`CHANNEL_FD_ENV`]. Returns `Ok(None)` when it is not set, and an error when
    /// it does not name an open Unix stream socket or when the channel was already taken
    /// by an earlier call: there is only one. The descriptor is made close-on-exec, so
    /// this process's own children do not inherit it. The variable stays in the
    /// environment (changing the environment of a running multi-threaded process is not
    /// sound); a parent that starts further children should leave it out of their
    /// environment, as the `child` crate does.
    pub fn from_env() -> Result<Option<Channel>, Error> {
        Self::from_env_with(&Config::default())
    }

    /// [`from_env`](Channel::from_env) with the given limits.
    pub fn from_env_with(config: &Config) -> Result<Option<Channel>, Error> {
        let Some(value) = std::env::var_os(CHANNEL_FD_ENV) else {
            return Ok(None);
        };
        let invalid = |reason: String| Error::InvalidInherited {
            var: CHANNEL_FD_ENV,
            value: value.to_string_lossy().into_owned(),
            reason,
        };
        let raw = value
            .to_str()
            .and_then(|v| v.parse::<i32>().ok())
            .ok_or_else(|| invalid("not a descriptor number".into()))?;
        let fd = match sys::take_inherited(raw) {
            Ok(Some(fd)) => fd,
            Ok(None) => return Err(Error::AlreadyTaken),
            Err(reason) => return Err(invalid(reason)),
        };
        Self::from_fd_with(fd, config).map(Some)
    }

    /// Sends a user message. See [`Sender::send`].
    pub async fn send<T: Serialize + ?Sized>(&mut self, message: &T) -> Result<(), Error> {
        self.sender.send(message).await
    }

    /// Sends a user message carrying descriptors. See [`Sender::send_with_fds`].
    pub async fn send_with_fds<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        self.sender.send_with_fds(message, fds).await
    }

    /// Sends a control message. See [`Sender::send_control`].
    pub async fn send_control<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        self.sender.send_control(message, fds).await
    }

    /// Receives the next message of either lane. See [`Receiver::recv`].
    pub async fn recv(&mut self) -> Result<Option<Received>, Error> {
        self.receiver.recv().await
    }

    /// The sending half.
    pub fn sender(&mut self) -> &mut Sender {
        &mut self.sender
    }

    /// The receiving half.
    pub fn receiver(&mut self) -> &mut Receiver {
        &mut self.receiver
    }

    /// Splits the channel so that sending and receiving can go on in different tasks.
    /// The socket closes when both halves are dropped.
    pub fn into_split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }
}

/// The sending half of a [`Channel`].
///
/// # Back-pressure and buffering
///
/// A sender holds at most one write buffer (a few small messages, or one large one) and
/// never queues beyond it: when the socket is full, sending waits until the peer reads.
///
/// # Cancellation
///
/// Dropping a `send`/`feed`/`flush` future never corrupts the stream. A message is either
/// not sent at all (the future was dropped before it was encoded; its descriptors are
/// closed) or wholly in the write buffer, in which case any bytes not yet written go out
/// first on the next `send`, `feed` or `flush`. Bytes still buffered when the sender is
/// dropped are lost, so flush before dropping a sender that was fed or cancelled.
#[derive(Debug)]
pub struct Sender {
    io: Arc<UnixStream>,
    codec: FrameCodec,
    buf: BytesMut,
    /// Descriptors that belong to the frame at the start of `buf`.
    fds: Vec<OwnedFd>,
    high_water: usize,
    /// Whether `buf` grew past what it may keep (given back once it is written out).
    grown: bool,
}

impl Sender {
    /// Sends a message on the user lane and waits until the socket has taken it.
    pub async fn send<T: Serialize + ?Sized>(&mut self, message: &T) -> Result<(), Error> {
        self.feed(Lane::User, message, Vec::new()).await?;
        self.flush().await
    }

    /// Sends a message on the user lane with descriptors attached. The receiver gets its
    /// own copies; the ones given here are closed once sent.
    pub async fn send_with_fds<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        self.feed(Lane::User, message, fds).await?;
        self.flush().await
    }

    /// Sends a message on the control lane, optionally with descriptors.
    pub async fn send_control<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        self.feed(Lane::Control, message, fds).await?;
        self.flush().await
    }

    /// Adds a message to the write buffer, writing only when the buffer is full (or when
    /// the message carries descriptors and other bytes are ahead of it). Call
    /// [`flush`](Sender::flush) after the last one; a batch of small messages then costs
    /// one system call instead of one each.
    ///
    /// An oversized message or one with too many descriptors is refused with an error
    /// and nothing is written.
    pub async fn feed<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if !fds.is_empty() && !self.buf.is_empty() {
            // Descriptors must ride on the sendmsg that starts their frame.
            self.flush().await?;
        }
        let encoded = self.codec.encode(lane, fds.len(), message, &mut self.buf);
        self.grown |= self.buf.capacity() > self.high_water.max(RETAINED_BUFFER);
        if let Err(err) = encoded {
            self.give_back();
            return Err(err);
        }
        if !fds.is_empty() {
            self.fds = fds;
        }
        if self.buf.len() >= self.high_water {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything buffered, waiting for the socket to take it.
    pub async fn flush(&mut self) -> Result<(), Error> {
        while !self.buf.is_empty() {
            let (io, buf, fds) = (&self.io, &self.buf, &self.fds);
            let written = io
                .async_io(Interest::WRITABLE, || sys::send(io.as_fd(), buf, fds))
                .await?;
            // The kernel holds its own references to the descriptors now.
            self.fds.clear();
            self.buf.advance(written);
        }
        self.give_back();
        Ok(())
    }

    /// Drops a buffer grown for a large message once nothing is left in it.
    fn give_back(&mut self) {
        if self.grown && self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.grown = false;
        }
    }

    /// Flushes, then shuts down the writing side: the peer's receiver sees the end of
    /// the stream once it has read everything sent before.
    pub async fn shutdown(&mut self) -> Result<(), Error> {
        self.flush().await?;
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&*self.io),
            nix::sys::socket::Shutdown::Write,
        )
        .map_err(|e| Error::from(std::io::Error::from(e)))
    }
}

/// The receiving half of a [`Channel`].
///
/// # Cancellation
///
/// [`recv`](Receiver::recv) is cancel-safe: all state lives in the receiver, so dropping
/// the future loses no message and no descriptor; the next call picks up where it was.
#[derive(Debug)]
pub struct Receiver {
    io: Arc<UnixStream>,
    codec: FrameCodec,
    buf: BytesMut,
    /// Bytes read from the socket so far: the stream offset just past `buf`.
    received: u64,
    /// Received descriptors not yet handed to a frame, one batch per `recvmsg`, in order.
    batches: VecDeque<FdBatch>,
    control: sys::ControlBuffer,
    max_fds: usize,
    /// Whether a whole frame has been decoded (until then a bad header may mean a foreign
    /// peer).
    seen_frame: bool,
    eof: bool,
    broken: bool,
}

/// The descriptors of one `recvmsg` and the stream bytes `[start, end)` it read.
///
/// The peer sends a frame's descriptors with the frame's first byte, and Linux ends a read
/// after the chunk that carries descriptors, so their frame starts inside `[start, end)`.
#[derive(Debug)]
struct FdBatch {
    start: u64,
    end: u64,
    fds: Vec<OwnedFd>,
}

impl Receiver {
    /// Receives the next message of either lane, or `None` when the peer closed the
    /// channel cleanly between two messages.
    ///
    /// A framing error (oversized frame, a foreign peer's first bytes, unknown lane, missing
    /// or unclaimed descriptors, end of stream inside a frame) is returned once; afterwards every call returns
    /// [`Error::Broken`] and all queued descriptors are closed.
    pub async fn recv(&mut self) -> Result<Option<Received>, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let result = self.next_message().await;
        self.note(&result);
        result
    }

    /// Returns a message that was already read from the socket, without reading more:
    /// `Ok(None)` means nothing whole is buffered. With [`Sender::feed`], this lets a
    /// peer answer a whole batch of messages with one write.
    pub fn recv_buffered(&mut self) -> Result<Option<Received>, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let result = self.decode_buffered();
        self.note(&result);
        result
    }

    fn note<T>(&mut self, result: &Result<T, Error>) {
        if let Err(err) = result {
            if err.is_fatal_on_receive() {
                self.broken = true;
                self.batches.clear();
                self.buf = BytesMut::new();
            }
        }
    }

    fn decode_buffered(&mut self) -> Result<Option<Received>, Error> {
        let frame = match self.codec.decode(&mut self.buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            // An oversized first frame that is also gigantic or names no lane is not a
            // frame at all: the peer is no `ipc` channel (Node's JSON starts with `{"`).
            Err(Error::FrameTooLarge { len, max })
                if !self.seen_frame && (len >= FOREIGN_LEN || self.buf[4] > 1) =>
            {
                let mut head = [0; HEADER_LEN];
                head.copy_from_slice(&self.buf[..HEADER_LEN]);
                return Err(Error::ForeignProtocol { head, len, max });
            }
            Err(err) => return Err(err),
        };
        self.seen_frame = true;
        let end = self.received - self.buf.len() as u64;
        let start = end - (HEADER_LEN + frame.payload.len()) as u64;
        let fds = self.claim_fds(start, end, usize::from(frame.fd_count))?;
        if frame.payload.len() > RETAINED_BUFFER {
            // The payload shares the buffer's allocation: keep only the bytes after it, so
            // the large allocation goes away with the message.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok(Some(Received {
            lane: frame.lane,
            payload: frame.payload,
            fds,
        }))
    }

    /// The descriptors of the frame at stream bytes `[start, end)`, which declares
    /// `declared` of them.
    fn claim_fds(&mut self, start: u64, end: u64, declared: usize) -> Result<Vec<OwnedFd>, Error> {
        let Some(batch) = self.batches.front() else {
            return match declared {
                0 => Ok(Vec::new()),
                _ => Err(Error::MissingFds {
                    declared,
                    received: 0,
                }),
            };
        };
        let count = batch.fds.len();
        if batch.end <= start {
            // They came with bytes that all precede this frame, and no frame took them.
            return Err(Error::UnclaimedFds { count });
        }
        if batch.start > start {
            // They came after this frame's first byte: they belong to a later frame.
            return match declared {
                0 => Ok(Vec::new()),
                _ => Err(Error::MissingFds {
                    declared,
                    received: 0,
                }),
            };
        }
        // They came with this frame's first byte, so they are this frame's, unless a later
        // frame starts in the same read.
        match declared {
            0 if end < batch.end => Ok(Vec::new()),
            0 => Err(Error::UnclaimedFds { count }),
            _ if count < declared => Err(Error::MissingFds {
                declared,
                received: count,
            }),
            _ if count > declared => Err(Error::UnclaimedFds {
                count: count - declared,
            }),
            _ => Ok(self.batches.pop_front().map(|b| b.fds).unwrap_or_default()),
        }
    }

    async fn next_message(&mut self) -> Result<Option<Received>, Error> {
        loop {
            if let Some(received) = self.decode_buffered()? {
                return Ok(Some(received));
            }
            if self.eof {
                return if !(self.buf.is_empty() && self.codec.is_between_frames()) {
                    Err(Error::UnexpectedEof {
                        buffered: self.buf.len(),
                    })
                } else if !self.batches.is_empty() {
                    Err(Error::UnclaimedFds {
                        count: self.batches.iter().map(|b| b.fds.len()).sum(),
                    })
                } else {
                    Ok(None)
                };
            }
            // Descriptors come with the first byte of their frame, and every whole frame
            // was decoded above: more than one batch waiting, or more than one frame's worth
            // of descriptors, means the peer sent descriptors that no frame claims.
            let queued: usize = self.batches.iter().map(|b| b.fds.len()).sum();
            if queued > self.max_fds {
                return Err(Error::TooManyFds {
                    count: queued,
                    max: self.max_fds,
                });
            }
            if self.batches.len() > 1 {
                return Err(Error::UnclaimedFds {
                    count: self.batches[0].fds.len(),
                });
            }
            let want = self.codec.bytes_wanted(self.buf.len()).max(READ_CHUNK);
            let mut fds = Vec::new();
            let (io, buf, control) = (&self.io, &mut self.buf, &mut self.control);
            let received = io
                .async_io(Interest::READABLE, || {
                    sys::recv(io.as_fd(), buf, want, &mut fds, control)
                })
                .await?;
            match received {
                sys::Received::Bytes(0) => self.eof = true,
                sys::Received::Bytes(n) => {
                    let start = self.received;
                    self.received += n as u64;
                    if !fds.is_empty() {
                        self.batches.push_back(FdBatch {
                            start,
                            end: self.received,
                            fds,
                        });
                    }
                }
                sys::Received::ControlTruncated => return Err(Error::ControlTruncated),
            }
        }
    }
}

/// One received message: its lane, its still-encoded body and its descriptors.
///
/// Keeping the body encoded until [`decode`](Received::decode) lets a receiver route a
/// message by lane before choosing its type, and means a message that fails to decode
/// loses nothing else: the channel goes on.
#[derive(Debug)]
pub struct Received {
    lane: Lane,
    payload: Bytes,
    fds: Vec<OwnedFd>,
}

impl Received {
    /// The lane the message came on.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// The encoded body.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Decodes the body as a `T`.
    ///
    /// # Caveats
    ///
    /// postcard is not self-describing: the payload holds values, not their types, so a
    /// message of another type can decode without error as a `T` with wrong values (a
    /// `Request::Add { a, b }` sent by a peer can come out as a `Response::Sum(..)`, or a
    /// short message as an empty `String`). [`Error::Decode`] catches only bytes that fit no
    /// `T` at all. Both ends must agree on the types; [`Channel::hello`] checks a protocol
    /// name and version on both ends to find out when they do not.
    pub fn decode<'de, T: Deserialize<'de>>(&'de self) -> Result<T, Error> {
        postcard::from_bytes(&self.payload).map_err(|source| Error::Decode {
            lane: self.lane,
            source,
        })
    }

    /// The descriptors that came with the message.
    pub fn fds(&self) -> &[OwnedFd] {
        &self.fds
    }

    /// Takes the descriptors out of the message.
    pub fn take_fds(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.fds)
    }
}

#[cfg(test)]
mod tests;
