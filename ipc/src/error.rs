//! The errors of the `ipc` crate.

use std::io;

use crate::{Format, Lane, ProtocolId};

/// Everything that can go wrong on a channel.
///
/// Errors fall into two groups. [`Decode`](Error::Decode) is about one message: the frame
/// was intact and the channel goes on. Every other error on the receiving side means the
/// byte stream can no longer be trusted; the [`Receiver`](crate::Receiver) then reports
/// [`Broken`](Error::Broken) from every later call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A frame's payload is longer than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// The length the frame declares, or for a refused send the length reached when
        /// encoding stopped (at least one byte over the limit).
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// A message carries, or a frame declares, more descriptors than the limit.
    #[error("message carries {count} file descriptors, more than the limit of {max}")]
    TooManyFds {
        /// How many descriptors the message carries or declares.
        count: usize,
        /// The limit in force.
        max: usize,
    },
    /// A frame declares descriptors that never arrived with it.
    #[error("frame declares {declared} file descriptors but only {received} arrived")]
    MissingFds {
        /// How many the frame header declares.
        declared: usize,
        /// How many were waiting in the queue of received descriptors.
        received: usize,
    },
    /// Descriptors arrived that no frame declares: with a frame whose header counts fewer,
    /// or with no frame at all before the end of the stream.
    #[error("the peer sent {count} file descriptors that no frame declares")]
    UnclaimedFds {
        /// How many descriptors were left without a frame.
        count: usize,
    },
    /// The first bytes from the peer are not a frame header of this crate: read as one,
    /// they declare a payload over the limit and either name no lane or declare 256 MiB or
    /// more (what any text does). The peer is not an `ipc` channel: Node's JSON channel,
    /// for example, starts with `{"`.
    #[error(
        "the peer speaks another protocol: its first bytes {head:02x?} read as a frame of {len} bytes, over the limit of {max}{}",
        foreign_hint(head)
    )]
    ForeignProtocol {
        /// The first six bytes received, read as a frame header.
        head: [u8; 6],
        /// The payload length they declare.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The kernel dropped descriptors because the control buffer was too small
    /// (`MSG_CTRUNC`): the peer sent more than the configured limit in one message.
    #[error("control message truncated: the peer sent more file descriptors than allowed")]
    ControlTruncated,
    /// A frame header names a lane this crate does not know.
    #[error("unknown lane {0} in frame header")]
    UnknownLane(u8),
    /// The peer closed its end in the middle of a frame.
    #[error("peer closed the channel in the middle of a frame ({buffered} bytes buffered)")]
    UnexpectedEof {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// The message could not be serialized.
    #[error("failed to encode message")]
    Encode(#[source] postcard::Error),
    /// A frame's payload is not a valid encoding of the requested type.
    #[error("failed to decode message on the {lane} lane")]
    Decode {
        /// The lane of the frame.
        lane: Lane,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// The message could not be serialized as JSON (on a Node channel): a map whose keys
    /// are not strings, for example.
    #[error("failed to encode message as JSON")]
    EncodeJson(#[source] serde_json::Error),
    /// A line from a Node peer is not valid JSON, or not a valid encoding of the requested
    /// type. Only that message is lost: the channel goes on.
    #[error("failed to decode JSON message on the {lane} lane")]
    DecodeJson {
        /// The lane of the line.
        lane: Lane,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },
    /// A line from a Node peer is longer than the limit (no newline within it).
    #[error("line of at least {len} bytes exceeds the limit of {max} bytes")]
    LineTooLong {
        /// How many bytes were buffered without a newline, or the line's length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The first bytes from the peer of a Node channel are no JSON text.
    #[error(
        "the peer does not speak Node's JSON lines: its first bytes are {head:02x?}{}",
        not_json_hint(head)
    )]
    NotNodeJson {
        /// The first six bytes received.
        head: [u8; 6],
    },
    /// The environment asks for a Node serialization this crate does not speak.
    #[error(
        "the peer uses Node's '{mode}' serialization, which is not supported: use serialization 'json'"
    )]
    UnsupportedSerialization {
        /// What `NODE_CHANNEL_SERIALIZATION_MODE` says.
        mode: String,
    },
    /// A message cannot be sent on a Node channel as asked.
    #[error("invalid message for a Node channel: {0}")]
    InvalidNodeMessage(&'static str),
    /// A Node peer broke the handle protocol in one message, which is lost; the channel
    /// goes on.
    #[error("the Node peer sent an invalid handle message: {0}")]
    InvalidHandle(String),
    /// The peer answered `NODE_HANDLE_NACK` to a handle more often than Node retries (3
    /// times): the handle was dropped. Reported by the receiving half; the channel goes on.
    #[error("the peer did not receive a handle after {attempts} attempts; it was dropped")]
    HandleDropped {
        /// How many times the handle was sent.
        attempts: u8,
        /// The message that went with the handle, as the peer would have received it
        /// (its descriptor is closed), so the sender knows which one it was.
        message: Box<crate::Received>,
    },
    /// A Node peer keeps sending handles (`NODE_HANDLE` lines) but does not read the
    /// answers (`NODE_HANDLE_ACK`/`NACK`) the channel owes it: that many wait unwritten,
    /// the bound. Rather than queue answers without end, the channel ends: the receiving
    /// half returns this error once, then [`Broken`](Error::Broken), and sending fails.
    #[error(
        "the peer does not read its acknowledgements: {unwritten} answers to its handles wait unwritten"
    )]
    PeerNotReading {
        /// How many answers wait to be written.
        unwritten: usize,
    },
    /// The operation needs a channel of another format.
    #[error("this needs a {needed} channel, and this channel speaks {actual}")]
    WrongFormat {
        /// The format needed.
        needed: Format,
        /// The channel's format.
        actual: Format,
    },
    /// The peer has closed the channel, so nothing more can be sent.
    #[error("channel closed by peer")]
    Closed,
    /// An earlier error left the receiving byte stream unusable.
    #[error("channel is unusable after an earlier protocol error")]
    Broken,
    /// The environment names an inherited channel that cannot be used.
    #[error("invalid inherited channel in {var}={value:?}: {reason}")]
    InvalidInherited {
        /// The environment variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The inherited channel was already taken by an earlier call.
    #[error("the inherited channel was already taken")]
    AlreadyTaken,
    /// The peer announced another protocol in [`Channel::hello`](crate::Channel::hello),
    /// or its first message was not a hello (`theirs` is `None`).
    #[error("protocol mismatch: this end speaks {ours}, the peer {}", describe_theirs(theirs.as_deref()))]
    ProtocolMismatch {
        /// The protocol this end announced.
        ours: Box<ProtocolId>,
        /// The protocol the peer announced, or `None` if its first message was no hello.
        theirs: Option<Box<ProtocolId>>,
    },
    /// A system call failed.
    #[error("ipc i/o error")]
    Io(#[source] io::Error),
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::EPIPE) | Some(libc::ECONNRESET) => Error::Closed,
            _ => Error::Io(err),
        }
    }
}

/// The peer's side of a protocol mismatch.
fn describe_theirs(theirs: Option<&ProtocolId>) -> String {
    match theirs {
        Some(theirs) => theirs.to_string(),
        None => "sent no hello".into(),
    }
}

/// What the first bytes of a peer that does not speak JSON lines suggest.
fn not_json_hint(head: &[u8; 6]) -> &'static str {
    if head[4] == 0xff {
        " (a 4-byte length and a V8 header: Node's 'advanced' serialization, which is not supported; use 'json')"
    } else if head[4] <= 1 {
        " (they look like this crate's postcard frames: give both ends the same format)"
    } else {
        ""
    }
}

/// What the first bytes of a foreign peer suggest.
fn foreign_hint(head: &[u8; 6]) -> &'static str {
    if head.starts_with(b"{\"") || head.starts_with(b"[") {
        " (they look like JSON, as a Node channel writes)"
    } else {
        ""
    }
}

impl Error {
    /// Whether this error leaves the receiving stream unusable.
    pub(crate) fn is_fatal_on_receive(&self) -> bool {
        !matches!(
            self,
            Error::Decode { .. }
                | Error::DecodeJson { .. }
                | Error::InvalidHandle(_)
                | Error::HandleDropped { .. }
        )
    }
}
