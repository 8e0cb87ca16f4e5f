//! Typed, framed messages with file-descriptor passing over Unix stream sockets, async on
//! tokio.
//!
//! This is the bottom layer of the workspace: the `child` crate gives a forked program a
//! [`Channel`] to its parent, and the `cluster` crate runs its protocol and hands accepted
//! connections to workers over one. It knows nothing about processes.
//!
//! # Model
//!
//! A [`Channel`] wraps a connected `AF_UNIX` `SOCK_STREAM` socket. Each message is a
//! `serde` value encoded with `postcard` and sent as one frame, optionally carrying owned
//! file descriptors. Every frame belongs to one of two [`Lane`]s: [`Lane::User`] for the
//! application and [`Lane::Control`] for a protocol that a library runs beside it (what
//! Node does with `NODE_`-prefixed messages), so the two never mix up. A channel splits
//! into a [`Sender`] and a [`Receiver`] for use from different tasks.
//!
//! # Formats: which is spoken when
//!
//! A channel speaks one [`Format`], chosen when it is made ([`Config::format`]) or by the
//! environment ([`Channel::from_env`]):
//!
//! - [`Format::Postcard`], the default and what `child::fork` and `cluster` use between
//!   Rust processes: the frames drawn below. **It is not Node's format**; a Node peer is
//!   caught on its first line ([`Error::ForeignProtocol`]).
//! - [`Format::Json`], Node's `serialization: 'json'` (module [`json`]): one JSON value per
//!   line, an object whose `cmd` starts with `NODE_` on the control lane, one descriptor per
//!   message as a `NODE_HANDLE` line answered by `NODE_HANDLE_ACK`, later messages held back
//!   until then. Spoken with Node peers (`NODE_CHANNEL_FD`), or between Rust ends that want
//!   a self-describing format. Internal messages of Node's protocol travel as
//!   [`InternalMessage`]s ([`Sender::send_internal`], [`Received::internal`]). Node's
//!   'advanced' serialization is refused ([`Error::UnsupportedSerialization`],
//!   [`Error::NotNodeJson`]).
//!
//! # Wire format
//!
//! ```text
//!  0               4        5        6                       6 + len
//!  +---------------+--------+--------+-----------------------+
//!  |      len      |  lane  |  fds   |        payload        |
//!  |   u32, BE     |   u8   |   u8   |      (len bytes)      |
//!  +---------------+--------+--------+-----------------------+
//! ```
//!
//! `len` is the payload length; `lane` is 0 (user) or 1 (control); `fds` counts the
//! descriptors of the frame. The descriptors travel as one `SCM_RIGHTS` control message on
//! the `sendmsg` that carries the frame's first byte; the receiver queues received
//! descriptors in order and gives each frame as many as its header declares. The pure
//! [`codec`] module implements the byte side and does no I/O.
//!
//! # Bounds
//!
//! - A frame (or JSON line) longer than [`Config::max_frame_len`] is refused before
//!   anything is allocated for it, on both ends; a message may carry at most
//!   [`Config::max_fds`] descriptors.
//! - A sender buffers at most one write buffer and waits for the socket (back-pressure)
//!   instead of queueing.
//! - JSON channels: the messages held back behind a handle until the peer's
//!   `NODE_HANDLE_ACK` are bounded by [`Config::hold_back`] (1024 messages or 16 MiB); a
//!   full queue makes sending wait, reading the answer itself.
//! - JSON channels: the messages a waiting sender reads on the way to that answer wait for
//!   the [`Receiver`] in an inbox with the same bounds; a full inbox makes the sender wait
//!   for [`Receiver::recv`] (so a peer that floods messages at a program that never
//!   receives holds up its sends, never its memory); without a receiver they are dropped.
//! - JSON channels: the answers owed to the peer's handles (`NODE_HANDLE_ACK`/`NACK`) are
//!   never held back, and at most 1024 of them wait unwritten: a peer that keeps sending
//!   handles without reading the answers is misbehaving, and the channel ends with
//!   [`Error::PeerNotReading`] (the cluster primary then kills and replaces such a worker).
//! - JSON values nest at most [`json::MAX_DEPTH`] levels when decoded.
//!
//! # Invariants
//!
//! - Bounded everywhere, each queue with a policy for when it is full (see *Bounds*).
//! - Received descriptors are close-on-exec (`MSG_CMSG_CLOEXEC`); a truncated control
//!   message (`MSG_CTRUNC`), a frame declaring descriptors that did not arrive with its
//!   first byte, or descriptors no frame claims ([`Error::UnclaimedFds`], caught at the
//!   frame they came with or at the end of the stream) are errors, never silently dropped
//!   or handed to the wrong message.
//! - Memory: a refused oversized message costs at most the frame limit while it is
//!   encoded. Between messages a [`Sender`] keeps at most its write buffer or 1 MiB of
//!   buffer capacity, whichever is larger, and a [`Receiver`] about 1 MiB; a larger message's
//!   buffer is given back once it is written, or lives only as long as its [`Received`].
//! - Nothing a peer sends can make this crate panic. A payload that does not decode is an
//!   error for that message only; a broken frame ends the channel with a typed [`Error`].
//! - A clean end of stream between frames is `Ok(None)`; an end inside a frame is
//!   [`Error::UnexpectedEof`].
//!
//! # Caveats
//!
//! - postcard is not self-describing: a payload holds values, not their types. Two ends
//!   that disagree on the message types are not detected by [`Received::decode`], which may
//!   turn a message of another type into wrong values (see its docs). Version your
//!   messages and call [`Channel::hello`] on both ends: each announces a protocol name and
//!   version on the control lane and a disagreement is [`Error::ProtocolMismatch`] on both.
//! - A peer that is not an `ipc` channel at all (Node's JSON lines) is caught on its first
//!   frame: [`Error::ForeignProtocol`] says "the peer speaks another protocol".
//!
//! # Logging
//!
//! `ipc` logs nothing: every failure is returned as an [`Error`] to the caller.
//!
//! # Example
//!
//! ```
//! use std::io::{Read, Write};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
//! enum Msg {
//!     Hello { name: String },
//!     Pipe,
//! }
//!
//! let (mut parent, mut child) = ipc::Channel::pair()?;
//! parent.send(&Msg::Hello { name: "worker".into() }).await?;
//!
//! // Pass the read end of a pipe along with a message.
//! let (mut read_end, write_end) = std::io::pipe()?;
//! parent.send_with_fds(&Msg::Pipe, vec![std::os::fd::OwnedFd::from(write_end)]).await?;
//!
//! let hello = child.recv().await?.expect("a message");
//! assert_eq!(hello.decode::<Msg>()?, Msg::Hello { name: "worker".into() });
//!
//! let mut pipe = child.recv().await?.expect("a message");
//! assert_eq!(pipe.decode::<Msg>()?, Msg::Pipe);
//! let fd = pipe.take_fds().pop().expect("one descriptor");
//! std::fs::File::from(fd).write_all(b"through the pipe")?;
//! let mut text = String::new();
//! read_end.read_to_string(&mut text)?;
//! assert_eq!(text, "through the pipe");
//! # Ok(())
//! # }
//! ```
//!
//! In a child process started with a channel (by `child::fork`), [`Channel::from_env`]
//! finds it through the [`CHANNEL_FD_ENV`] environment variable.
//!
//! # Platform
//!
//! Linux. All `unsafe` code is in one private `sys` module.

#![warn(missing_docs)]

mod channel;
pub mod codec;
mod error;
mod hello;
pub mod json;
mod sys;

pub use channel::{
    CHANNEL_FD_ENV, Channel, Config, DEFAULT_MAX_FDS, Format, MAX_FDS_LIMIT, NODE_CHANNEL_FD_ENV,
    NODE_CHANNEL_SERIALIZATION_MODE_ENV, Received, Receiver, Sender,
};
pub use codec::Lane;
pub use error::Error;
pub use hello::ProtocolId;
pub use json::{HandleType, InternalMessage};
