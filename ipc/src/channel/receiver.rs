//! The read half of a channel: [`Receiver`], framing, and matching received
//! descriptors to the frames that declare them.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytes::BytesMut;

use tokio::io::Interest;
use tokio::net::UnixStream;

use super::node_link::NodeLink;

use super::{FOREIGN_LEN, Format, READ_CHUNK, RETAINED_BUFFER, Received};
use crate::codec::{FrameCodec, HEADER_LEN, Lane};
use crate::json::{self, LineCodec, LineKind};
use crate::{Error, sys};

/// The receiving half of a [`Channel`].
///
/// # Cancellation
///
/// [`recv`](Receiver::recv) is cancel-safe: all state lives in the receiver, so dropping
/// the future loses no message and no descriptor; the next call picks up where it was.
#[derive(Debug)]
pub struct Receiver {
    pub(super) io: Arc<UnixStream>,
    pub(super) codec: FrameCodec,
    /// The line codec and the shared write side of a [`Format::Json`] channel.
    pub(super) node: Option<NodeReceive>,
    pub(super) buf: BytesMut,
    /// Bytes read from the socket so far: the stream offset just past `buf`.
    pub(super) received: u64,
    /// Received descriptors not yet handed to a frame, one batch per `recvmsg`, in order.
    pub(super) batches: VecDeque<FdBatch>,
    pub(super) control: sys::ControlBuffer,
    pub(super) max_fds: usize,
    /// Whether a whole frame has been decoded (until then a bad header may mean a foreign
    /// peer).
    pub(super) seen_frame: bool,
    pub(super) eof: bool,
    pub(super) broken: bool,
}

/// The receiving state of a [`Format::Json`] channel.
#[derive(Debug)]
pub(super) struct NodeReceive {
    pub(super) lines: LineCodec,
    pub(super) link: Arc<NodeLink>,
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
pub(super) struct FdBatch {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) fds: Vec<OwnedFd>,
    /// The kernel could not install them (this process was out of descriptors): the frame
    /// that claims them gets none and says so ([`Received::fds_lost`]).
    pub(super) lost: bool,
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
            let line = json::replace_lone_surrogates(line);
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
                    })?;
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
                link.lock().discard_unwritten();
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
