//! Two-process echo over an `ipc` channel, side by side with Node's `fork()` IPC and a raw
//! length-prefixed socketpair, 64 messages in flight.
//!
//! Run with `cargo bench -p ipc --bench echo` (`-- --quick` for fewer rounds). Rounds
//! alternate the subjects (A B C A B C ...) so that a noisy machine affects all alike; the
//! report gives medians and ratios. Node is optional: without it that column is skipped.
//! `-- --json` prints one [`testkit::BenchLine`] per subject instead of the table (every
//! round's rate in msg/s), for `cargo xtask bench`.

#![allow(clippy::print_stdout)]

use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ipc::{Channel, Lane};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use serde_bytes::{ByteBuf, Bytes};
use testkit::{
    BenchArgs, BenchLine, Benchmark, KillOnDrop, NODE_INSTALL_HINT, Subject, Unit, median,
    node_available, node_timing,
};
use tokio::sync::Semaphore;

const IN_FLIGHT: usize = 64;
const CHILD_ENV: &str = "IPC_ECHO_BENCH_CHILD";

fn main() {
    match std::env::var(CHILD_ENV).as_deref() {
        Ok("ipc") => return ipc_echo_child(),
        Ok("json") => return json_echo_child(),
        Ok("raw") => return raw_echo_child(),
        _ => {}
    }
    let args = BenchArgs::from_env();
    let node = node_available();
    if !node {
        println!("node: not installed, Node column skipped ({NODE_INSTALL_HINT})");
    }
    for (benchmark, size, count, node_count) in [
        (Benchmark::IpcEcho16b, 16, 400_000, 100_000),
        (Benchmark::IpcEcho64k, 64 * 1024, 20_000, 3_000),
    ] {
        let mut ipc = Vec::new();
        let mut raw = Vec::new();
        let mut nodes = Vec::new();
        let mut json = Vec::new();
        let mut json_node = Vec::new();
        for _ in 0..args.rounds() {
            ipc.push(rate(count, run_ipc(size, count)));
            raw.push(rate(count, run_raw(size, count)));
            json.push(rate(node_count, run_json(size, node_count, Peer::Rust)));
            if node {
                nodes.push(rate(node_count, run_node(size, node_count)));
                json_node.push(rate(node_count, run_json(size, node_count, Peer::Node)));
            }
        }
        if args.json {
            for (subject, values) in [
                (Subject::IpcChannel, ipc),
                (Subject::RawSocketpair, raw),
                (Subject::NodeForkIpc, nodes),
                (Subject::IpcJsonChannel, json),
                (Subject::IpcJsonNodeChild, json_node),
            ] {
                if !values.is_empty() {
                    let line = BenchLine {
                        benchmark,
                        subject,
                        unit: Unit::MessagesPerSec,
                        message_bytes: Some(size as u64),
                        values,
                    };
                    println!("{}", line.to_json());
                }
            }
        } else {
            report(benchmark.key(), size, &ipc, &raw, &nodes);
            report_json(size, &json, &json_node, &nodes);
        }
    }
}

fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}

fn report(label: &str, size: usize, ipc: &[f64], raw: &[f64], node: &[f64]) {
    let mb = |r: f64| r * size as f64 / 1e6;
    let (ipc_m, raw_m) = (median(ipc), median(raw));
    println!(
        "\n{label}: {size}-byte messages, {IN_FLIGHT} in flight, {} rounds",
        ipc.len()
    );
    println!(
        "  {:<16} {:>10.0} msg/s {:>8.1} MB/s",
        Subject::IpcChannel.label(),
        ipc_m,
        mb(ipc_m)
    );
    println!(
        "  {:<16} {:>10.0} msg/s {:>8.1} MB/s   ipc/raw  = {:.2}x",
        Subject::RawSocketpair.label(),
        raw_m,
        mb(raw_m),
        ipc_m / raw_m
    );
    if !node.is_empty() {
        let node_m = median(node);
        println!(
            "  {:<16} {:>10.0} msg/s {:>8.1} MB/s   ipc/node = {:.2}x",
            Subject::NodeForkIpc.label(),
            node_m,
            mb(node_m),
            ipc_m / node_m
        );
    }
}

/// Node's JSON lines side by side with Node parent <-> Node child.
fn report_json(size: usize, json: &[f64], json_node: &[f64], node: &[f64]) {
    let mb = |r: f64| r * size as f64 / 1e6;
    let node_m = (!node.is_empty()).then(|| median(node));
    let ratio = |v: f64| node_m.map_or(String::new(), |n| format!("   vs node = {:.2}x", v / n));
    for (subject, values) in [
        (Subject::IpcJsonChannel, json),
        (Subject::IpcJsonNodeChild, json_node),
    ] {
        if !values.is_empty() {
            let m = median(values);
            println!(
                "  {:<20} {:>10.0} msg/s {:>8.1} MB/s{}",
                subject.label(),
                m,
                mb(m),
                ratio(m)
            );
        }
    }
}

/// The other end of a JSON echo.
#[derive(Clone, Copy)]
enum Peer {
    /// This binary, with `ipc::Channel::from_env` finding `NODE_CHANNEL_FD`.
    Rust,
    /// `node node_ipc_echo.js child`.
    Node,
}

/// The echo of [`run_ipc`] over a [`ipc::Format::Json`] channel, with a JSON string of
/// `size` bytes as Node's peer sends, to a Rust or a Node child.
fn run_json(size: usize, count: usize, peer: Peer) -> Duration {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let theirs = OwnedFd::from(theirs);
    fcntl(&theirs, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear close-on-exec");
    let mut cmd = match peer {
        Peer::Rust => {
            let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
            cmd.env(CHILD_ENV, "json");
            cmd
        }
        Peer::Node => {
            let mut cmd = Command::new("node");
            cmd.arg(node_script()).arg("child");
            cmd
        }
    };
    cmd.env_remove(ipc::CHANNEL_FD_ENV)
        .env(ipc::NODE_CHANNEL_FD_ENV, theirs.as_raw_fd().to_string())
        .env(ipc::NODE_CHANNEL_SERIALIZATION_MODE_ENV, "json")
        .stdin(Stdio::null());
    let mut child = KillOnDrop::spawn(&mut cmd).expect("spawn echo child");
    drop(theirs);
    let config = ipc::Config::new().format(ipc::Format::Json);
    let elapsed = runtime().block_on(async {
        let channel = Channel::from_fd_with(ours.into(), &config).expect("channel");
        let (mut tx, mut rx) = channel.into_split();
        let window = Arc::new(Semaphore::new(IN_FLIGHT));
        let payload = "x".repeat(size);
        let start = Instant::now();
        let writer = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                for _ in 0..count {
                    let permit = match window.try_acquire() {
                        Ok(permit) => permit,
                        Err(_) => {
                            tx.flush().await.expect("flush");
                            window.acquire().await.expect("semaphore")
                        }
                    };
                    permit.forget();
                    tx.feed(Lane::User, payload.as_str(), Vec::new())
                        .await
                        .expect("feed");
                }
                tx.flush().await.expect("flush");
                tx
            }
        });
        for _ in 0..count {
            let msg = rx
                .recv()
                .await
                .expect("recv")
                .expect("echo child ended early");
            assert_eq!(msg.decode::<&str>().expect("decode").len(), size);
            window.add_permits(1);
        }
        let elapsed = start.elapsed();
        drop(writer.await.expect("writer"));
        elapsed
    });
    child.wait().expect("wait echo child");
    elapsed
}

fn json_echo_child() {
    runtime().block_on(async {
        let channel = Channel::from_env()
            .expect("channel")
            .expect("NODE_CHANNEL_FD set");
        assert_eq!(channel.format(), ipc::Format::Json);
        let (mut tx, mut rx) = channel.into_split();
        while let Some(first) = rx.recv().await.expect("recv") {
            let mut msg = Some(first);
            while let Some(m) = msg {
                let body: &str = m.decode().expect("decode");
                tx.feed(Lane::User, body, Vec::new()).await.expect("feed");
                msg = rx.recv_buffered().expect("recv");
            }
            tx.flush().await.expect("flush");
        }
    });
}

/// Spawns this benchmark binary as an `ipc` echo child holding `child_end` (made inheritable
/// for the spawn and closed here afterwards).
fn spawn_ipc_child(child_end: OwnedFd) -> KillOnDrop {
    fcntl(&child_end, FcntlArg::F_SETFD(FdFlag::empty())).expect("clear close-on-exec");
    let child = KillOnDrop::spawn(
        Command::new(std::env::current_exe().expect("current exe"))
            .env(CHILD_ENV, "ipc")
            .env(ipc::CHANNEL_FD_ENV, child_end.as_raw_fd().to_string())
            .stdin(Stdio::null()),
    )
    .expect("spawn echo child");
    drop(child_end);
    child
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Sends `count` messages with at most `IN_FLIGHT` unanswered, reading the echoes in
/// another task so that large messages cannot deadlock on full socket buffers.
fn run_ipc(size: usize, count: usize) -> Duration {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut child = spawn_ipc_child(theirs.into());
    let elapsed = runtime().block_on(async {
        let (mut tx, mut rx) = Channel::from_fd(ours.into()).expect("channel").into_split();
        let window = Arc::new(Semaphore::new(IN_FLIGHT));
        let payload = ByteBuf::from(vec![b'x'; size]);
        let start = Instant::now();
        let writer = tokio::spawn({
            let window = Arc::clone(&window);
            async move {
                for _ in 0..count {
                    let permit = match window.try_acquire() {
                        Ok(permit) => permit,
                        Err(_) => {
                            tx.flush().await.expect("flush");
                            window.acquire().await.expect("semaphore")
                        }
                    };
                    permit.forget();
                    tx.feed(Lane::User, &payload, Vec::new())
                        .await
                        .expect("feed");
                }
                tx.flush().await.expect("flush");
                tx
            }
        });
        for _ in 0..count {
            let msg = rx
                .recv()
                .await
                .expect("recv")
                .expect("echo child ended early");
            // Borrowing decode: the payload is not copied out of the receive buffer.
            assert_eq!(msg.decode::<&Bytes>().expect("decode").len(), size);
            window.add_permits(1);
        }
        let elapsed = start.elapsed();
        drop(writer.await.expect("writer"));
        elapsed
    });
    child.wait().expect("wait echo child");
    elapsed
}

fn ipc_echo_child() {
    runtime().block_on(async {
        let channel = Channel::from_env()
            .expect("channel")
            .expect("IPC_CHANNEL_FD set");
        let (mut tx, mut rx) = channel.into_split();
        while let Some(first) = rx.recv().await.expect("recv") {
            let mut msg = Some(first);
            while let Some(m) = msg {
                let body: &Bytes = m.decode().expect("decode");
                tx.feed(Lane::User, body, Vec::new()).await.expect("feed");
                msg = rx.recv_buffered().expect("recv");
            }
            tx.flush().await.expect("flush");
        }
    });
}

fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    let mut len = [0u8; 4];
    if r.read_exact(&mut len).is_err() {
        return false;
    }
    buf.resize(u32::from_be_bytes(len) as usize, 0);
    r.read_exact(buf).expect("frame body");
    true
}

fn write_frame(w: &mut impl Write, body: &[u8]) {
    w.write_all(&(body.len() as u32).to_be_bytes())
        .expect("write");
    w.write_all(body).expect("write");
}

/// The same exchange as [`run_ipc`] over a plain socketpair with a 4-byte length
/// prefix, blocking I/O, a writer thread and a reader thread.
fn run_raw(size: usize, count: usize) -> Duration {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let mut child = KillOnDrop::spawn(
        Command::new(std::env::current_exe().expect("current exe"))
            .env(CHILD_ENV, "raw")
            .stdin(Stdio::from(OwnedFd::from(theirs))),
    )
    .expect("spawn echo child");
    let mut reader = BufReader::with_capacity(64 * 1024, ours.try_clone().expect("clone"));
    let (credit_tx, credit_rx) = mpsc::channel::<()>();
    let start = Instant::now();
    let writer = std::thread::spawn(move || {
        let mut writer = BufWriter::with_capacity(64 * 1024, ours);
        let payload = vec![b'x'; size];
        let mut credits = IN_FLIGHT;
        for _ in 0..count {
            while let Ok(()) = credit_rx.try_recv() {
                credits += 1;
            }
            if credits == 0 {
                writer.flush().expect("flush");
                credit_rx.recv().expect("credit");
                credits += 1;
            }
            credits -= 1;
            write_frame(&mut writer, &payload);
        }
        writer.flush().expect("flush");
        writer
    });
    let mut body = Vec::new();
    for _ in 0..count {
        assert!(read_frame(&mut reader, &mut body), "echo child ended early");
        assert_eq!(body.len(), size);
        // The writer may have finished and hung up its end: that is fine.
        let _ = credit_tx.send(());
    }
    let elapsed = start.elapsed();
    drop((reader, writer.join().expect("writer")));
    child.wait().expect("wait echo child");
    elapsed
}

fn raw_echo_child() {
    // The parent hands the socket over as standard input.
    let fd = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdin");
    let sock = UnixStream::from(fd);
    let mut reader = BufReader::with_capacity(64 * 1024, sock.try_clone().expect("clone"));
    let mut writer = BufWriter::with_capacity(64 * 1024, sock);
    let mut body = Vec::new();
    while read_frame(&mut reader, &mut body) {
        write_frame(&mut writer, &body);
        if reader.buffer().is_empty() {
            writer.flush().expect("flush");
        }
    }
}

fn node_script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/benches/peers/node_ipc_echo.js"
    ))
}

fn run_node(size: usize, count: usize) -> Duration {
    let args = [size, count, IN_FLIGHT].map(|n| n.to_string());
    node_timing(node_script(), args).unwrap_or_else(|e| panic!("{e}"))
}
