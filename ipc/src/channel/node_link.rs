//! The write side of a Node JSON channel, shared by its sending and receiving halves: the
//! bytes to write, the handle waiting for its acknowledgement and the messages held back
//! behind it.
//!
//! Node's rule: after a `NODE_HANDLE` line, the sender writes nothing but `NODE_HANDLE_ACK`
//! and `NODE_HANDLE_NACK` lines until the peer answered; a `NACK` makes it send the handle
//! again (up to 3 more times). With [`HoldBack::handles`] above one (opt-in, see
//! [`Config::handles_in_flight`](crate::Config::handles_in_flight)) up to that many handle
//! lines go out back to back and wait for their answers at once, answered in the order
//! sent; each still starts its own `sendmsg`, so the peer reads at most one descriptor per
//! read, as Node's receiver requires. Any other line still waits until every handle is
//! answered: Node delivers a handle's message a tick later than a plain message read with
//! it, so only that wait keeps the order.
//!
//! Both halves read and write. The receiving half reads the answers and writes the
//! acknowledgements for the peer's handles; a sender that waits for an answer (its
//! hold-back queue is full) reads the socket itself, so that a program that only sends
//! never blocks for want of someone calling `recv`: what it reads on the way waits for the
//! receiving half in the inbox, bounded like the hold-back queue (a full inbox makes the
//! sender wait for `recv`). So the read state lives here too, in this one [`LinkState`],
//! under a mutex that is never held across an `.await`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::UnixStream;

use super::inbound::Inbound;
use super::{Encoding, RETAINED_BUFFER, Received};
use crate::json::{self, Incoming, LineCodec};
use crate::{Error, sys};

/// How many times Node sends a handle again after a `NODE_HANDLE_NACK`.
pub(crate) const MAX_RETRANSMISSIONS: u8 = 3;

/// The most answers (`NODE_HANDLE_ACK`/`NACK`) to the peer's handles that may wait unwritten
/// because the peer does not read: one more ends the channel with
/// [`Error::PeerNotReading`]. A peer that follows the protocol waits for each answer
/// (Node), or for a few at once (`handles_in_flight`), so it never comes near this.
pub(crate) const MAX_UNWRITTEN_ANSWERS: usize = 1024;

/// One encoded line (newline included) and the descriptor it carries, if any.
#[derive(Debug)]
pub(crate) struct Line {
    pub(crate) bytes: Bytes,
    pub(crate) fd: Option<OwnedFd>,
    /// How many times a handle line was sent before (after `NODE_HANDLE_NACK`s).
    sent: u8,
}

impl Line {
    pub(crate) fn new(bytes: Bytes, fd: Option<OwnedFd>) -> Self {
        Self { bytes, fd, sent: 0 }
    }
}

/// The handle last written, kept until the peer acknowledges it.
#[derive(Debug)]
struct InFlight {
    line: Bytes,
    fd: OwnedFd,
    attempts: u8,
}

/// Bounds of the hold-back queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HoldBack {
    /// Messages.
    pub(crate) messages: usize,
    /// Bytes of the messages.
    pub(crate) bytes: usize,
    /// Handles sent and not yet answered, at most (Node's rule: 1).
    pub(crate) handles: usize,
}

#[derive(Debug)]
pub(crate) struct LinkState {
    /// Bytes to write, in order.
    pub(crate) buf: BytesMut,
    /// Bytes written from `buf` so far: the offset in the outgoing stream of its first byte.
    written: u64,
    /// Where each answer not yet wholly written ends in the outgoing stream, oldest first
    /// (at most [`MAX_UNWRITTEN_ANSWERS`]).
    answers: VecDeque<u64>,
    /// Whether the newest in-flight handle's descriptor goes with the first byte of `buf`.
    fd_at_front: bool,
    /// Handles sent and not yet answered, oldest first (the peer answers in order).
    in_flight: VecDeque<InFlight>,
    /// Messages waiting for the in-flight handle's acknowledgement (or, for a handle, for
    /// `buf` to be written out so that its descriptor rides on its first byte).
    held: VecDeque<Line>,
    held_bytes: usize,
    limits: HoldBack,
    /// The end of the stream was read, or reading failed: no answer will come, so a
    /// sender must not wait for one.
    pub(crate) closed: bool,
    /// Handles the peer refused too often (with their lines), each to be reported once by
    /// the receiving half.
    dropped: std::collections::VecDeque<(u8, Bytes)>,
    /// Bytes and descriptors read and not decoded yet.
    pub(crate) inbound: Inbound,
    lines: LineCodec,
    /// Messages (and errors about one message) a waiting sender read, for the receiving
    /// half, in order; at most `limits.messages` and `limits.bytes` of payload.
    inbox: VecDeque<Result<Received, Error>>,
    inbox_bytes: usize,
    /// The receiving half was dropped: what a sender reads is dropped.
    receiver_gone: bool,
    /// Reading met an error that ends the stream: nothing more is decoded.
    read_failed: bool,
    /// Held-back messages moved on, the inbox has room again, or the stream ended: a
    /// waiting sender should look again.
    wake_sender: bool,
    /// A sender put something in the inbox or read bytes: a waiting receiver should look
    /// again.
    pub(crate) wake_receiver: bool,
}

/// What a sender waiting for an acknowledgement found when it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SenderRead {
    /// An answer came: held-back messages moved on.
    Released,
    /// Everything read is decoded and no answer was among it: read more.
    NeedBytes,
    /// The inbox is full: wait for the receiving half to take from it.
    InboxFull,
}

/// The shared write side of a Node JSON channel.
#[derive(Debug)]
pub(crate) struct NodeLink {
    state: Mutex<LinkState>,
    /// Woken when held-back messages move on (an acknowledgement came), the inbox has
    /// room again, or the stream ended.
    pub(crate) moved: tokio::sync::Notify,
    /// Woken when a sender put a message in the inbox.
    pub(crate) arrived: tokio::sync::Notify,
}

impl NodeLink {
    pub(crate) fn new(limits: HoldBack, max_line_len: u32, max_fds: usize) -> Self {
        Self {
            state: Mutex::new(LinkState {
                buf: BytesMut::new(),
                written: 0,
                answers: VecDeque::new(),
                fd_at_front: false,
                in_flight: VecDeque::new(),
                held: VecDeque::new(),
                held_bytes: 0,
                limits,
                closed: false,
                dropped: std::collections::VecDeque::new(),
                inbound: Inbound::new(max_fds),
                lines: LineCodec::new(max_line_len),
                inbox: VecDeque::new(),
                inbox_bytes: 0,
                receiver_gone: false,
                read_failed: false,
                wake_sender: false,
                wake_receiver: false,
            }),
            moved: tokio::sync::Notify::new(),
            arrived: tokio::sync::Notify::new(),
        }
    }

    /// Wakes whoever what was just read concerns (see [`LinkState::receive`] and
    /// [`LinkState::read_for_sender`]).
    pub(crate) fn wake_after_reading(&self) {
        let (sender, receiver) = {
            let mut state = self.lock();
            (
                std::mem::take(&mut state.wake_sender),
                std::mem::take(&mut state.wake_receiver),
            )
        };
        if sender {
            self.moved.notify_waiters();
        }
        if receiver {
            self.arrived.notify_waiters();
        }
    }

    /// The state. A panic while it was held cannot leave it inconsistent in a way that
    /// matters more than the panic itself, so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`LinkState::enqueue`], returning the bytes then waiting to be written and whether
    /// the line was held back; the line comes back when the hold-back queue is full, and
    /// nothing is queued once the stream ended ([`Error::Closed`]).
    pub(crate) fn enqueue(&self, line: Line) -> Result<Result<(usize, bool), Line>, Error> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        Ok(state.enqueue(line).map(|held| (state.buf.len(), held)))
    }
}

impl LinkState {
    /// Whether a message without a handle can go straight into the write buffer: nothing
    /// held back and no handle waiting for its answer.
    pub(crate) fn is_open(&self) -> bool {
        self.held.is_empty() && self.may_go(false)
    }

    /// Whether a line may start now, ignoring what is held back: a handle once its
    /// descriptor can ride on its first byte and the in-flight bound has room; another
    /// line once no handle waits for its answer.
    fn may_go(&self, handle: bool) -> bool {
        if handle {
            self.buf.is_empty() && self.in_flight.len() < self.limits.handles
        } else {
            self.in_flight.is_empty()
        }
    }

    /// Queues a line: into the write buffer if it may go now, else behind the handles in
    /// flight (returns whether it was held back). Gives the line back when the hold-back
    /// queue is full.
    pub(crate) fn enqueue(&mut self, line: Line) -> Result<bool, Line> {
        if self.held.is_empty() && self.may_go(line.fd.is_some()) {
            self.start(line);
            return Ok(false);
        }
        let full = !self.held.is_empty()
            && (self.held.len() >= self.limits.messages
                || self.held_bytes + line.bytes.len() > self.limits.bytes);
        if full {
            return Err(line);
        }
        self.held_bytes += line.bytes.len();
        self.held.push_back(line);
        Ok(true)
    }

    /// Appends a line to the write buffer; a handle becomes the one in flight.
    fn start(&mut self, line: Line) {
        if let Some(fd) = line.fd {
            debug_assert!(self.buf.is_empty() && self.in_flight.len() < self.limits.handles);
            self.in_flight.push_back(InFlight {
                line: line.bytes.clone(),
                fd,
                attempts: line.sent + 1,
            });
            self.fd_at_front = true;
        }
        self.buf.extend_from_slice(&line.bytes);
    }

    /// Moves held-back lines into the write buffer while they may go. Returns whether any
    /// moved.
    fn pump(&mut self) -> bool {
        let mut moved = false;
        while let Some(front) = self.held.front() {
            if !self.may_go(front.fd.is_some()) {
                break;
            }
            let line = self.held.pop_front().expect("a front line");
            self.held_bytes -= line.bytes.len();
            self.start(line);
            moved = true;
        }
        moved
    }

    /// Appends an acknowledgement (or a negative one) for the peer's handle. Answers are
    /// never held back, and never queue without bound: at [`MAX_UNWRITTEN_ANSWERS`] this
    /// writes what the socket (`io`) takes, without waiting, and if that many still wait
    /// the peer does not read and the channel ends ([`Error::PeerNotReading`]).
    pub(crate) fn answer(&mut self, line: &[u8], io: Option<&UnixStream>) -> Result<(), Error> {
        self.forget_written_answers();
        if self.answers.len() >= MAX_UNWRITTEN_ANSWERS
            && let Some(io) = io
        {
            // A batch of handles read at once is answered at once: write before judging.
            match self.write_some(io) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                // The peer is gone: reading will find the end of the stream.
                Err(_) => self.discard_unwritten(),
            }
            self.forget_written_answers();
        }
        if self.answers.len() >= MAX_UNWRITTEN_ANSWERS {
            return Err(Error::PeerNotReading {
                unwritten: self.answers.len(),
            });
        }
        self.buf.extend_from_slice(line);
        self.answers.push_back(self.written + self.buf.len() as u64);
        Ok(())
    }

    fn forget_written_answers(&mut self) {
        while self.answers.front().is_some_and(|&end| end <= self.written) {
            self.answers.pop_front();
        }
    }

    /// Answers to the peer's handles that are not wholly written yet.
    #[cfg(test)]
    pub(crate) fn unwritten_answers(&self) -> usize {
        self.answers
            .iter()
            .filter(|&&end| end > self.written)
            .count()
    }

    /// Drops everything unwritten: the peer is gone.
    pub(crate) fn discard_unwritten(&mut self) {
        self.written += self.buf.len() as u64;
        self.buf.clear();
        self.answers.clear();
    }

    /// The peer acknowledged the oldest handle in flight: close our copy, let the next
    /// messages go. An answer to no handle is ignored, as Node does.
    pub(crate) fn acknowledged(&mut self) -> bool {
        self.in_flight.pop_front();
        self.pump()
    }

    /// The peer did not get the oldest handle's descriptor: send it again, up to Node's
    /// limit, behind what is being written and ahead of everything held back.
    pub(crate) fn refused(&mut self) -> bool {
        if let Some(in_flight) = self.in_flight.pop_front() {
            if in_flight.attempts > MAX_RETRANSMISSIONS {
                // At most the handles in flight: bounded by `handles_in_flight`.
                self.dropped.push_back((in_flight.attempts, in_flight.line));
            } else {
                self.held_bytes += in_flight.line.len();
                self.held.push_front(Line {
                    bytes: in_flight.line,
                    fd: Some(in_flight.fd),
                    sent: in_flight.attempts,
                });
            }
        }
        self.pump()
    }

    /// A handle dropped after too many refusals, once: how often it was sent, and its
    /// line.
    pub(crate) fn take_dropped(&mut self) -> Option<(u8, Bytes)> {
        self.dropped.pop_front()
    }

    /// Writes as much of the buffer as the socket takes without blocking. Returns
    /// `Ok(true)` once the buffer is empty; `WouldBlock` when the socket is full.
    pub(crate) fn write_some(&mut self, io: &UnixStream) -> io::Result<bool> {
        loop {
            if self.buf.is_empty() {
                self.pump();
                if self.buf.is_empty() {
                    return Ok(true);
                }
            }
            let written = match (self.in_flight.back(), self.fd_at_front) {
                (Some(in_flight), true) => {
                    sys::send(io.as_fd(), &self.buf, std::slice::from_ref(&in_flight.fd))?
                }
                _ => sys::send::<OwnedFd>(io.as_fd(), &self.buf, &[])?,
            };
            self.fd_at_front = false;
            self.buf.advance(written);
            self.written += written as u64;
            if self.buf.is_empty() && self.buf.capacity() > super::RETAINED_BUFFER {
                self.buf = BytesMut::new();
            }
        }
    }

    /// Whether messages are held back behind a handle.
    pub(crate) fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether bytes wait to be written.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.buf.is_empty()
    }

    /// For the receiving half: the next message, first from the inbox, then from what was
    /// read; `Pending` when more must be read. At the end of the stream (only when `wait`,
    /// else it is `Pending` too): `Ok(None)` for a clean end, or the error.
    pub(crate) fn receive(
        &mut self,
        io: &UnixStream,
        wait: bool,
    ) -> Poll<Result<Option<Received>, Error>> {
        if let Some(item) = self.inbox.pop_front() {
            if let Ok(message) = &item {
                self.inbox_bytes -= message.payload.len();
            }
            self.wake_sender = true;
            return Poll::Ready(item.map(Some));
        }
        if self.read_failed {
            return Poll::Ready(Err(Error::Broken));
        }
        match self.decode_next(io) {
            Ok(Some(message)) => Poll::Ready(Ok(Some(message))),
            Err(err) => {
                if err.is_fatal_on_receive() {
                    self.fail();
                }
                Poll::Ready(Err(err))
            }
            Ok(None) if !wait => Poll::Pending,
            Ok(None) if self.inbound.eof => {
                self.closed = true;
                self.wake_sender = true;
                Poll::Ready(self.inbound.end_of_stream(self.lines.is_between_lines()))
            }
            Ok(None) => match self.inbound.check_before_read() {
                Ok(()) => Poll::Pending,
                Err(err) => {
                    self.fail();
                    Poll::Ready(Err(err))
                }
            },
        }
    }

    /// For a sender waiting for an answer: decodes what was read, running the handle
    /// protocol, and moves the messages found to the inbox while it has room. An error that
    /// ends the stream is queued for the receiving half, and the sender gets
    /// [`Error::Broken`]; the end of the stream is [`Error::Closed`].
    pub(crate) fn read_for_sender(&mut self, io: &UnixStream) -> Result<SenderRead, Error> {
        // The sender is the only one who waits for `moved`, and it looks now.
        self.wake_sender = false;
        loop {
            if self.read_failed {
                return Err(Error::Broken);
            }
            if self.closed {
                return Err(Error::Closed);
            }
            if self.inbox_is_full() {
                return Ok(SenderRead::InboxFull);
            }
            let decoded = self.decode_next(io);
            if self.wake_sender {
                if let Ok(Some(message)) = decoded {
                    self.deliver(Ok(message));
                } else if let Err(err) = decoded {
                    self.deliver(Err(err));
                }
                return Ok(SenderRead::Released);
            }
            match decoded {
                Ok(Some(message)) => self.deliver(Ok(message)),
                Err(err) if !err.is_fatal_on_receive() => self.deliver(Err(err)),
                Err(err) => {
                    self.fail_with(err);
                    return Err(Error::Broken);
                }
                Ok(None) if self.inbound.eof => {
                    // The receiving half reports how the stream ended.
                    self.closed = true;
                    self.wake_receiver = true;
                    return Err(Error::Closed);
                }
                Ok(None) => {
                    if let Err(err) = self.inbound.check_before_read() {
                        self.fail_with(err);
                        return Err(Error::Broken);
                    }
                    return Ok(SenderRead::NeedBytes);
                }
            }
        }
    }

    /// Messages waiting in the inbox.
    #[cfg(test)]
    pub(crate) fn inbox_len(&self) -> usize {
        self.inbox.len()
    }

    fn inbox_is_full(&self) -> bool {
        !self.receiver_gone
            && (self.inbox.len() >= self.limits.messages || self.inbox_bytes >= self.limits.bytes)
    }

    /// Puts what a sender read in the inbox (or drops it once the receiver is gone).
    fn deliver(&mut self, item: Result<Received, Error>) {
        if self.receiver_gone {
            return;
        }
        if let Ok(message) = &item {
            self.inbox_bytes += message.payload.len();
        }
        self.inbox.push_back(item);
        self.wake_receiver = true;
    }

    /// Reading failed for good: nothing more is decoded, no answer will come.
    pub(crate) fn fail(&mut self) {
        self.read_failed = true;
        self.closed = true;
        self.inbound.batches.clear();
        self.inbound.buf = BytesMut::new();
        self.wake_sender = true;
        self.wake_receiver = true;
    }

    /// [`fail`](LinkState::fail) because of `err`, which the receiving half reports after
    /// the messages read before it.
    pub(crate) fn fail_with(&mut self, err: Error) {
        if self.read_failed {
            return;
        }
        self.fail();
        self.deliver(Err(err));
    }

    /// The receiving half is gone: what is queued for it goes, and so will what comes.
    pub(crate) fn receiver_dropped(&mut self) {
        self.receiver_gone = true;
        self.inbox.clear();
        self.inbox_bytes = 0;
    }

    /// Decodes the next line read, running the handle protocol on the way: answers come
    /// off here (releasing held-back messages), handles are acknowledged. `Ok(None)` when
    /// no whole line is buffered.
    fn decode_next(&mut self, io: &UnixStream) -> Result<Option<Received>, Error> {
        loop {
            if let Some((attempts, line)) = self.take_dropped() {
                let message = dropped_message(line);
                return Err(Error::HandleDropped {
                    attempts,
                    message: Box::new(message),
                });
            }
            let Some(line) = self.lines.decode(&mut self.inbound.buf)? else {
                return Ok(None);
            };
            let line = json::replace_lone_surrogates(line);
            let end = self.inbound.received - self.inbound.buf.len() as u64;
            let start = end - line.len() as u64 - 1;
            if line.len() > RETAINED_BUFFER {
                self.inbound.buf = BytesMut::from(&self.inbound.buf[..]);
            }
            let incoming = json::sort(&line);
            let declared = usize::from(matches!(incoming, Incoming::Handle(_)));
            // A handle whose descriptor did not come (or was lost for lack of descriptors)
            // is refused with NACK below, and Node sends it again.
            let fds = match self.inbound.claim_fds(start, end, declared) {
                Err(Error::MissingFds { received: 0, .. }) => Vec::new(),
                other => other?.0,
            };
            let (lane, payload, handle) = match incoming {
                Incoming::Message(lane) => (lane, line, None),
                Incoming::Ack => {
                    self.wake_sender |= self.acknowledged();
                    continue;
                }
                Incoming::Nack => {
                    self.wake_sender |= self.refused();
                    continue;
                }
                Incoming::Handle(parsed) => {
                    let received = !fds.is_empty();
                    let answer = if received {
                        json::ACK_LINE
                    } else {
                        json::NACK_LINE
                    };
                    self.answer(answer, Some(io))?;
                    if !received {
                        continue;
                    }
                    let handle = parsed.map_err(Error::InvalidHandle)?;
                    (handle.lane(), handle.msg, Some(handle.handle_type))
                }
            };
            return Ok(Some(Received {
                lane,
                payload,
                fds,
                fds_lost: false,
                encoding: Encoding::Json { handle },
            }));
        }
    }
}

/// The message a dropped handle carried, as it would have been received (without its
/// descriptor), so that the sender's user learns which one it was.
fn dropped_message(line: Bytes) -> Received {
    let line = line
        .strip_suffix(b"\n")
        .map_or(line.clone(), |l| line.slice(..l.len()));
    let (lane, payload, handle) = match json::sort(&line) {
        Incoming::Handle(Ok(handle)) => (handle.lane(), handle.msg, Some(handle.handle_type)),
        _ => (crate::codec::Lane::User, line, None),
    };
    Received {
        lane,
        payload,
        fds: Vec::new(),
        fds_lost: true,
        encoding: Encoding::Json { handle },
    }
}

#[cfg(test)]
mod tests;
