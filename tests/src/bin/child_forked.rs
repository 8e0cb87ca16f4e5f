//! A forked helper: takes its channel with `child::parent_channel()`, sends `"ready"`, then
//! echoes every string message back. At end of channel it exits 0, or with `linger` as its
//! first argument keeps running (so only a parent-death signal can end it).

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let linger = std::env::args().nth(1).is_some_and(|a| a == "linger");
    let Some(mut channel) = child::parent_channel()? else {
        anyhow::bail!("not started with an ipc channel");
    };
    channel
        .send(&format!("ready {}", std::process::id()))
        .await?;
    while let Some(message) = channel.recv().await? {
        let text: String = message.decode()?;
        channel.send(&text).await?;
    }
    if linger {
        std::future::pending::<()>().await;
    }
    Ok(())
}
