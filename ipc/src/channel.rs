//! The channel: a connected Unix stream socket, a sending half and a receiving half.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::BytesMut;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::codec::FrameCodec;
use crate::json::{HandleType, InternalMessage};
use crate::{Error, sys};

mod inbound;
mod node_link;
mod received;
mod receiver;
mod sender;

use inbound::Inbound;
use received::Encoding;
pub use received::Received;
pub use receiver::Receiver;
use receiver::{JsonReceive, PostcardReceive, ReceiveSide};
pub use sender::Sender;
use sender::{JsonWriter, PostcardWriter, Writer};

use node_link::{HoldBack, NodeLink};

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
    handles: 1,
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
    /// message is always taken). When it is full, sending waits for the acknowledgement,
    /// reading it from the socket itself. The same bounds apply to the messages the sender
    /// reads on the way, which wait for the [`Receiver`]: when they are full the sender
    /// waits for [`Receiver::recv`].
    pub fn hold_back(mut self, messages: usize, bytes: usize) -> Self {
        self.hold_back = HoldBack {
            messages: messages.max(1),
            bytes,
            ..self.hold_back
        };
        self
    }

    /// How many handles a [`Format::Json`] sender may have waiting for the peer's
    /// `NODE_HANDLE_ACK` at once (default 1, Node's own rule; at least 1). Above one,
    /// handles sent one after another go out back to back instead of one per round trip;
    /// each still starts its own write, so a Node receiver reads at most one descriptor
    /// per read, and the answers are matched in the order the handles went. A message
    /// without a handle still waits until every handle before it is answered, as in Node
    /// (a Node receiver delivers a handle's message a tick after a plain one read with it,
    /// so only the wait keeps the order). The cost: a handle the peer refuses
    /// (`NODE_HANDLE_NACK`, after a lost descriptor) is sent again after the handles that
    /// followed it. On Linux the kernel holds a passed descriptor from the `sendmsg` on,
    /// so nothing else depends on the answer.
    pub fn handles_in_flight(mut self, handles: usize) -> Self {
        self.hold_back.handles = handles.max(1);
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
        let (writer, side) = match config.format {
            Format::Postcard => (
                Writer::Postcard(PostcardWriter {
                    codec: config.codec(),
                    buf: BytesMut::new(),
                    fds: Vec::new(),
                    high_water: config.write_buffer,
                    grown: false,
                }),
                ReceiveSide::Postcard(PostcardReceive {
                    codec: config.codec(),
                    inbound: Inbound::new(usize::from(config.max_fds)),
                    seen_frame: false,
                }),
            ),
            Format::Json => {
                let link = Arc::new(NodeLink::new(
                    config.hold_back,
                    config.max_frame_len,
                    usize::from(config.max_fds),
                ));
                (
                    Writer::Json(JsonWriter {
                        link: Arc::clone(&link),
                        max_line_len: config.max_frame_len,
                        high_water: config.write_buffer,
                    }),
                    ReceiveSide::Json(JsonReceive(link)),
                )
            }
        };
        Ok(Channel {
            sender: Sender {
                io: Arc::clone(&io),
                writer,
            },
            receiver: Receiver {
                io,
                side,
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

#[cfg(test)]
mod json_tests;
#[cfg(test)]
mod tests;
