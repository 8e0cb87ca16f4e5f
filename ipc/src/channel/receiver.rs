//! The read half of a channel: [`Receiver`], framing, and matching received
//! descriptors to the frames that declare them.

use std::sync::Arc;
use std::task::Poll;

use bytes::BytesMut;

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::inbound::Inbound;
use super::node_link::NodeLink;

use super::{Encoding, FOREIGN_LEN, Format, READ_CHUNK, RETAINED_BUFFER, Received};
use crate::Error;
use crate::codec::{FrameCodec, HEADER_LEN};

/// The receiving half of a [`Channel`](crate::Channel).
///
/// # Cancellation
///
/// [`recv`](Receiver::recv) is cancel-safe: all state lives in the receiver (on a
/// [`Format::Json`] channel, in the state it shares with its [`Sender`]), so dropping the
/// future loses no message and no descriptor; the next call picks up where it was.
///
/// # Node JSON channels
///
/// A [`Sender`] that waits for the peer's `NODE_HANDLE_ACK` reads the socket itself, so
/// sending never depends on someone calling `recv`. The messages it reads on the way wait
/// for this receiver in a queue bounded like the hold-back queue ([`Config::hold_back`],
/// 1024 messages or 16 MiB by default); while it is full the sender stops reading and waits
/// for `recv` to take some. Once the receiver is dropped, such messages are dropped.
///
/// [`Sender`]: crate::Sender
/// [`Config::hold_back`]: crate::Config::hold_back
#[derive(Debug)]
pub struct Receiver {
    pub(super) io: Arc<UnixStream>,
    pub(super) side: ReceiveSide,
    pub(super) broken: bool,
}

/// What a receiver reads with, per format.
#[derive(Debug)]
pub(super) enum ReceiveSide {
    /// This crate's frames.
    Postcard(PostcardReceive),
    /// Node's JSON lines: the read state lives in the state shared with the sender (which
    /// reads acknowledgements when it waits for one), with the write side.
    Json(JsonReceive),
}

/// The receiving half's hold on the state of a [`Format::Json`] channel; dropping it tells
/// a sender that what it reads from then on has nobody to go to.
#[derive(Debug)]
pub(super) struct JsonReceive(pub(super) Arc<NodeLink>);

impl Drop for JsonReceive {
    fn drop(&mut self) {
        self.0.lock().receiver_dropped();
        self.0.moved.notify_waiters();
    }
}

/// The read state of a [`Format::Postcard`] receiver.
#[derive(Debug)]
pub(super) struct PostcardReceive {
    pub(super) codec: FrameCodec,
    /// What was read and not decoded yet.
    pub(super) inbound: Inbound,
    /// Whether a whole frame has been decoded (until then a bad header may mean a foreign
    /// peer).
    pub(super) seen_frame: bool,
}

impl Receiver {
    /// The wire format this receiver reads.
    pub fn format(&self) -> Format {
        match self.side {
            ReceiveSide::Postcard(_) => Format::Postcard,
            ReceiveSide::Json(_) => Format::Json,
        }
    }

    /// Receives the next message of either lane, or `None` when the peer closed the
    /// channel cleanly between two messages.
    ///
    /// On a [`Format::Json`] channel this also runs Node's handle protocol: a
    /// `NODE_HANDLE` line is answered with `NODE_HANDLE_ACK` at once and delivered as its
    /// inner message with the descriptor (or answered `NODE_HANDLE_NACK` and dropped when
    /// the descriptor did not come, as Node does); the peer's answers to our handles are
    /// consumed here (or by a sender waiting for them) and release the messages held back
    /// behind them. A line that is not valid JSON is an [`Error::DecodeJson`] when decoded,
    /// for that message only. Messages a waiting sender read come first, in order.
    ///
    /// A framing error (oversized frame, a foreign peer's first bytes, unknown lane, missing
    /// or unclaimed descriptors, end of stream inside a frame, a peer that does not read its
    /// acknowledgements) is returned once; afterwards every call returns [`Error::Broken`]
    /// and all queued descriptors are closed.
    pub async fn recv(&mut self) -> Result<Option<Received>, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let result = match &mut self.side {
            ReceiveSide::Postcard(postcard) => postcard.next_message(&self.io).await,
            ReceiveSide::Json(JsonReceive(link)) => next_json(&self.io, link).await,
        };
        self.note(&result);
        result
    }

    /// Returns a message that was already read from the socket, without reading more:
    /// `Ok(None)` means nothing whole is buffered. With [`Sender::feed`], this lets a
    /// peer answer a whole batch of messages with one write.
    ///
    /// [`Sender::feed`]: crate::Sender::feed
    pub fn recv_buffered(&mut self) -> Result<Option<Received>, Error> {
        if self.broken {
            return Err(Error::Broken);
        }
        let result = match &mut self.side {
            ReceiveSide::Postcard(postcard) => postcard.decode_buffered(),
            ReceiveSide::Json(JsonReceive(link)) => {
                let received = link.lock().receive(&self.io, false);
                link.wake_after_reading();
                write_now(&self.io, link);
                match received {
                    Poll::Ready(result) => result,
                    Poll::Pending => Ok(None),
                }
            }
        };
        self.note(&result);
        result
    }

    fn note<T>(&mut self, result: &Result<T, Error>) {
        if let Err(err) = result
            && err.is_fatal_on_receive()
        {
            match &mut self.side {
                ReceiveSide::Json(JsonReceive(link)) => {
                    link.lock().fail();
                    link.moved.notify_waiters();
                }
                ReceiveSide::Postcard(postcard) => {
                    postcard.inbound.batches.clear();
                    postcard.inbound.buf = BytesMut::new();
                }
            }
            self.broken = true;
        }
    }
}

/// [`recv`](Receiver::recv) on a [`Format::Json`] channel.
async fn next_json(io: &UnixStream, link: &NodeLink) -> Result<Option<Received>, Error> {
    loop {
        // Registered before looking, so that a message a sender queues in between
        // wakes us.
        let arrived = link.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let received = link.lock().receive(io, true);
        link.wake_after_reading();
        write_now(io, link);
        if let Poll::Ready(result) = received {
            return result;
        }
        tokio::select! {
            () = &mut arrived => {}
            read = read_more(io, link) => read?,
        }
    }
}

impl PostcardReceive {
    fn decode_buffered(&mut self) -> Result<Option<Received>, Error> {
        let frame = match self.codec.decode(&mut self.inbound.buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            // An oversized first frame that is also gigantic or names no lane is not a
            // frame at all: the peer is no `ipc` channel (Node's JSON starts with `{"`).
            Err(Error::FrameTooLarge { len, max })
                if !self.seen_frame && (len >= FOREIGN_LEN || self.inbound.buf[4] > 1) =>
            {
                let mut head = [0; HEADER_LEN];
                head.copy_from_slice(&self.inbound.buf[..HEADER_LEN]);
                return Err(Error::ForeignProtocol { head, len, max });
            }
            Err(err) => return Err(err),
        };
        self.seen_frame = true;
        let inbound = &mut self.inbound;
        let end = inbound.received - inbound.buf.len() as u64;
        let start = end - (HEADER_LEN + frame.payload.len()) as u64;
        let (fds, fds_lost) = inbound.claim_fds(start, end, usize::from(frame.fd_count))?;
        if frame.payload.len() > RETAINED_BUFFER {
            // The payload shares the buffer's allocation: keep only the bytes after it, so
            // the large allocation goes away with the message.
            inbound.buf = BytesMut::from(&inbound.buf[..]);
        }
        Ok(Some(Received {
            lane: frame.lane,
            payload: frame.payload,
            fds,
            fds_lost,
            encoding: Encoding::Postcard,
        }))
    }

    /// [`recv`](Receiver::recv) on a [`Format::Postcard`] channel.
    async fn next_message(&mut self, io: &UnixStream) -> Result<Option<Received>, Error> {
        loop {
            if let Some(received) = self.decode_buffered()? {
                return Ok(Some(received));
            }
            if self.inbound.eof {
                return self.inbound.end_of_stream(self.codec.is_between_frames());
            }
            self.inbound.check_before_read()?;
            let want = self
                .codec
                .bytes_wanted(self.inbound.buf.len())
                .max(READ_CHUNK);
            let mut fds = Vec::new();
            let inbound = &mut self.inbound;
            let received = io
                .async_io(Interest::READABLE, || inbound.recv_now(io, want, &mut fds))
                .await?;
            inbound.account(received, fds)?;
        }
    }
}

/// Writes what the shared write side of a JSON channel holds, without waiting: an
/// acknowledgement, or messages an acknowledgement released. What the socket does not take
/// now is written by the next send, flush or receive. A write error means the peer is
/// gone: the bytes are dropped, and reading finds the end of the stream.
pub(super) fn write_now(io: &UnixStream, link: &NodeLink) {
    if !link.lock().has_unwritten() {
        return;
    }
    let written = io.try_io(Interest::WRITABLE, || link.lock().write_some(io));
    if let Err(err) = written
        && err.kind() != std::io::ErrorKind::WouldBlock
    {
        link.lock().discard_unwritten();
    }
}

/// Waits until the socket of a JSON channel has bytes to read (writing what waits to be
/// written whenever it takes more), then reads once into the shared read state. What the
/// read brings is decoded by the caller; an error in what came (descriptors no message
/// claims) is queued for the receiver. Cancel-safe: what is read is in the shared state.
pub(super) async fn read_more(io: &UnixStream, link: &NodeLink) -> Result<(), Error> {
    let interest = if link.lock().has_unwritten() {
        Interest::READABLE | Interest::WRITABLE
    } else {
        Interest::READABLE
    };
    let ready = io.ready(interest).await?;
    if ready.is_writable() {
        write_now(io, link);
    }
    if !ready.is_readable() {
        return Ok(());
    }
    let read = io.try_io(Interest::READABLE, || {
        let mut state = link.lock();
        let mut fds = Vec::new();
        let received = state.inbound.recv_now(io, READ_CHUNK, &mut fds)?;
        if let Err(err) = state.inbound.account(received, fds) {
            state.fail_with(err);
        }
        // A sender that reads leaves what follows the answer it wanted undecoded: the
        // receiving half, maybe waiting for the socket, must look at the buffer.
        state.wake_receiver = true;
        Ok(())
    });
    match read {
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        other => Ok(other?),
    }
}
