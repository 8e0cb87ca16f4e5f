//! Workspace automation, run as `cargo xtask <command>`.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

mod bench;
mod chaos;
mod demo;
mod fleet;
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
    Bench(bench::BenchOptions),
    /// Three hosts behind nginx: rolling deploy, graceful stop, a dead host, recovery.
    Fleet(fleet::FleetOptions),
    /// Faults from a seeded schedule under load, and a checker: every failure explained.
    Chaos(chaos::ChaosOptions),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Bench(options) => bench::run(options),
        Command::Fleet(options) => fleet::run(options),
        Command::Chaos(options) => chaos::run(options),
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace root")
        .to_path_buf()
}
