//! Workspace automation, run as `cargo xtask <command>`.

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Parser, Subcommand};

mod demo;
mod http;

#[derive(Debug, Parser)]
#[command(about = "Workspace automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build httpd-demo and walk through what the cluster does.
    Demo,
    /// Run the side-by-side benchmarks.
    Bench,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Bench => bail!(
            "`cargo xtask bench` is not built yet; run `cargo bench -p ipc --bench echo` and \
             `cargo bench -p child --bench vs_node` meanwhile"
        ),
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}
