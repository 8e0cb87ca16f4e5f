//! A Rust worker for the `cluster` command, the counterpart of `tests/node/http_server.js`:
//!
//! ```sh
//! cargo build -p cluster --bin cluster --example http_worker
//! target/debug/cluster --workers 3 -- target/debug/examples/http_worker [PORT]
//! ```
//!
//! It answers `GET /` with `{"pid": <pid>}` (and an `x-pid` header), `GET /slow` the
//! same after 1.5 s, and `GET /say/TEXT` the same once it has written TEXT as a line on
//! its stdout (a test's marker), one request per connection. Just enough HTTP/1.1, written by hand so
//! that the example needs nothing but `cluster` and tokio; real servers use hyper (see
//! `httpd-demo`). Once the primary says stop, it finishes the requests it has and returns.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if !cluster::is_worker() {
        eprintln!("run me under the cluster command: cluster -- {}", program());
        std::process::exit(2);
    }
    let port: u16 = match std::env::args().nth(1) {
        Some(port) => port.parse()?,
        None => 0,
    };
    let worker = cluster::Worker::connect().await?;
    let mut listener = match worker
        .listen(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
    {
        Ok(listener) => listener,
        // Told to stop before it listened: nothing to serve.
        Err(cluster::ListenError::Stopping { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    say(&format!(
        "pid {} serving port {}",
        std::process::id(),
        listener.local_addr().port()
    ));
    let mut requests = JoinSet::new();
    while let Some(stream) = listener.accept().await? {
        requests.spawn(serve(stream));
    }
    while requests.join_next().await.is_some() {}
    Ok(())
}

/// A line on stdout, which the `cluster` command prefixes with the worker id.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn program() -> String {
    std::env::args()
        .next()
        .unwrap_or_else(|| "http_worker".into())
}

async fn serve(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let path = head
        .split(|b| *b == b' ')
        .nth(1)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    if let Some(text) = path.strip_prefix("/say/") {
        say(text);
    }
    if path.starts_with("/slow") {
        say("slow request started");
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let pid = std::process::id();
    let body = format!("{{\"pid\":{pid}}}");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-pid: {pid}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
