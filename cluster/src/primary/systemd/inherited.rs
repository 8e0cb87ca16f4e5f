//! The listening sockets passed at exec (`LISTEN_FDS`, see the parent module's docs):
//! read once per process into a process-wide slot, checked, and adopted.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, PoisonError};

use socket2::{Protocol, SockRef, Socket, Type};

/// One inherited listening TCP socket.
#[derive(Debug)]
pub(crate) struct InheritedSocket {
    pub(crate) listener: TcpListener,
    pub(crate) address: SocketAddr,
    pub(crate) name: String,
    /// Whether it has `SO_REUSEPORT` (a systemd `ReusePort=yes` socket, or a reuseport
    /// slot of an upgrading primary): siblings may be bound next to it.
    pub(crate) reuse_port: bool,
}

/// The descriptors this process inherited.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    pub(crate) sockets: Vec<InheritedSocket>,
    /// Passed listening sockets that are not TCP: kept open, never used, passed on by an
    /// upgrade.
    pub(crate) others: Vec<(OwnedFd, String)>,
}

/// Where this process's inherited sockets are: not read yet, read and waiting for the
/// primary, or given to it.
#[derive(Debug)]
enum InheritedSlot {
    Unread,
    Held(Inherited),
    Given,
}

/// The process-wide slot of the inherited sockets (`LISTEN_FDS` is about this process, so
/// it is read at most once per process).
static SLOT: Mutex<InheritedSlot> = Mutex::new(InheritedSlot::Unread);

fn slot() -> MutexGuard<'static, InheritedSlot> {
    SLOT.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes the listening sockets passed at exec (systemd's socket activation, or a primary
/// upgrading to this one) into a process-wide slot, where the [`Primary`](crate::Primary)
/// finds them. Call it first thing in `main`, before creating a tokio runtime or opening
/// anything else, and after installing a `tracing` subscriber to see its warnings.
///
/// `LISTEN_FDS` counts descriptors from fd 3 on; systemd passes exactly that many, but
/// another starter may set a larger count than it passes. Read before anything else opens
/// a descriptor, every number the count covers that is not open is known to be no socket
/// of ours; read later, those numbers may already belong to the runtime (its epoll,
/// eventfd and signal descriptors). Either way only open, listening sockets are adopted
/// (close-on-exec, non-blocking); anything else is logged and left alone, never closed.
/// `LISTEN_PID` naming another process, or a malformed variable, is logged (`warn`) and
/// the sockets ignored.
///
/// A program that does not call it still gets the sockets: the primary reads them when it
/// starts, which is right unless a descriptor opened before then has a number the count
/// covers. Only the first call in a process does anything.
pub fn take_inherited_sockets() {
    let mut slot = slot();
    if matches!(*slot, InheritedSlot::Unread) {
        *slot = InheritedSlot::Held(Inherited::read_env());
    }
}

impl Inherited {
    /// Takes the sockets [`take_inherited_sockets`] put in the process's slot, or, if it
    /// was never called, reads them from the environment now. Only the first call in a
    /// process finds any.
    pub(crate) fn from_env() -> Self {
        match std::mem::replace(&mut *slot(), InheritedSlot::Given) {
            InheritedSlot::Unread => Self::read_env(),
            InheritedSlot::Held(inherited) => inherited,
            InheritedSlot::Given => Self::default(),
        }
    }

    /// Reads `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` and adopts the listening
    /// sockets among the descriptors they name.
    fn read_env() -> Self {
        let var = |name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        let env = ListenEnv {
            pid: var("LISTEN_PID"),
            fds: var("LISTEN_FDS"),
            names: var("LISTEN_FDNAMES"),
        };
        // Descriptor numbers stop below the soft limit of open files.
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(u64::from(u32::MAX), |(soft, _)| soft);
        let passed = match env.passed(std::process::id(), limit) {
            Ok(passed) => passed,
            Err(e) => {
                tracing::warn!("ignoring LISTEN_FDS: {e}");
                return Self::default();
            }
        };
        if passed.names_mismatch {
            tracing::warn!(
                count = passed.fds.len(),
                names = env.names.as_deref().unwrap_or_default(),
                "LISTEN_FDNAMES does not name every descriptor of LISTEN_FDS"
            );
        }
        let (mut fds, mut not_open) = (Vec::new(), Vec::new());
        for (fd, name) in passed.fds {
            match crate::sys::inspect_inherited(fd, kind_of) {
                Ok(Kind::Listening) => match crate::sys::adopt_inherited(fd) {
                    Ok(owned) => fds.push((owned, name)),
                    Err(e) => {
                        tracing::warn!(fd, name, error = %e, "LISTEN_FDS: cannot adopt a descriptor")
                    }
                },
                Ok(kind) => {
                    tracing::warn!(fd, name, "LISTEN_FDS names {kind}; left alone")
                }
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => not_open.push(fd),
                Err(e) => {
                    tracing::warn!(fd, name, error = %e, "LISTEN_FDS: cannot inspect a descriptor; left alone")
                }
            }
        }
        if !not_open.is_empty() {
            // Once, however large the count: a starter that counts more than it passes.
            tracing::warn!(
                fds = ?not_open,
                "LISTEN_FDS counts descriptors that are not open; ignored"
            );
        }
        Self::from_fds(fds)
    }

    /// Sorts adopted listening sockets into TCP ones and the rest, all made close-on-exec.
    pub(crate) fn from_fds(fds: Vec<(OwnedFd, String)>) -> Self {
        let mut inherited = Self::default();
        for (fd, name) in fds {
            let socket = Socket::from(fd);
            if let Err(e) = socket.set_cloexec(true) {
                tracing::warn!(name, error = %e, "an inherited socket stays inheritable");
            }
            let address = socket.local_addr().ok().and_then(|a| a.as_socket());
            let listening = socket.is_listener().unwrap_or(false)
                && socket.r#type().ok() == Some(Type::STREAM)
                && matches!(socket.protocol(), Ok(Some(Protocol::TCP) | None));
            match address.filter(|_| listening) {
                Some(address) if socket.set_nonblocking(true).is_ok() => {
                    let reuse_port = socket.reuse_port().unwrap_or(false);
                    tracing::info!(%address, name, reuse_port, "adopted an inherited listening socket");
                    inherited.sockets.push(InheritedSocket {
                        listener: socket.into(),
                        address,
                        name,
                        reuse_port,
                    });
                }
                _ => {
                    tracing::warn!(
                        name,
                        "an inherited listening socket is not TCP; kept unused"
                    );
                    inherited.others.push((socket.into(), name));
                }
            }
        }
        inherited
    }
}

/// The variables of socket activation, as found.
#[derive(Debug, Clone, Default)]
struct ListenEnv {
    pid: Option<String>,
    fds: Option<String>,
    names: Option<String>,
}

/// The descriptors [`ListenEnv`] names for this process.
#[derive(Debug, PartialEq, Eq)]
struct Passed {
    fds: Vec<(RawFd, String)>,
    /// `LISTEN_FDNAMES` was set with another count of names (missing ones are `unknown`).
    names_mismatch: bool,
}

/// Why the variables of socket activation are ignored.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
enum IgnoredListenFds {
    #[error("LISTEN_PID is {listen_pid}, not this process ({own_pid})")]
    OtherProcess { listen_pid: u32, own_pid: u32 },
    #[error("LISTEN_FDS is set without LISTEN_PID")]
    NoPid,
    #[error("LISTEN_PID {0:?} is not a pid")]
    BadPid(String),
    #[error("LISTEN_FDS {0:?} is not a count of descriptors")]
    BadCount(String),
    #[error("LISTEN_FDS {count} runs past the limit of open descriptors ({limit})")]
    TooMany { count: u32, limit: u64 },
}

/// The first descriptor of socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

impl ListenEnv {
    /// The descriptors passed to process `own_pid`, whose descriptor numbers are below
    /// `limit` (`RLIMIT_NOFILE`, which also bounds what is allocated here): none without
    /// `LISTEN_FDS`, an error when the variables are malformed or for another process.
    fn passed(&self, own_pid: u32, limit: u64) -> Result<Passed, IgnoredListenFds> {
        let Some(fds) = &self.fds else {
            return Ok(Passed {
                fds: Vec::new(),
                names_mismatch: false,
            });
        };
        let pid = self.pid.as_deref().ok_or(IgnoredListenFds::NoPid)?;
        let listen_pid: u32 =
            (pid.trim().parse().ok()).ok_or_else(|| IgnoredListenFds::BadPid(pid.to_owned()))?;
        if listen_pid != own_pid {
            return Err(IgnoredListenFds::OtherProcess {
                listen_pid,
                own_pid,
            });
        }
        let count: u32 =
            (fds.trim().parse().ok()).ok_or_else(|| IgnoredListenFds::BadCount(fds.clone()))?;
        let end = (i32::try_from(count).ok())
            .and_then(|count| LISTEN_FDS_START.checked_add(count))
            .filter(|end| u64::try_from(*end).is_ok_and(|end| end <= limit))
            .ok_or(IgnoredListenFds::TooMany { count, limit })?;
        let mut names: Vec<&str> = match &self.names {
            Some(names) => names.split(':').collect(),
            None => Vec::new(),
        };
        let names_mismatch = self.names.is_some() && names.len() != count as usize;
        names.resize(count as usize, "unknown");
        Ok(Passed {
            fds: (LISTEN_FDS_START..end)
                .zip(names)
                .map(|(fd, name)| (fd, name.to_owned()))
                .collect(),
            names_mismatch,
        })
    }
}

/// What an inherited descriptor is, as far as adopting it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Listening,
    NotListening,
    NotSocket,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Listening => "a listening socket",
            Kind::NotListening => "a socket that is not listening",
            Kind::NotSocket => "a descriptor that is not a socket",
        })
    }
}

/// Whether `fd` is a socket, and a listening one.
fn kind_of(fd: BorrowedFd<'_>) -> Kind {
    let is_socket = nix::sys::stat::fstat(fd).is_ok_and(|stat| {
        nix::sys::stat::SFlag::from_bits_truncate(stat.st_mode) & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFSOCK
    });
    if !is_socket {
        return Kind::NotSocket;
    }
    match SockRef::from(&fd).is_listener() {
        Ok(true) => Kind::Listening,
        _ => Kind::NotListening,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn listening_tcp_sockets_are_adopted_and_the_rest_kept() {
        let plain = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 8, false).unwrap();
        let grouped = crate::net::bind_listener("127.0.0.1:0".parse().unwrap(), 8, true).unwrap();
        let (plain_addr, grouped_addr) =
            (plain.local_addr().unwrap(), grouped.local_addr().unwrap());
        let (pair, _other) = UnixStream::pair().unwrap();
        let inherited = Inherited::from_fds(vec![
            (plain.into(), "web".into()),
            (pair.into(), "control".into()),
            (grouped.into(), "grouped".into()),
        ]);
        let adopted: Vec<_> = inherited
            .sockets
            .iter()
            .map(|s| (s.address, s.name.as_str(), s.reuse_port))
            .collect();
        assert_eq!(
            adopted,
            [(plain_addr, "web", false), (grouped_addr, "grouped", true)]
        );
        assert_eq!(inherited.others.len(), 1);
        assert_eq!(inherited.others[0].1, "control");
    }

    #[test]
    fn a_bound_socket_that_does_not_listen_is_not_adopted() {
        let socket = Socket::new(socket2::Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let inherited = Inherited::from_fds(vec![(socket.into(), "idle".into())]);
        assert!(inherited.sockets.is_empty());
        assert_eq!(inherited.others.len(), 1);
    }

    #[track_caller]
    fn check_env(
        pid: Option<&str>,
        fds: Option<&str>,
        names: Option<&str>,
        expected: Result<Passed, IgnoredListenFds>,
    ) {
        let env = ListenEnv {
            pid: pid.map(str::to_owned),
            fds: fds.map(str::to_owned),
            names: names.map(str::to_owned),
        };
        assert_eq!(env.passed(42, 1024), expected, "{env:?}");
    }

    fn passed(fds: &[(RawFd, &str)], names_mismatch: bool) -> Result<Passed, IgnoredListenFds> {
        let fds = fds
            .iter()
            .map(|(fd, name)| (*fd, (*name).to_owned()))
            .collect();
        Ok(Passed {
            fds,
            names_mismatch,
        })
    }

    #[test]
    fn listen_fds_for_this_process_name_descriptors_from_3() {
        check_env(None, None, None, passed(&[], false));
        check_env(Some("42"), Some("0"), None, passed(&[], false));
        check_env(
            Some("42"),
            Some("2"),
            Some("web:admin"),
            passed(&[(3, "web"), (4, "admin")], false),
        );
        check_env(
            Some("42"),
            Some("2"),
            None,
            passed(&[(3, "unknown"), (4, "unknown")], false),
        );
        check_env(
            Some("42"),
            Some("2"),
            Some("web"),
            passed(&[(3, "web"), (4, "unknown")], true),
        );
        check_env(
            Some("42"),
            Some("1"),
            Some("web:admin"),
            passed(&[(3, "web")], true),
        );
    }

    #[test]
    fn listen_fds_for_another_process_or_malformed_are_ignored() {
        let other = IgnoredListenFds::OtherProcess {
            listen_pid: 7,
            own_pid: 42,
        };
        check_env(Some("7"), Some("1"), None, Err(other));
        check_env(None, Some("1"), None, Err(IgnoredListenFds::NoPid));
        check_env(
            Some("me"),
            Some("1"),
            None,
            Err(IgnoredListenFds::BadPid("me".into())),
        );
        check_env(
            Some("42"),
            Some("-1"),
            None,
            Err(IgnoredListenFds::BadCount("-1".into())),
        );
        check_env(
            Some("42"),
            Some(""),
            None,
            Err(IgnoredListenFds::BadCount(String::new())),
        );
        for count in [1022, u32::MAX] {
            let too_many = IgnoredListenFds::TooMany { count, limit: 1024 };
            check_env(Some("42"), Some(&count.to_string()), None, Err(too_many));
        }
        check_env(
            Some("42"),
            Some("1021"),
            None,
            Ok(Passed {
                fds: (3..1024).map(|fd| (fd, "unknown".to_owned())).collect(),
                names_mismatch: false,
            }),
        );
    }

    #[test]
    fn only_listening_sockets_are_of_the_kind_adopted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (pair, _other) = UnixStream::pair().unwrap();
        let (read, _write) = nix::unistd::pipe().unwrap();
        assert_eq!(kind_of(listener.as_fd()), Kind::Listening);
        assert_eq!(kind_of(pair.as_fd()), Kind::NotListening);
        assert_eq!(kind_of(read.as_fd()), Kind::NotSocket);
    }
}
