//! Helper for the Node interop tests: a Rust child under a Node parent (started by
//! `tests/node/drive_rust.js` through `fork(.., {execPath})` or `spawn` with an `'ipc'`
//! slot). Finds `NODE_CHANNEL_FD` with `child::parent_channel` and answers the same ops as
//! `tests/node/peer.js`. Exits 0 when the parent disconnects.

use std::net::TcpListener;
use std::os::fd::OwnedFd;

use ipc::HandleType;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut channel = child::parent_channel()?.expect("a channel from the Node parent");
    assert_eq!(channel.format(), ipc::Format::Json);
    let mut handles = 0u64;
    while let Some(mut msg) = channel.recv().await? {
        let m: Value = msg.decode()?;
        let fd = msg.take_fds().pop();
        match m["op"].as_str().unwrap_or_default() {
            "echo" => channel.send(&m).await?,
            "burst" => {
                let n = m["n"].as_u64().unwrap_or_default();
                for i in 0..n {
                    channel.send(&json!({"op": "item", "i": i})).await?;
                }
                channel
                    .send(&json!({"op": "burst-done", "sum": n * n.saturating_sub(1) / 2}))
                    .await?;
            }
            "listen" => {
                let listener = TcpListener::from(fd.expect("a listening socket"));
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                channel.send(&json!({"op": "listening"})).await?;
                tokio::spawn(async move {
                    let (mut stream, _) = listener.accept().await.expect("accept");
                    let mut buf = [0u8; 64];
                    let n = stream.read(&mut buf).await.expect("read");
                    let reply = [b"pong:", &buf[..n]].concat();
                    stream.write_all(&reply).await.expect("write");
                });
            }
            "socket" => {
                let mut stream = std::net::TcpStream::from(fd.expect("a connected socket"));
                std::io::Write::write_all(&mut stream, b"hello from rust\n")?;
                drop(stream);
                channel.send(&json!({"op": "wrote"})).await?;
            }
            "count" => {
                handles += u64::from(fd.is_some());
                channel
                    .send(&json!({"op": "counted", "i": m["i"], "handles": handles}))
                    .await?;
            }
            "give" => {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                for i in 0..m["n"].as_u64().unwrap_or_default() {
                    let fd = OwnedFd::from(listener.try_clone()?);
                    channel
                        .send_handle(&json!({"op": "given", "i": i}), fd, HandleType::NetServer)
                        .await?;
                }
                let port = listener.local_addr()?.port();
                channel
                    .send(&json!({"op": "given-done", "port": port}))
                    .await?;
            }
            "crash" => {
                for i in 0..100 {
                    channel.send(&json!({"op": "item", "i": i})).await?;
                }
                std::process::exit(7);
            }
            "disconnect" => break,
            _ => channel.send(&json!({"op": "unknown", "got": m})).await?,
        }
    }
    Ok(())
}
