//! One received message: [`Received`].

use std::os::fd::OwnedFd;

use bytes::Bytes;
use serde::Deserialize;

use super::Format;
use crate::Error;
use crate::codec::Lane;
use crate::json::{HandleType, InternalMessage};

/// One received message: its lane, its still-encoded body and its descriptors.
///
/// Keeping the body encoded until [`decode`](Received::decode) lets a receiver route a
/// message by lane before choosing its type, and means a message that fails to decode
/// loses nothing else: the channel goes on.
#[derive(Debug)]
pub struct Received {
    pub(super) lane: Lane,
    pub(super) payload: Bytes,
    pub(super) fds: Vec<OwnedFd>,
    pub(super) fds_lost: bool,
    pub(super) encoding: Encoding,
}

/// How a received body is encoded: the format of the channel it came on, with what only
/// that format says.
#[derive(Debug, Clone, Copy)]
pub(super) enum Encoding {
    /// A postcard payload.
    Postcard,
    /// A JSON text, and the `type` of the `NODE_HANDLE` line it came in, if it did.
    Json { handle: Option<HandleType> },
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
        match self.encoding {
            Encoding::Postcard => Format::Postcard,
            Encoding::Json { .. } => Format::Json,
        }
    }

    /// On a [`Format::Json`] channel, what the Node peer said the descriptor is (the
    /// `type` of its `NODE_HANDLE` line); `None` for a message without one.
    pub fn handle_type(&self) -> Option<HandleType> {
        match self.encoding {
            Encoding::Postcard => None,
            Encoding::Json { handle } => handle,
        }
    }

    /// The message as an internal message of Node's protocol, on the control lane of a
    /// [`Format::Json`] channel ([`Error::WrongFormat`] on a postcard channel,
    /// [`Error::InvalidNodeMessage`] for a user message).
    pub fn internal(&self) -> Result<InternalMessage, Error> {
        match self.encoding {
            Encoding::Postcard => Err(Error::WrongFormat {
                needed: Format::Json,
                actual: Format::Postcard,
            }),
            Encoding::Json { .. } => {
                let value =
                    crate::json::from_slice(&self.payload).map_err(|source| Error::DecodeJson {
                        lane: self.lane,
                        source,
                    })?;
                InternalMessage::from_value(value)
            }
        }
    }

    /// Decodes the body as a `T`.
    ///
    /// # Caveats
    ///
    /// postcard is not self-describing: the payload holds values, not their types, so a
    /// message of another type can decode without error as a `T` with wrong values (a
    /// `Request::Add { a, b }` sent by a peer can come out as a `Response::Sum(..)`, or a
    /// short message as an empty `String`). [`Error::Decode`] catches only bytes that fit no
    /// `T` at all. Both ends must agree on the types; [`Channel::hello`](crate::Channel::hello) checks a protocol
    /// name and version on both ends to find out when they do not.
    ///
    /// On a [`Format::Json`] channel the body is JSON and self-describing: a message of
    /// another shape fails with [`Error::DecodeJson`]. A lone UTF-16 surrogate that Node
    /// wrote (`"\\ud800"`) arrives as U+FFFD, and values nest up to
    /// [`json::MAX_DEPTH`](crate::json::MAX_DEPTH) levels (see [`json`](crate::json)).
    pub fn decode<'de, T: Deserialize<'de>>(&'de self) -> Result<T, Error> {
        match self.encoding {
            Encoding::Postcard => {
                postcard::from_bytes(&self.payload).map_err(|source| Error::Decode {
                    lane: self.lane,
                    source,
                })
            }
            Encoding::Json { .. } => {
                crate::json::from_slice(&self.payload).map_err(|source| Error::DecodeJson {
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
