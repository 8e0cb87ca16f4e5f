//! Spawns a detached `sleep` grandchild (its own session and group, stdio to /dev/null),
//! prints its pid and exits without waiting for it.
//!
//! With `fork-linger <helper>` instead, forks `<helper> linger` with a parent-death signal
//! of SIGKILL, waits for its `ready` message, prints its pid and exits. With `fork-sleep`,
//! forks `/bin/sleep 300` (which never opens its channel) with the same signal, prints its
//! pid and exits.

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let pid = match args.as_slice() {
        [mode, helper] if mode == "fork-linger" => {
            let options = child::ForkOptions::new().parent_death_signal(child::Signal::SIGKILL);
            let mut forked = child::fork(helper, ["linger"], options)?;
            let ready: String = forked
                .recv()
                .await?
                .ok_or_else(|| anyhow::anyhow!("no ready"))?
                .decode()?;
            anyhow::ensure!(ready.starts_with("ready"), "unexpected {ready}");
            forked.pid()
        }
        [mode] if mode == "fork-sleep" => {
            let options = child::ForkOptions::new().parent_death_signal(child::Signal::SIGKILL);
            child::fork("/bin/sleep", ["300"], options)?.pid()
        }
        _ => {
            let options = child::SpawnOptions::new()
                .detached(true)
                .stdin(child::Stdio::Null)
                .stdout(child::Stdio::Null)
                .stderr(child::Stdio::Null);
            child::spawn("/bin/sleep", ["300"], options)?.pid()
        }
    };
    writeln!(std::io::stdout(), "{pid}")?;
    std::io::stdout().flush()?;
    // Leave at once: the grandchild must outlive us (or, with a parent-death signal, not).
    std::process::exit(0);
}
