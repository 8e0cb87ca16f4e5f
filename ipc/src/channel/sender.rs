//! The write half of a channel: [`Sender`], its bounded write buffer and, on a Node
//! channel, the hold-back of messages behind an unacknowledged handle.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UnixStream;

use super::node_link::{Line, NodeLink, SenderRead};
use super::receiver::{read_more, write_now};

use super::{Format, RETAINED_BUFFER};
use crate::codec::{FrameCodec, Lane};
use crate::json::{self, HandleType, InternalMessage};
use crate::{Error, sys};

/// The sending half of a [`Channel`](crate::Channel).
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
    pub(super) io: Arc<UnixStream>,
    pub(super) writer: Writer,
}

/// What a sender writes with, per format: each arm holds only what its format uses.
#[derive(Debug)]
pub(super) enum Writer {
    /// This crate's frames, gathered in the sender's own write buffer.
    Postcard(PostcardWriter),
    /// Node's JSON lines, written through the state shared with the receiver (which
    /// writes handle acknowledgements) and held back behind unanswered handles.
    Json(JsonWriter),
}

/// The write state of a [`Format::Postcard`] sender.
#[derive(Debug)]
pub(super) struct PostcardWriter {
    pub(super) codec: FrameCodec,
    pub(super) buf: BytesMut,
    /// Descriptors that belong to the frame at the start of `buf`.
    pub(super) fds: Vec<OwnedFd>,
    pub(super) high_water: usize,
    /// Whether `buf` grew past what it may keep (given back once it is written out).
    pub(super) grown: bool,
}

/// The write state of a [`Format::Json`] sender: its bytes live in the shared link.
#[derive(Debug)]
pub(super) struct JsonWriter {
    pub(super) link: Arc<NodeLink>,
    /// The longest message (a line without its newline) that may be sent.
    pub(super) max_line_len: u32,
    pub(super) high_water: usize,
}

impl Sender {
    /// The wire format this sender writes.
    pub fn format(&self) -> Format {
        match self.writer {
            Writer::Postcard(_) => Format::Postcard,
            Writer::Json(_) => Format::Json,
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
        match &mut self.writer {
            Writer::Postcard(_) => Err(Error::WrongFormat {
                needed: Format::Json,
                actual: Format::Postcard,
            }),
            Writer::Json(json) => {
                json.feed_line(
                    &self.io,
                    Lane::Control,
                    message,
                    single_fd(fds)?,
                    HandleType::NetNative,
                )
                .await?;
                json.flush(&self.io).await
            }
        }
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
        match &mut self.writer {
            Writer::Postcard(_) => self.send_with_fds(message, vec![fd]).await,
            Writer::Json(json) => {
                json.feed_line(&self.io, Lane::User, message, Some(fd), handle_type)
                    .await?;
                json.flush(&self.io).await
            }
        }
    }

    /// Sends a message on the user lane and waits until the socket has taken it (on a
    /// [`Format::Json`] channel, a message held back behind a handle waits for the peer's
    /// answer, which this reads itself: see [`flush`](Sender::flush)).
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

    /// Sends a message on `lane` with descriptors that stay the caller's: the peer gets
    /// its own copies, and nothing is duplicated or closed here. For a descriptor the
    /// sender keeps after sending (a connection it may hand to another peer if this one
    /// refuses it), this saves the `dup` and `close` that [`send_with_fds`] with a
    /// `try_clone` costs. Waits until the socket has taken the whole message (anything
    /// fed before goes first). On a [`Format::Json`] channel, which keeps a handle until
    /// the peer's acknowledgement, the descriptor is duplicated after all.
    ///
    /// [`send_with_fds`]: Sender::send_with_fds
    pub async fn send_borrowed<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        match &mut self.writer {
            Writer::Postcard(postcard) => {
                postcard.send_borrowed(&self.io, lane, message, fds).await
            }
            Writer::Json(json) => {
                let owned = fds
                    .iter()
                    .map(|fd| fd.try_clone_to_owned())
                    .collect::<Result<Vec<_>, _>>()?;
                json.feed_line(
                    &self.io,
                    lane,
                    message,
                    single_fd(owned)?,
                    HandleType::NetNative,
                )
                .await?;
                json.flush(&self.io).await
            }
        }
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
    /// the peer's `NODE_HANDLE_ACK`, as Node does: `feed` returns once a message is
    /// queued, and waits only when the hold-back queue ([`Config::hold_back`](crate::Config::hold_back)) is full;
    /// [`send`](Sender::send) and [`flush`](Sender::flush) wait until it is written.
    /// The acknowledgement is read by the [`Receiver`](crate::Receiver), or by the sender itself while it
    /// waits for one (it also looks, without waiting, each time it holds a message back),
    /// so sending never depends on someone calling `recv`; messages it reads on the way
    /// wait for the [`Receiver`](crate::Receiver) (see its docs for the bound). Once the peer has closed
    /// the channel, sending fails with [`Error::Closed`].
    pub async fn feed<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
        match &mut self.writer {
            Writer::Postcard(postcard) => {
                // No future of its own: this is the hot path of small messages.
                if !fds.is_empty() && !postcard.buf.is_empty() {
                    // Descriptors must ride on the sendmsg that starts their frame.
                    postcard.flush(&self.io).await?;
                }
                if postcard.push(lane, message, fds)? {
                    postcard.flush(&self.io).await?;
                }
                Ok(())
            }
            Writer::Json(json) => {
                let fd = single_fd(fds)?;
                json.feed_line(&self.io, lane, message, fd, HandleType::NetNative)
                    .await
            }
        }
    }

    /// Writes everything buffered, waiting for the socket to take it. On a
    /// [`Format::Json`] channel that includes messages held back behind a handle: this
    /// reads the peer's answers itself until they may go (handles themselves do not wait
    /// for their answers). [`feed`](Sender::feed) alone never waits for an answer unless
    /// the hold-back queue is full.
    pub async fn flush(&mut self) -> Result<(), Error> {
        match &mut self.writer {
            Writer::Postcard(postcard) => postcard.flush(&self.io).await,
            Writer::Json(json) => json.flush(&self.io).await,
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

impl PostcardWriter {
    /// Appends a message and takes its descriptors, which ride on the buffer's first
    /// `sendmsg` (the caller flushed what was ahead of them); returns whether the buffer
    /// is full enough to write.
    fn push<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        message: &T,
        fds: Vec<OwnedFd>,
    ) -> Result<bool, Error> {
        self.encode_frame(lane, fds.len(), message)?;
        if !fds.is_empty() {
            self.fds = fds;
        }
        Ok(self.buf.len() >= self.high_water)
    }

    /// [`Sender::send_borrowed`] on a [`Format::Postcard`] channel.
    async fn send_borrowed<T: Serialize + ?Sized>(
        &mut self,
        io: &UnixStream,
        lane: Lane,
        message: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), Error> {
        if !self.buf.is_empty() {
            self.flush(io).await?;
        }
        self.encode_frame(lane, fds.len(), message)?;
        // The descriptors ride on the first sendmsg that takes bytes of the frame.
        let mut pending = fds;
        while !self.buf.is_empty() {
            let written = self.write_some(io, pending).await?;
            pending = &[];
            self.buf.advance(written);
        }
        self.give_back();
        Ok(())
    }

    /// Appends one postcard frame declaring `fd_count` descriptors to the write buffer;
    /// a refused message leaves nothing behind.
    fn encode_frame<T: Serialize + ?Sized>(
        &mut self,
        lane: Lane,
        fd_count: usize,
        message: &T,
    ) -> Result<(), Error> {
        let encoded = self.codec.encode(lane, fd_count, message, &mut self.buf);
        self.grown |= self.buf.capacity() > self.high_water.max(RETAINED_BUFFER);
        if encoded.is_err() {
            self.give_back();
        }
        encoded
    }

    /// One `sendmsg` of the write buffer, `fds` with its first byte, once the socket takes
    /// bytes; returns how many it took.
    async fn write_some<F: std::os::fd::AsRawFd>(
        &self,
        io: &UnixStream,
        fds: &[F],
    ) -> Result<usize, Error> {
        let written = io
            .async_io(Interest::WRITABLE, || sys::send(io.as_fd(), &self.buf, fds))
            .await?;
        Ok(written)
    }

    /// [`Sender::flush`] on a [`Format::Postcard`] channel.
    async fn flush(&mut self, io: &UnixStream) -> Result<(), Error> {
        while !self.buf.is_empty() {
            let written = self.write_some(io, &self.fds).await?;
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
}

/// The one descriptor a message on a [`Format::Json`] channel may carry (as a
/// [`HandleType::NetNative`] handle, unless said otherwise).
fn single_fd(mut fds: Vec<OwnedFd>) -> Result<Option<OwnedFd>, Error> {
    if fds.len() > 1 {
        return Err(Error::TooManyFds {
            count: fds.len(),
            max: 1,
        });
    }
    Ok(fds.pop())
}

impl JsonWriter {
    /// Queues one line, with `fd` as a handle of `handle_type`.
    async fn feed_line<T: Serialize + ?Sized>(
        &mut self,
        io: &UnixStream,
        lane: Lane,
        message: &T,
        fd: Option<OwnedFd>,
        handle_type: HandleType,
    ) -> Result<(), Error> {
        let link = Arc::clone(&self.link);
        let max = self.max_line_len;
        let handle = fd.as_ref().map(|_| handle_type);
        // The guard lives in plain blocks only: it must never be held across an await.
        let fast = {
            let mut state = link.lock();
            if state.closed {
                return Err(Error::Closed);
            }
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
                        Ok((buffered, held)) => {
                            if held {
                                // An answer may be there already, or the end of the
                                // stream: look, without waiting.
                                self.look_for_answers(io).await?;
                            }
                            break handle.is_some() || buffered >= self.high_water;
                        }
                        Err(back) => line = back,
                    }
                    // Full: write what may go, then read the peer's answers ourselves until
                    // one makes room (the receiving half may be reading them too, or
                    // nobody).
                    self.write_all(io).await?;
                    self.wait_for_answer(io, moved).await?;
                }
            }
        };
        if full {
            self.flush(io).await?;
        }
        Ok(())
    }

    /// [`Sender::flush`] on a [`Format::Json`] channel.
    async fn flush(&mut self, io: &UnixStream) -> Result<(), Error> {
        loop {
            let moved = self.link.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            self.write_all(io).await?;
            if !self.link.lock().has_held() {
                return Ok(());
            }
            self.wait_for_answer(io, moved).await?;
        }
    }

    /// Waits until an answer to one of our handles came (read by us or by the receiving
    /// half) or the inbox has room again; `moved` was registered before the state that
    /// makes us wait was seen.
    async fn wait_for_answer(
        &self,
        io: &UnixStream,
        moved: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
    ) -> Result<(), Error> {
        match self.read_answers(io)? {
            SenderRead::Released => {}
            SenderRead::InboxFull => moved.await,
            SenderRead::NeedBytes => {
                tokio::select! {
                    () = moved => {}
                    read = read_more(io, &self.link) => read?,
                }
            }
        }
        Ok(())
    }

    /// Writes what may go, waiting for the socket to take it.
    async fn write_all(&self, io: &UnixStream) -> Result<(), Error> {
        io.async_io(Interest::WRITABLE, || self.link.lock().write_some(io))
            .await?;
        Ok(())
    }

    /// Decodes what was read from the socket, running the handle protocol, up to the
    /// first answer to one of our handles.
    fn read_answers(&self, io: &UnixStream) -> Result<SenderRead, Error> {
        let read = self.link.lock().read_for_sender(io);
        self.link.wake_after_reading();
        write_now(io, &self.link);
        read
    }

    /// Without waiting: reads what the socket holds and decodes all of it, so that an
    /// answer that came lets held-back messages go, and a peer that is gone is
    /// [`Error::Closed`].
    async fn look_for_answers(&self, io: &UnixStream) -> Result<(), Error> {
        if io.try_io(Interest::READABLE, || Ok(())).is_ok() {
            // Returns at once: the socket is readable (or the read finds it is not).
            read_more(io, &self.link).await?;
        }
        // Past every answer: the end of the stream may follow one.
        while self.read_answers(io)? == SenderRead::Released {}
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    use crate::{Channel, Lane};

    #[tokio::test(flavor = "current_thread")]
    async fn a_borrowed_descriptor_reaches_the_peer_and_stays_open_here() {
        let (mut a, mut b) = Channel::pair().expect("pair");
        let (mut reader, writer) = std::io::pipe().expect("pipe");
        // Something fed before goes first, on its own write.
        a.sender().feed(Lane::User, &1u8, Vec::new()).await.unwrap();
        a.sender()
            .send_borrowed(Lane::Control, &2u8, &[writer.as_fd()])
            .await
            .unwrap();
        let first = b.recv().await.unwrap().expect("a message");
        assert_eq!(
            (first.lane(), first.decode::<u8>().unwrap()),
            (Lane::User, 1)
        );
        let mut second = b.recv().await.unwrap().expect("a message");
        assert_eq!(second.decode::<u8>().unwrap(), 2);
        let copy = second.take_fds().pop().expect("the descriptor came");
        std::fs::File::from(copy).write_all(b"peer ").unwrap();
        // Ours is still open: the pipe has two writers until both are closed.
        let mut ours = std::fs::File::from(std::os::fd::OwnedFd::from(writer));
        ours.write_all(b"and us").unwrap();
        drop(ours);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "peer and us");
    }
}
