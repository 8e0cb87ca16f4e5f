//! The channel: a connected Unix stream socket, a sending half and a receiving half.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::UnixStream;

use crate::codec::{FrameCodec, HEADER_LEN, Lane};
use crate::json::{self, HandleType, InternalMessage, LineCodec, LineKind};
use crate::{Error, sys};

mod node_link;

use node_link::{HoldBack, Line, NodeLink};

/// The environment variable through which a parent tells a child which inherited
/// descriptor is its channel: the decimal descriptor number, such as `3`.
///
/// It plays the part of Node's `NODE_CHANNEL_FD` for a [`Format::Postcard`] channel.
/// [`Channel::from_env`] reads it.
pub const CHANNEL_FD_ENV: &str = "IPC_CHANNEL_FD";

/// Node's variable for the descriptor of a child's channel: a channel found through it
/// speaks [`Format::Json`].
pub const NODE_CHANNEL_FD_ENV: &str = "NODE_CHANNEL_FD";

/// Node's variable for the serialization of the channel in [`NODE_CHANNEL_FD_ENV`]: `json`
/// (or unset) is [`Format::Json`]; `advanced` is refused with
/// [`Error::UnsupportedSerialization`].
pub const NODE_CHANNEL_SERIALIZATION_MODE_ENV: &str = "NODE_CHANNEL_SERIALIZATION_MODE";

/// Which wire format a channel speaks. Both ends must speak the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Format {
    /// This crate's own frames (see the crate docs): a 6-byte header and a postcard
    /// payload, any number of descriptors per message. Fast and compact; not Node's.
    #[default]
    Postcard,
    /// Node's `serialization: 'json'`: one JSON value per line, at most one descriptor
    /// per message as a `NODE_HANDLE` (see [`json`](crate::json)). What a Node peer speaks.
    Json,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Postcard => "postcard frames",
            Format::Json => "Node JSON lines",
        })
    }
}

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
const DEFAULT_HOLD_BACK: HoldBack = HoldBack {
    messages: 1024,
    bytes: 16 * 1024 * 1024,
};

/// Limits and buffer sizes of a channel. Both ends should use the same limits.
#[derive(Debug, Clone)]
pub struct Config {
    max_frame_len: u32,
    max_fds: u8,
    write_buffer: usize,
    socket_send_buffer: Option<usize>,
    format: Format,
    hold_back: HoldBack,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_frame_len: crate::codec::DEFAULT_MAX_FRAME_LEN,
            max_fds: DEFAULT_MAX_FDS,
            write_buffer: DEFAULT_WRITE_BUFFER,
            socket_send_buffer: Some(DEFAULT_SOCKET_SEND_BUFFER),
            format: Format::Postcard,
            hold_back: DEFAULT_HOLD_BACK,
        }
    }
}

impl Config {
    /// The default limits: 16 MiB frames (or JSON lines), 32 descriptors per message, 256
    /// KiB write buffer, 4 MiB socket send buffer, [`Format::Postcard`], a hold-back queue of
    /// 1024 messages or 16 MiB.
    pub fn new() -> Self {
        Self::default()
    }

    /// The largest payload, in bytes, that may be sent or received: a frame's payload, or a
    /// JSON line without its newline.
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

    /// The wire format (default [`Format::Postcard`]).
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Bounds the queue of messages that a [`Format::Json`] sender holds back while a
    /// handle waits for the peer's `NODE_HANDLE_ACK` (defaults: 1024 messages, 16 MiB; one
    /// message is always taken). When it is full, sending waits for the acknowledgement.
    pub fn hold_back(mut self, messages: usize, bytes: usize) -> Self {
        self.hold_back = HoldBack {
            messages: messages.max(1),
            bytes,
        };
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
        let node = match config.format {
            Format::Postcard => None,
            Format::Json => Some(Arc::new(NodeLink::new(config.hold_back))),
        };
        Ok(Channel {
            sender: Sender {
                io: Arc::clone(&io),
                codec: config.codec(),
                buf: BytesMut::new(),
                fds: Vec::new(),
                high_water: config.write_buffer,
                grown: false,
                node: node.clone(),
            },
            receiver: Receiver {
                io,
                codec: config.codec(),
                node: node.map(|link| NodeReceive {
                    lines: LineCodec::new(config.max_frame_len),
                    link,
                }),
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
    /// Reads [`CHANNEL_FD_ENV`] (a [`Format::Postcard`] channel, from the `child` crate) or,
    /// when it is not set, Node's [`NODE_CHANNEL_FD_ENV`] (a [`Format::Json`] channel, from
    /// Node's `fork` or `spawn` with an `'ipc'` slot; a
    /// [`NODE_CHANNEL_SERIALIZATION_MODE_ENV`] other than `json` is
    /// [`Error::UnsupportedSerialization`]). Returns `Ok(None)` when neither is set, and an
    /// error when it does not name an open Unix stream socket or when the channel was
    /// already taken by an earlier call: there is only one. The format in `config` is
    /// replaced by the one the environment names. The descriptor is made close-on-exec, so
    /// this process's own children do not inherit it. The variable stays in the
    /// environment (changing the environment of a running multi-threaded process is not
    /// sound); a parent that starts further children should leave it out of their
    /// environment, as the `child` crate does.
    pub fn from_env() -> Result<Option<Channel>, Error> {
        Self::from_env_with(&Config::default())
    }

    /// [`from_env`](Channel::from_env) with the given limits.
    pub fn from_env_with(config: &Config) -> Result<Option<Channel>, Error> {
        let (var, value, format) = if let Some(value) = std::env::var_os(CHANNEL_FD_ENV) {
            (CHANNEL_FD_ENV, value, Format::Postcard)
        } else if let Some(value) = std::env::var_os(NODE_CHANNEL_FD_ENV) {
            let mode = std::env::var_os(NODE_CHANNEL_SERIALIZATION_MODE_ENV);
            match mode.as_ref().map(|m| m.to_string_lossy()) {
                None => {}
                Some(mode) if mode == "json" => {}
                Some(mode) => {
                    return Err(Error::UnsupportedSerialization {
                        mode: mode.into_owned(),
                    });
                }
            }
            (NODE_CHANNEL_FD_ENV, value, Format::Json)
        } else {
            return Ok(None);
        };
        let invalid = |reason: String| Error::InvalidInherited {
            var,
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
        Self::from_fd_with(fd, &config.clone().format(format)).map(Some)
    }

    /// The wire format this channel speaks.
    pub fn format(&self) -> Format {
        self.sender.format()
    }

    /// Sends an internal message of Node's protocol on the control lane. See
    /// [`Sender::send_internal`].
    pub async fn send_internal(
        &mut self,
        message: &InternalMessage,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        self.sender.send_internal(message, fds).await
    }

    /// Sends a user message with one descriptor of a given Node handle type. See
    /// [`Sender::send_handle`].
    pub async fn send_handle<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fd: OwnedFd,
        handle_type: HandleType,
    ) -> Result<(), Error> {
        self.sender.send_handle(message, fd, handle_type).await
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
    /// The write side of a [`Format::Json`] channel, shared with the receiver (which writes
    /// handle acknowledgements); `buf` and `fds` are unused then.
    node: Option<Arc<NodeLink>>,
}

impl Sender {
    /// The wire format this sender writes.
    pub fn format(&self) -> Format {
        match self.node {
            None => Format::Postcard,
            Some(_) => Format::Json,
        }
    }

    /// Sends an internal message of Node's protocol (such as `NODE_CLUSTER`) on the
    /// control lane, optionally with one descriptor. Only on a [`Format::Json`] channel:
    /// elsewhere it is [`Error::WrongFormat`].
    pub async fn send_internal(
        &mut self,
        message: &InternalMessage,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if self.node.is_none() {
            return Err(Error::WrongFormat {
                needed: Format::Json,
                actual: Format::Postcard,
            });
        }
        self.send_control(message, fds).await
    }

    /// Sends a user message with one descriptor, telling a Node peer what to make of it
    /// (the `type` of its `NODE_HANDLE` line: a `net.Server` for a listening socket, for
    /// example). [`send_with_fds`](Sender::send_with_fds) sends [`HandleType::NetNative`].
    /// On a [`Format::Postcard`] channel the type is not sent.
    pub async fn send_handle<T: Serialize + ?Sized>(
        &mut self,
        message: &T,
        fd: OwnedFd,
        handle_type: HandleType,
    ) -> Result<(), Error> {
        if self.node.is_none() {
            return self.send_with_fds(message, vec![fd]).await;
        }
        self.feed_json(Lane::User, message, Some(fd), handle_type)
            .await?;
        self.flush().await
    }

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
    ///
    /// # Node JSON channels
    ///
    /// On a [`Format::Json`] channel a message may carry one descriptor (sent as a
    /// [`HandleType::NetNative`] handle); a control message must be an object whose `cmd`
    /// starts with `NODE_`, and a user message must not be one
    /// ([`Error::InvalidNodeMessage`]). After a handle, later messages are held back until
    /// the peer's `NODE_HANDLE_ACK`, as Node does: `feed` and `send` return once a message
    /// is queued, and wait only when the hold-back queue ([`Config::hold_back`]) is full.
    /// The acknowledgement is read by the [`Receiver`]: keep receiving while sending
    /// handles (Node always reads).
    pub async fn feed<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        if self.node.is_some() {
            let mut fds = fds;
            if fds.len() > 1 {
                return Err(Error::TooManyFds {
                    count: fds.len(),
                    max: 1,
                });
            }
            return self
                .feed_json(lane, message, fds.pop(), HandleType::NetNative)
                .await;
        }
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

    /// [`feed`](Sender::feed) on a [`Format::Json`] channel.
    async fn feed_json<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fd: Option<OwnedFd>,
        handle_type: HandleType,
    ) -> Result<(), Error> {
        let Some(link) = self.node.clone() else {
            unreachable!("feed_json on a postcard channel");
        };
        let max = self.codec.max_frame_len();
        let handle = fd.as_ref().map(|_| handle_type);
        // The guard lives in plain blocks only: it must never be held across an await.
        let fast = {
            let mut state = link.lock();
            if handle.is_none() && state.is_open() {
                // The common case: straight into the write buffer, no copy.
                json::encode_line(lane, None, message, max, &mut state.buf)?;
                Some(state.buf.len() >= self.high_water)
            } else {
                None
            }
        };
        let full = match fast {
            Some(full) => full,
            None => {
                let mut bytes = BytesMut::new();
                json::encode_line(lane, handle, message, max, &mut bytes)?;
                let mut line = Line::new(bytes.freeze(), fd);
                loop {
                    let moved = link.moved.notified();
                    tokio::pin!(moved);
                    moved.as_mut().enable();
                    match link.enqueue(line)? {
                        Ok(buffered) => break handle.is_some() || buffered >= self.high_water,
                        Err(back) => line = back,
                    }
                    // Full: write what may go, then wait for an acknowledgement.
                    self.flush().await?;
                    moved.await;
                }
            }
        };
        if full {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything buffered, waiting for the socket to take it. On a
    /// [`Format::Json`] channel, messages held back behind a handle stay queued until the
    /// peer acknowledges it.
    pub async fn flush(&mut self) -> Result<(), Error> {
        if let Some(link) = &self.node {
            let io = &self.io;
            io.async_io(Interest::WRITABLE, || link.lock().write_some(io))
                .await?;
            return Ok(());
        }
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
    /// The line codec and the shared write side of a [`Format::Json`] channel.
    node: Option<NodeReceive>,
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

/// The receiving state of a [`Format::Json`] channel.
#[derive(Debug)]
struct NodeReceive {
    lines: LineCodec,
    link: Arc<NodeLink>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            // No acknowledgement will be read any more: a sender waiting for one must not
            // wait forever.
            node.link.lock().closed = true;
            node.link.moved.notify_waiters();
        }
    }
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
    /// The kernel could not install them (this process was out of descriptors): the frame
    /// that claims them gets none and says so ([`Received::fds_lost`]).
    lost: bool,
}

impl Receiver {
    /// The wire format this receiver reads.
    pub fn format(&self) -> Format {
        match self.node {
            None => Format::Postcard,
            Some(_) => Format::Json,
        }
    }

    /// Receives the next message of either lane, or `None` when the peer closed the
    /// channel cleanly between two messages.
    ///
    /// On a [`Format::Json`] channel this also runs Node's handle protocol: a
    /// `NODE_HANDLE` line is answered with `NODE_HANDLE_ACK` at once and delivered as its
    /// inner message with the descriptor (or answered `NODE_HANDLE_NACK` and dropped when
    /// the descriptor did not come, as Node does); the peer's answers to our handles are
    /// consumed here and release the messages held back behind them. A line that is not
    /// valid JSON is an [`Error::DecodeJson`] when decoded, for that message only.
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
                if let Some(node) = &self.node {
                    node.link.lock().closed = true;
                    node.link.moved.notify_waiters();
                }
                self.broken = true;
                self.batches.clear();
                self.buf = BytesMut::new();
            }
        }
    }

    fn decode_buffered(&mut self) -> Result<Option<Received>, Error> {
        if self.node.is_some() {
            return self.decode_line();
        }
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
        let (fds, fds_lost) = self.claim_fds(start, end, usize::from(frame.fd_count))?;
        if frame.payload.len() > RETAINED_BUFFER {
            // The payload shares the buffer's allocation: keep only the bytes after it, so
            // the large allocation goes away with the message.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok(Some(Received {
            lane: frame.lane,
            payload: frame.payload,
            fds,
            fds_lost,
            format: Format::Postcard,
            handle: None,
        }))
    }

    /// [`decode_buffered`](Receiver::decode_buffered) on a [`Format::Json`] channel.
    fn decode_line(&mut self) -> Result<Option<Received>, Error> {
        let Some(node) = &mut self.node else {
            unreachable!("decode_line on a postcard channel");
        };
        let link = Arc::clone(&node.link);
        loop {
            if let Some(attempts) = link.lock().take_dropped() {
                return Err(Error::HandleDropped { attempts });
            }
            let Some(node) = &mut self.node else {
                unreachable!("decode_line on a postcard channel");
            };
            let Some(line) = node.lines.decode(&mut self.buf)? else {
                return Ok(None);
            };
            let end = self.received - self.buf.len() as u64;
            let start = end - line.len() as u64 - 1;
            if line.len() > RETAINED_BUFFER {
                self.buf = BytesMut::from(&self.buf[..]);
            }
            let kind = json::classify(&line);
            let declared = usize::from(kind == LineKind::Handle);
            // A handle whose descriptor did not come (or was lost for lack of descriptors)
            // is refused with NACK below, and Node sends it again.
            let fds = match self.claim_fds(start, end, declared) {
                Err(Error::MissingFds { received: 0, .. }) => Vec::new(),
                other => other?.0,
            };
            let lane = match kind {
                LineKind::User => Lane::User,
                LineKind::Internal => Lane::Control,
                LineKind::Ack | LineKind::Nack => {
                    let mut state = link.lock();
                    let moved = match kind {
                        LineKind::Ack => state.acknowledged(),
                        _ => state.refused(),
                    };
                    drop(state);
                    if moved {
                        link.moved.notify_waiters();
                    }
                    self.write_answers(&link);
                    continue;
                }
                LineKind::Handle => {
                    let received = !fds.is_empty();
                    link.lock().answer(if received {
                        json::ACK_LINE
                    } else {
                        json::NACK_LINE
                    });
                    self.write_answers(&link);
                    if !received {
                        continue;
                    }
                    let (handle, msg) = json::parse_handle(&line)
                        .map_err(|e| Error::InvalidHandle(e.to_string()))?;
                    return Ok(Some(Received {
                        lane: json::lane_of(&msg),
                        payload: msg,
                        fds,
                        fds_lost: false,
                        format: Format::Json,
                        handle: Some(handle),
                    }));
                }
            };
            return Ok(Some(Received {
                lane,
                payload: line,
                fds,
                fds_lost: false,
                format: Format::Json,
                handle: None,
            }));
        }
    }

    /// Writes what the shared write side holds, without waiting: an acknowledgement, or
    /// messages an acknowledgement released. What the socket does not take now is written
    /// by the next send, flush or receive. A write error means the peer is gone: the
    /// bytes are dropped, and reading finds the end of the stream.
    fn write_answers(&self, link: &NodeLink) {
        let io = &self.io;
        let written = io.try_io(Interest::WRITABLE, || link.lock().write_some(io));
        if let Err(err) = written {
            if err.kind() != std::io::ErrorKind::WouldBlock {
                link.lock().buf.clear();
            }
        }
    }

    /// The descriptors of the frame at stream bytes `[start, end)`, which declares
    /// `declared` of them, and whether they were lost (see [`Received::fds_lost`]).
    fn claim_fds(
        &mut self,
        start: u64,
        end: u64,
        declared: usize,
    ) -> Result<(Vec<OwnedFd>, bool), Error> {
        if let Some(batch) = self.batches.front()
            && batch.lost
            && batch.start <= start
            && (declared > 0 || end >= batch.end)
        {
            // Lost with this frame's first byte: it gets none (a frame that declared none
            // and ends the read leaves nothing behind either).
            self.batches.pop_front();
            return Ok((Vec::new(), declared > 0));
        }
        self.claim_received_fds(start, end, declared)
            .map(|fds| (fds, false))
    }

    fn claim_received_fds(
        &mut self,
        start: u64,
        end: u64,
        declared: usize,
    ) -> Result<Vec<OwnedFd>, Error> {
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
                let between = match &self.node {
                    None => self.codec.is_between_frames(),
                    Some(node) => node.lines.is_between_lines(),
                };
                if let Some(node) = &self.node {
                    node.link.lock().closed = true;
                    node.link.moved.notify_waiters();
                }
                return if !(self.buf.is_empty() && between) {
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
            if let Some(node) = &self.node {
                // Answers (or released messages) the socket did not take yet: write them
                // as soon as it takes more, while waiting for the peer.
                let link = Arc::clone(&node.link);
                if link.lock().has_unwritten() {
                    let ready = self
                        .io
                        .ready(Interest::READABLE | Interest::WRITABLE)
                        .await?;
                    if ready.is_writable() {
                        self.write_answers(&link);
                    }
                    if !ready.is_readable() {
                        continue;
                    }
                }
            }
            let want = match self.node {
                None => self.codec.bytes_wanted(self.buf.len()).max(READ_CHUNK),
                Some(_) => READ_CHUNK,
            };
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
                            lost: false,
                        });
                    }
                }
                sys::Received::Truncated(n) => {
                    // A full buffer means the peer sent more than allowed. Fewer means this
                    // process ran out of descriptors: the bytes are intact and the frame
                    // that claims the lost descriptors is delivered without them, so that
                    // the application can refuse it and carry on.
                    if fds.len() >= self.max_fds {
                        return Err(Error::ControlTruncated);
                    }
                    drop(fds);
                    let start = self.received;
                    self.received += n as u64;
                    self.batches.push_back(FdBatch {
                        start,
                        end: self.received,
                        fds: Vec::new(),
                        lost: true,
                    });
                }
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
    fds_lost: bool,
    format: Format,
    /// The `type` of the `NODE_HANDLE` line the message came in, on a JSON channel.
    handle: Option<HandleType>,
}

impl Received {
    /// The lane the message came on.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// The encoded body: postcard bytes, or a JSON text without its newline (for a
    /// message that came with a handle, the `msg` of its `NODE_HANDLE` line).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Whether the peer sent descriptors with this message that this process could not
    /// receive: it was out of descriptors (`EMFILE`, `ENFILE`) and the kernel closed them.
    /// The message itself is intact and the channel goes on; [`fds`](Received::fds) is
    /// empty. Treat it as a message whose descriptors are gone (a cluster worker refuses
    /// such a hand-off, so the primary gives it to another worker).
    pub fn fds_lost(&self) -> bool {
        self.fds_lost
    }

    /// The format of the channel it came on, which [`decode`](Received::decode) uses.
    pub fn format(&self) -> Format {
        self.format
    }

    /// On a [`Format::Json`] channel, what the Node peer said the descriptor is (the
    /// `type` of its `NODE_HANDLE` line); `None` for a message without one.
    pub fn handle_type(&self) -> Option<HandleType> {
        self.handle
    }

    /// The message as an internal message of Node's protocol, on the control lane of a
    /// [`Format::Json`] channel ([`Error::WrongFormat`] on a postcard channel,
    /// [`Error::InvalidNodeMessage`] for a user message).
    pub fn internal(&self) -> Result<InternalMessage, Error> {
        if self.format != Format::Json {
            return Err(Error::WrongFormat {
                needed: Format::Json,
                actual: self.format,
            });
        }
        let value = serde_json::from_slice(&self.payload).map_err(|source| Error::DecodeJson {
            lane: self.lane,
            source,
        })?;
        InternalMessage::from_value(value)
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
    ///
    /// On a [`Format::Json`] channel the body is JSON and self-describing: a message of
    /// another shape fails with [`Error::DecodeJson`].
    pub fn decode<'de, T: Deserialize<'de>>(&'de self) -> Result<T, Error> {
        match self.format {
            Format::Postcard => {
                postcard::from_bytes(&self.payload).map_err(|source| Error::Decode {
                    lane: self.lane,
                    source,
                })
            }
            Format::Json => {
                serde_json::from_slice(&self.payload).map_err(|source| Error::DecodeJson {
                    lane: self.lane,
                    source,
                })
            }
        }
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
mod json_tests;
#[cfg(test)]
mod tests;
