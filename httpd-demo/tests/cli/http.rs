//! A minimal blocking HTTP/1.1 client on `std::net::TcpStream`, so a test sees exactly
//! what crosses the wire: which connection a request used, and `Connection: close`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use testkit::WorkerInfo;

/// No read or write may hang a test for longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One response; header names are lower-case.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `build` of a `GET /worker` answer: which code the worker runs.
    #[track_caller]
    pub(crate) fn build(&self) -> String {
        let (_, build) = WorkerInfo::with_build(&self.body)
            .unwrap_or_else(|e| panic!("GET /worker body {:?}: {e}", self.body));
        build.unwrap_or_else(|| panic!("no build in {:?}", self.body))
    }

    /// The answer to `GET /worker`: status 200 and a JSON object with `id`, `pid`, `build`.
    #[track_caller]
    pub(crate) fn worker(&self) -> WorkerInfo {
        assert_eq!(self.status, 200, "GET /worker: {self:?}");
        assert_eq!(self.header("content-type"), Some("application/json"));
        WorkerInfo::from_json(&self.body)
            .unwrap_or_else(|e| panic!("GET /worker body {:?}: {e}", self.body))
    }
}

/// One client connection; requests on it reuse it (keep-alive).
#[derive(Debug)]
pub(crate) struct Connection(BufReader<TcpStream>);

impl Connection {
    pub(crate) fn open(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Self(BufReader::new(stream)))
    }

    /// Sends a request without a body and reads the whole response.
    pub(crate) fn request(&mut self, method: &str, path: &str) -> io::Result<Response> {
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n");
        self.0.get_mut().write_all(head.as_bytes())?;
        let status_line = self.line()?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(format!("status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| invalid(format!("header {line:?}")))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        let response = Response {
            status,
            headers,
            body: String::new(),
        };
        let length = match response.header("content-length") {
            Some(v) => v.parse().map_err(|_| invalid(format!("length {v:?}")))?,
            None => 0,
        };
        let mut body = vec![0; length];
        self.0.read_exact(&mut body)?;
        let body = String::from_utf8(body).map_err(|e| invalid(e.to_string()))?;
        Ok(Response { body, ..response })
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// `GET path` on a new connection.
pub(crate) fn get(addr: SocketAddr, path: &str) -> io::Result<Response> {
    Connection::open(addr)?.request("GET", path)
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}
