//! A parent that uses `child` as a C host or a CLI would, for what cannot be tried inside
//! the test process. The first argument picks the case; it prints `ok` and exits 0 when
//! it survived.
//!
//! - `sigpipe-async`, `sigpipe-sync`: with `SIGPIPE` at its default, feeds 8 MiB of input to
//!   a child that closes its stdin at once.
//! - `sigign`: with `SIGINT`, `SIGQUIT` and `SIGUSR1` ignored, prints the `SigIgn` mask of a
//!   spawned `cat /proc/self/status`.
//! - `inherit`: runs `spawn_sync` with inherited stdio; the child's line goes straight to
//!   this program's stdout.

#![allow(clippy::print_stdout)]

use child::ExecOptions;
use nix::sys::signal::{SigHandler, Signal};
use tests::sys::set_disposition;

const INPUT: usize = 8 * 1024 * 1024;

fn main() -> anyhow::Result<()> {
    let case = std::env::args().nth(1).unwrap_or_default();
    match case.as_str() {
        "sigpipe-async" => {
            set_disposition(Signal::SIGPIPE, SigHandler::SigDfl)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let options = ExecOptions::new().input(vec![b'x'; INPUT]);
            let output = runtime.block_on(child::exec("exec <&-", options))?;
            anyhow::ensure!(output.status.success(), "{:?}", output.status);
        }
        "sigpipe-sync" => {
            set_disposition(Signal::SIGPIPE, SigHandler::SigDfl)?;
            let options = ExecOptions::new().input(vec![b'x'; INPUT]);
            let output = child::exec_sync("exec <&-", options)?;
            anyhow::ensure!(output.status.success(), "{:?}", output.status);
        }
        "sigign" => {
            for sig in [Signal::SIGINT, Signal::SIGQUIT, Signal::SIGUSR1] {
                set_disposition(sig, SigHandler::SigIgn)?;
            }
            let output = child::exec_file_sync("cat", ["/proc/self/status"], ExecOptions::new())?;
            let status = String::from_utf8(output.stdout)?;
            let mask = status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .ok_or_else(|| anyhow::anyhow!("no SigIgn line"))?;
            println!("{}", mask.trim());
        }
        "inherit" => {
            let output = child::spawn_sync(
                "/bin/sh",
                ["-c", "echo through the inherited stdout"],
                ExecOptions::new().inherit_stdio(),
            )?;
            anyhow::ensure!(output.status.success(), "{:?}", output.status);
            println!("captured {} bytes", output.stdout.len());
        }
        other => anyhow::bail!("unknown case {other:?}"),
    }
    println!("ok");
    Ok(())
}
