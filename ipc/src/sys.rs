//! Linux socket calls: `sendmsg`/`recvmsg` with `SCM_RIGHTS`, and adoption of an
//! inherited descriptor. All of the crate's `unsafe` code lives here.

use std::io::{self, IoSlice};
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockType, SockaddrLike, SockaddrStorage, UnixAddr,
    getsockname, getsockopt, sockopt,
};

/// Writes as much of `data` as the socket takes without blocking. When `fds` is not
/// empty they travel as one `SCM_RIGHTS` control message with the first byte.
///
/// `MSG_NOSIGNAL` turns a write to a closed peer into `EPIPE` instead of `SIGPIPE`.
pub(crate) fn send<F: AsRawFd>(sock: BorrowedFd<'_>, data: &[u8], fds: &[F]) -> io::Result<usize> {
    let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
    let result = if fds.is_empty() {
        nix::sys::socket::send(sock.as_raw_fd(), data, flags)
    } else {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        nix::sys::socket::sendmsg::<UnixAddr>(
            sock.as_raw_fd(),
            &[IoSlice::new(data)],
            &cmsg,
            flags,
            None,
        )
    };
    result.map_err(io::Error::from)
}

/// Room for the control message of one `recvmsg`, aligned for `cmsghdr`.
#[derive(Debug)]
pub(crate) struct ControlBuffer {
    words: Vec<u64>,
    len: usize,
}

impl ControlBuffer {
    /// A buffer with room for one `SCM_RIGHTS` message of up to `max_fds` descriptors.
    pub(crate) fn for_fds(max_fds: usize) -> Self {
        // SAFETY: CMSG_SPACE only computes a size from its argument.
        let len =
            unsafe { libc::CMSG_SPACE((max_fds.max(1) * mem::size_of::<RawFd>()) as u32) } as usize;
        Self {
            words: vec![0; len.div_ceil(mem::size_of::<u64>())],
            len,
        }
    }
}

/// What one `recvmsg` produced.
#[derive(Debug)]
pub(crate) enum Received {
    /// `n` bytes were appended to the buffer (0 means end of stream).
    Bytes(usize),
    /// `n` bytes were appended, but the kernel truncated the control message: the
    /// descriptors it could install are in `fds`, the others were closed. Either the peer
    /// sent more than the buffer holds, or this process is out of descriptors.
    Truncated(usize),
}

/// Reads up to `want` bytes into the spare capacity of `buf` without blocking, appending
/// any received descriptors to `fds`. Descriptors arrive close-on-exec
/// (`MSG_CMSG_CLOEXEC`).
pub(crate) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut BytesMut,
    want: usize,
    fds: &mut Vec<OwnedFd>,
    control: &mut ControlBuffer,
) -> io::Result<Received> {
    buf.reserve(want);
    let spare: &mut [MaybeUninit<u8>] = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.words.as_mut_ptr().cast();
    msg.msg_controllen = control.len as _;

    let flags = libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT;
    // SAFETY: `msg` points at one iovec covering the spare capacity of `buf`, which stays
    // borrowed and unmoved for the call, and at a control buffer of `control.len` bytes
    // aligned for cmsghdr. The kernel writes at most those lengths.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };

    // SAFETY: `msg` was filled in by a successful recvmsg and its control buffer is still
    // alive; CMSG_FIRSTHDR/CMSG_NXTHDR stay within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is non-null and points into the control buffer (see above).
        let header = unsafe { &*cmsg };
        if header.cmsg_level == libc::SOL_SOCKET && header.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let data_len = header.cmsg_len as usize - unsafe { libc::CMSG_LEN(0) } as usize;
            // SAFETY: CMSG_DATA points at the payload of this control message.
            let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
            for i in 0..data_len / mem::size_of::<RawFd>() {
                // SAFETY: `i` is within the payload; the data may be unaligned.
                let raw = unsafe { data.add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `raw` in this process as a new descriptor
                // that nothing else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Ok(Received::Truncated(n));
    }
    Ok(Received::Bytes(n))
}

static INHERITED_TAKEN: AtomicBool = AtomicBool::new(false);

/// Takes ownership of descriptor `raw`, inherited from the parent, after checking that it
/// is an open `AF_UNIX` `SOCK_STREAM` socket, and marks it close-on-exec so it does not
/// leak into this process's own children. Returns `Ok(None)` if an earlier call already
/// took it.
pub(crate) fn take_inherited(raw: RawFd) -> Result<Option<OwnedFd>, String> {
    if raw < 0 {
        return Err("not a file descriptor".into());
    }
    if INHERITED_TAKEN
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Ok(None);
    }
    let checked = check_inherited(raw);
    if checked.is_err() {
        INHERITED_TAKEN.store(false, Ordering::Release);
    }
    checked.map(Some)
}

fn check_inherited(raw: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: the borrow is used only for the checks below; F_GETFD fails with EBADF if
    // `raw` is not open, before anything else uses it.
    let fd = unsafe { BorrowedFd::borrow_raw(raw) };
    fcntl(fd, FcntlArg::F_GETFD).map_err(|e| format!("descriptor is not open ({e})"))?;
    let addr = getsockname::<SockaddrStorage>(raw)
        .map_err(|e| format!("descriptor is not a socket ({e})"))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(format!("socket is {:?}, not a Unix socket", addr.family()));
    }
    let ty = getsockopt(&fd, sockopt::SockType).map_err(|e| e.to_string())?;
    if ty != SockType::Stream {
        return Err(format!("socket is {ty:?}, not a stream socket"));
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| e.to_string())?;
    // SAFETY: `raw` is open, and it is the descriptor the parent handed this process for
    // its channel: the environment variable is the contract that nothing else owns it,
    // and INHERITED_TAKEN makes sure this process creates only one owner.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}
