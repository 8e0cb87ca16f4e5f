//! Where a server listens: an IP address and port, or the path of a Unix stream socket
//! (Node's `server.listen('/tmp/app.sock')`, `addressType: -1`).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A bound listening address: what [`Event::Listening`](crate::Event::Listening) reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// A TCP socket's address and port.
    Inet(SocketAddr),
    /// A Unix stream socket's path in the file system.
    Unix(PathBuf),
}

impl Endpoint {
    /// The TCP address, if this is one.
    pub fn inet(&self) -> Option<SocketAddr> {
        match self {
            Self::Inet(address) => Some(*address),
            Self::Unix(_) => None,
        }
    }

    /// The socket's path, if this is a Unix socket.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Self::Inet(_) => None,
            Self::Unix(path) => Some(path),
        }
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(address: SocketAddr) -> Self {
        Self::Inet(address)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = std::net::AddrParseError;

    /// The spelling of [`Display`](fmt::Display): `unix:PATH`, or a socket address.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.strip_prefix("unix:") {
            Some(path) => Ok(Self::Unix(path.into())),
            None => text.parse().map(Self::Inet),
        }
    }
}

impl fmt::Display for Endpoint {
    /// `127.0.0.1:8080`, `[::]:8080`, or `unix:/run/app.sock` (nginx's spelling).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Inet(address) => address.fmt(f),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_accessors() {
        let inet = Endpoint::from("127.0.0.1:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(inet.to_string(), "127.0.0.1:8080");
        assert_eq!(inet.inet(), Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(inet.unix_path(), None);
        let unix = Endpoint::Unix("/run/app.sock".into());
        assert_eq!(unix.to_string(), "unix:/run/app.sock");
        assert_eq!(unix.inet(), None);
        assert_eq!(unix.unix_path(), Some(Path::new("/run/app.sock")));
        for endpoint in [inet, unix] {
            assert_eq!(endpoint.to_string().parse::<Endpoint>(), Ok(endpoint));
        }
        assert!("nonsense".parse::<Endpoint>().is_err());
    }
}
