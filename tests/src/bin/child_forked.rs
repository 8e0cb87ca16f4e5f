//! A forked helper: takes its channel with `child::parent_channel()`, sends `"ready"`, then
//! echoes every string message back, after writing it into every descriptor that came with
//! it. At end of channel it exits 0, or with `linger` as its first argument keeps running
//! (so only a parent-death signal can end it). With `disconnect` it closes its channel
//! right after `"ready"` and exits 0.

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let Some(mut channel) = child::parent_channel()? else {
        anyhow::bail!("not started with an ipc channel");
    };
    channel
        .send(&format!("ready {}", std::process::id()))
        .await?;
    if mode == "disconnect" {
        return Ok(());
    }
    while let Some(mut message) = channel.recv().await? {
        let text: String = message.decode()?;
        for fd in message.take_fds() {
            std::fs::File::from(fd).write_all(text.as_bytes())?;
        }
        channel.send(&text).await?;
    }
    if mode == "linger" {
        std::future::pending::<()>().await;
    }
    Ok(())
}
