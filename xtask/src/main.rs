//! Workspace automation, run as `cargo xtask <command>`.

use anyhow::bail;
use clap::{Parser, Subcommand};

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
        Command::Demo => bail!("`cargo xtask demo` is not built yet (the httpd-demo issue)"),
        Command::Bench => bail!("`cargo xtask bench` is not built yet (the bench issue)"),
    }
}
