//! Listening sockets: bound and listening, close-on-exec and non-blocking.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// A listening TCP socket on `address`, with `SO_REUSEADDR` like Node's (libuv's), and
/// `SO_REUSEPORT` when asked. Close-on-exec (socket2 opens with `SOCK_CLOEXEC`) and
/// non-blocking. With `TCP_NODELAY` (see [`set_nodelay`]).
pub(crate) fn bind_listener(
    address: SocketAddr,
    backlog: u32,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = tcp_socket(address)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&address.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    set_nodelay(&socket);
    Ok(socket.into())
}

/// Sets `TCP_NODELAY` on a listening socket. Linux copies it to every connection accepted
/// from it, so a worker's connections have it without a `setsockopt` each (Node's HTTP
/// server and nginx turn Nagle off on every connection anyway; a program that wants it
/// back calls `set_nodelay(false)`). Best effort: a socket that refuses keeps Nagle.
pub(crate) fn set_nodelay(socket: impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(&socket).set_tcp_nodelay(true);
}

/// Fails with `EADDRINUSE` if a socket already holds `address` (a listening
/// `SO_REUSEPORT` one included), by binding, without listening, a socket that does not
/// set `SO_REUSEPORT`. A reuseport socket bound afterwards would otherwise silently join
/// another program's port group. The check and that bind are not atomic: a program that
/// binds in between still joins (documented under the crate's caveats).
pub(crate) fn check_unowned(address: SocketAddr) -> io::Result<()> {
    tcp_socket(address)?.bind(&address.into())
}

/// A listening Unix stream socket at `path` (a leading NUL byte names Linux's abstract
/// namespace), close-on-exec and non-blocking, and the file to remove when it closes
/// (none for an abstract name). As in Node, a path that exists already, a stale socket
/// file included, is `EADDRINUSE`.
pub(crate) fn bind_unix(path: &Path, backlog: u32) -> io::Result<(OwnedFd, Option<UnixPath>)> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.bind(&SockAddr::unix(path)?)?;
    let abstract_name = path.as_os_str().as_bytes().first() == Some(&0);
    let file = (!abstract_name).then(|| UnixPath(path.to_path_buf()));
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok((socket.into(), file))
}

/// The file of a Unix socket this process bound; removed on drop.
#[derive(Debug)]
pub(crate) struct UnixPath(PathBuf);

impl Drop for UnixPath {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::debug!(path = %self.0.display(), error = %e, "could not remove a socket file");
        }
    }
}

/// A TCP socket for `address`'s family with `SO_REUSEADDR`, like Node's (libuv's).
fn tcp_socket(address: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unix_socket_is_in_use_while_bound_and_its_file_goes_with_it() {
        let dir = std::env::temp_dir().join(format!("cluster-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("a.sock");
        let (listener, file) = bind_unix(&path, 16).expect("bind");
        assert!(path.exists());
        let err = bind_unix(&path, 16).expect_err("in use");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        std::os::unix::net::UnixStream::connect(&path).expect("connect");
        drop((listener, file));
        assert!(!path.exists(), "the socket file is removed with the socket");
        std::fs::remove_dir(&dir).expect("rmdir");
    }

    #[test]
    fn an_abstract_name_has_no_file() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("cluster-net-{}", std::process::id());
        let path = PathBuf::from(format!("\0{name}"));
        let (_listener, file) = bind_unix(&path, 16).expect("bind");
        assert!(file.is_none(), "nothing to remove");
        let address = std::os::unix::net::SocketAddr::from_abstract_name(&name).expect("name");
        std::os::unix::net::UnixStream::connect_addr(&address).expect("connect");
    }

    #[test]
    fn a_second_plain_bind_is_address_in_use() {
        let first = bind_listener("127.0.0.1:0".parse().expect("addr"), 16, false).expect("bind");
        let taken = first.local_addr().expect("addr");
        let err = bind_listener(taken, 16, false).expect_err("in use");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
    }

    #[test]
    fn a_port_held_by_a_reuseport_group_is_not_unowned() {
        let group = bind_listener("127.0.0.1:0".parse().expect("addr"), 16, true).expect("bind");
        let taken = group.local_addr().expect("addr");
        let err = check_unowned(taken).expect_err("owned");
        assert_eq!(err.raw_os_error(), Some(libc::EADDRINUSE));
        drop(group);
        check_unowned(taken).expect("free once the group is gone");
    }

    #[test]
    fn reuseport_sockets_share_a_port() {
        let first = bind_listener("127.0.0.1:0".parse().expect("addr"), 16, true).expect("bind");
        let taken = first.local_addr().expect("addr");
        let second = bind_listener(taken, 16, true).expect("reuseport bind");
        assert_eq!(second.local_addr().expect("addr"), taken);
    }

    #[test]
    fn accepted_connections_inherit_tcp_nodelay() {
        let listener =
            bind_listener("127.0.0.1:0".parse().expect("addr"), 16, false).expect("bind");
        let _client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        listener.set_nonblocking(false).expect("blocking");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.nodelay().expect("getsockopt"));
    }
}
