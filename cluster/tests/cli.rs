//! Integration tests of the `cluster` command and of Node programs as workers: real
//! primaries, real Node 20 workers, driven over HTTP and with signals, synchronised on
//! their log lines and HTTP answers, never on sleeps. Skipped with a message when `node`
//! is not installed.
//!
//! They live here and not in the workspace's `tests` crate because Cargo sets
//! `CARGO_BIN_EXE_cluster` only for the package that owns the binary. One test binary
//! (`autotests = false`): this file and `cli/`.

#[path = "cli/command.rs"]
mod command;
#[path = "cli/control.rs"]
mod control;
#[path = "cli/first_day.rs"]
mod first_day;
#[path = "cli/http_workers.rs"]
mod http_workers;
#[path = "cli/log_file.rs"]
mod log_file;
#[path = "cli/messages.rs"]
mod messages;
#[path = "cli/metrics.rs"]
mod metrics;
#[path = "cli/node_apps.rs"]
mod node_apps;

use std::path::PathBuf;

/// A script under `tests/node/`.
fn node_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/node")
        .join(name)
}

/// `examples/http_worker.rs`, the Rust worker, as `cargo test -p cluster` builds it.
fn rust_worker() -> PathBuf {
    // target/debug/deps/cli-<hash> -> target/debug/examples/http_worker
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples/http_worker");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test -p cluster` builds it (`--test cli` alone does not: `cargo build -p cluster --example http_worker`)",
        path.display()
    );
    path
}

/// Whether Node is installed; prints why the test is skipped when not.
fn node_or_skip() -> bool {
    let found = testkit::node_available();
    if !found {
        eprintln!(
            "skipped: node is not installed ({})",
            testkit::NODE_INSTALL_HINT
        );
    }
    found
}
