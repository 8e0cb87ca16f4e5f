//! Bytes and descriptors read from a channel's socket and not decoded yet, and the
//! matching of each received descriptor to the frame that declares it: the read state both
//! formats share (a leaf: `receiver.rs` and `node_link.rs` use it, it uses neither).

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};

use bytes::BytesMut;
use tokio::net::UnixStream;

use super::Received;
use crate::{Error, sys};

/// Bytes read from the socket and not decoded yet, with the descriptors that came with them.
#[derive(Debug)]
pub(super) struct Inbound {
    pub(super) buf: BytesMut,
    /// Bytes read from the socket so far: the stream offset just past `buf`.
    pub(super) received: u64,
    /// Received descriptors not yet handed to a frame, one batch per `recvmsg`, in order.
    pub(super) batches: VecDeque<FdBatch>,
    pub(super) control: sys::ControlBuffer,
    pub(super) max_fds: usize,
    pub(super) eof: bool,
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

impl Inbound {
    pub(super) fn new(max_fds: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            received: 0,
            batches: VecDeque::new(),
            control: sys::ControlBuffer::for_fds(max_fds),
            max_fds,
            eof: false,
        }
    }

    /// One `recvmsg` of up to `want` bytes, without waiting.
    pub(super) fn recv_now(
        &mut self,
        io: &UnixStream,
        want: usize,
        fds: &mut Vec<OwnedFd>,
    ) -> std::io::Result<sys::Received> {
        sys::recv(io.as_fd(), &mut self.buf, want, fds, &mut self.control)
    }

    /// Books what one `recvmsg` brought: the end of the stream, or bytes and descriptors.
    pub(super) fn account(
        &mut self,
        received: sys::Received,
        fds: Vec<OwnedFd>,
    ) -> Result<(), Error> {
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
        Ok(())
    }

    /// Before reading more, once every whole frame was decoded: descriptors come with the
    /// first byte of their frame, so more than one batch waiting, or more than one frame's
    /// worth of descriptors, means the peer sent descriptors that no frame claims.
    pub(super) fn check_before_read(&self) -> Result<(), Error> {
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
        Ok(())
    }

    /// At the end of the stream, once everything whole was decoded: clean (`Ok(None)`) if
    /// it came between two messages (`between`) and left no descriptor unclaimed.
    pub(super) fn end_of_stream(&self, between: bool) -> Result<Option<Received>, Error> {
        if !(self.buf.is_empty() && between) {
            Err(Error::UnexpectedEof {
                buffered: self.buf.len(),
            })
        } else if !self.batches.is_empty() {
            Err(Error::UnclaimedFds {
                count: self.batches.iter().map(|b| b.fds.len()).sum(),
            })
        } else {
            Ok(None)
        }
    }

    /// The descriptors of the frame at stream bytes `[start, end)`, which declares
    /// `declared` of them, and whether they were lost (see [`Received::fds_lost`]).
    pub(super) fn claim_fds(
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
}
