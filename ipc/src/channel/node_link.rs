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
//! it, so only that wait keeps the order. The receiving half reads the answers and writes the
//! acknowledgements for the peer's handles, so both halves write: every write goes through
//! this one [`LinkState`], under a mutex that is never held across an `.await`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::UnixStream;

use crate::{Error, sys};

/// How many times Node sends a handle again after a `NODE_HANDLE_NACK`.
const MAX_RETRANSMISSIONS: u8 = 3;

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
    /// The receiving half has seen the end of the stream or was dropped: no answer will
    /// come, so a sender must not wait for one.
    pub(crate) closed: bool,
    /// A handle the peer refused too often, to be reported once by the receiving half.
    dropped: Option<u8>,
}

/// The shared write side of a Node JSON channel.
#[derive(Debug)]
pub(crate) struct NodeLink {
    state: Mutex<LinkState>,
    /// Woken when held-back messages move on (an acknowledgement came).
    pub(crate) moved: tokio::sync::Notify,
}

impl NodeLink {
    pub(crate) fn new(limits: HoldBack) -> Self {
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
                dropped: None,
            }),
            moved: tokio::sync::Notify::new(),
        }
    }

    /// The state. A panic while it was held cannot leave it inconsistent in a way that
    /// matters more than the panic itself, so a poisoned lock is used as is.
    pub(crate) fn lock(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`LinkState::enqueue`], returning the bytes then waiting to be written; the line
    /// comes back when the hold-back queue is full, and nothing is queued once the
    /// receiving half is gone ([`Error::Closed`]).
    pub(crate) fn enqueue(&self, line: Line) -> Result<Result<usize, Line>, Error> {
        let mut state = self.lock();
        if state.closed {
            return Err(Error::Closed);
        }
        Ok(state.enqueue(line).map(|()| state.buf.len()))
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
    /// flight. Gives the line back when the hold-back queue is full.
    pub(crate) fn enqueue(&mut self, line: Line) -> Result<(), Line> {
        if self.held.is_empty() && self.may_go(line.fd.is_some()) {
            self.start(line);
            return Ok(());
        }
        let full = !self.held.is_empty()
            && (self.held.len() >= self.limits.messages
                || self.held_bytes + line.bytes.len() > self.limits.bytes);
        if full {
            return Err(line);
        }
        self.held_bytes += line.bytes.len();
        self.held.push_back(line);
        Ok(())
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
    /// never held back, and never queue without bound: a peer that lets
    /// [`MAX_UNWRITTEN_ANSWERS`] of them wait unwritten and sends another handle does not
    /// read, and the channel ends ([`Error::PeerNotReading`]).
    pub(crate) fn answer(&mut self, line: &[u8]) -> Result<(), Error> {
        while self.answers.front().is_some_and(|&end| end <= self.written) {
            self.answers.pop_front();
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
                self.dropped = Some(in_flight.attempts);
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

    /// A handle dropped after too many refusals, once.
    pub(crate) fn take_dropped(&mut self) -> Option<u8> {
        self.dropped.take()
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

    /// Whether bytes wait to be written.
    pub(crate) fn has_unwritten(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> LinkState {
        link_with(2, 1)
    }

    fn link_with(messages: usize, handles: usize) -> LinkState {
        NodeLink::new(HoldBack {
            messages,
            bytes: 1024,
            handles,
        })
        .state
        .into_inner()
        .unwrap()
    }

    fn line(text: &str, fd: bool) -> Line {
        Line::new(
            Bytes::copy_from_slice(text.as_bytes()),
            fd.then(|| std::io::pipe().expect("pipe").0.into()),
        )
    }

    /// Takes what would be written, as the socket would.
    fn written(state: &mut LinkState) -> String {
        let text = String::from_utf8(state.buf.to_vec()).unwrap();
        state.written += state.buf.len() as u64;
        state.buf.clear();
        state.fd_at_front = false;
        state.pump();
        text
    }

    #[test]
    fn messages_after_a_handle_wait_for_its_acknowledgement() {
        let mut state = link();
        state.enqueue(line("a;", false)).unwrap();
        // A handle waits for the bytes ahead of it so that its fd rides on its first byte.
        state.enqueue(line("h1;", true)).unwrap();
        state.enqueue(line("b;", false)).unwrap();
        assert_eq!(written(&mut state), "a;");
        assert!(
            state.fd_at_front,
            "the descriptor rides on the handle's first byte"
        );
        assert_eq!(written(&mut state), "h1;");
        // Answers to the peer's handles are never held back.
        state.answer(b"ack;").unwrap();
        assert_eq!(written(&mut state), "ack;");
        assert!(state.acknowledged());
        assert_eq!(written(&mut state), "b;");
        assert!(state.is_open());
    }

    #[test]
    fn the_hold_back_queue_is_bounded() {
        let mut state = link();
        state.enqueue(line("h;", true)).unwrap();
        state.enqueue(line("1;", false)).unwrap();
        state.enqueue(line("2;", false)).unwrap();
        let refused = state.enqueue(line("3;", false)).unwrap_err();
        assert_eq!(&refused.bytes[..], b"3;");
        written(&mut state);
        state.acknowledged();
        assert_eq!(written(&mut state), "1;2;");
        state.enqueue(refused).unwrap();
    }

    #[test]
    fn a_refused_handle_is_sent_again_then_dropped() {
        let mut state = link();
        state.enqueue(line("h;", true)).unwrap();
        state.enqueue(line("after;", false)).unwrap();
        for _ in 0..MAX_RETRANSMISSIONS {
            assert_eq!(written(&mut state), "h;");
            state.refused();
            assert!(state.fd_at_front, "the descriptor goes again");
        }
        assert_eq!(written(&mut state), "h;");
        state.refused();
        assert_eq!(state.take_dropped(), Some(MAX_RETRANSMISSIONS + 1));
        assert_eq!(written(&mut state), "after;");
    }

    #[test]
    fn several_handles_in_flight_each_start_a_write_and_are_answered_in_order() {
        let mut state = link_with(4, 2);
        state.enqueue(line("h1;", true)).unwrap();
        state.enqueue(line("h2;", true)).unwrap();
        state.enqueue(line("h3;", true)).unwrap();
        state.enqueue(line("m;", false)).unwrap();
        assert!(state.fd_at_front);
        assert_eq!(written(&mut state), "h1;");
        assert!(state.fd_at_front, "the second handle starts its own write");
        assert_eq!(written(&mut state), "h2;");
        // Two in flight: the third waits, and what is queued behind it keeps its place.
        assert_eq!(written(&mut state), "");
        assert_eq!(state.in_flight.len(), 2);
        // The peer refuses h1: it goes again at once (h2 alone is in flight), ahead of h3.
        state.refused();
        assert_eq!(written(&mut state), "h1;");
        assert_eq!(written(&mut state), "", "h3 waits for room");
        assert!(state.acknowledged(), "h2 answered: h3 may go");
        assert_eq!(written(&mut state), "h3;");
        // A plain message waits until every handle ahead of it is answered.
        assert!(!state.acknowledged(), "h3 is still in flight");
        assert_eq!(written(&mut state), "");
        assert!(state.acknowledged());
        assert_eq!(written(&mut state), "m;");
        assert!(state.in_flight.is_empty() && state.is_open());
    }

    #[test]
    fn answers_the_peer_does_not_read_are_bounded() {
        let mut state = link();
        for _ in 0..MAX_UNWRITTEN_ANSWERS {
            state.answer(b"nack;").unwrap();
        }
        let err = state.answer(b"nack;").unwrap_err();
        assert!(
            matches!(err, Error::PeerNotReading { unwritten } if unwritten == MAX_UNWRITTEN_ANSWERS),
            "{err:?}"
        );
        assert_eq!(state.buf.len(), MAX_UNWRITTEN_ANSWERS * b"nack;".len());
        // Once written, answers no longer count.
        written(&mut state);
        assert_eq!(state.unwritten_answers(), 0);
        state.answer(b"ack;").unwrap();
        assert_eq!(state.unwritten_answers(), 1);
    }
}
