//! Helper for the ipc integration tests: takes its channel from the environment,
//! receives a TCP listener over it, accepts one connection and reports what it read.
//!
//! Prints `none` and exits 0 when it has no channel; prints the error and exits 3 when
//! the inherited channel is invalid.

#![allow(clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;

use tests::ipc_proto::{FromChild, ToChild};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut channel = match ipc::Channel::from_env() {
        Ok(Some(channel)) => channel,
        Ok(None) => {
            println!("none");
            return Ok(());
        }
        Err(err) => {
            println!("error: {err}");
            std::process::exit(3);
        }
    };
    let mut msg = channel.recv().await?.expect("a message from the parent");
    assert_eq!(msg.decode::<ToChild>()?, ToChild::Listener);
    let fd = msg.take_fds().pop().expect("the listener's descriptor");
    let listener = TcpListener::from(fd);
    let (stream, peer) = listener.accept()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    channel
        .send(&FromChild::Accepted {
            peer_port: peer.port(),
            line: line.trim_end().to_owned(),
        })
        .await?;
    Ok(())
}
