//! Prints this process's open fds (from `/proc/self/fd`), space-separated, then its argv0.
//!
//! Used to prove that a spawned child sees only fds 0, 1, 2 and the ones it was given.

use std::io::Write;

fn main() -> anyhow::Result<()> {
    let own_dir = format!("/proc/{}/fd", std::process::id());
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        // Skip the directory fd that read_dir itself holds.
        if std::fs::read_link(entry.path())
            .is_ok_and(|target| target.as_os_str() == own_dir.as_str())
        {
            continue;
        }
        fds.push(entry.file_name().to_string_lossy().parse::<i32>()?);
    }
    fds.sort_unstable();
    let list: Vec<String> = fds.iter().map(ToString::to_string).collect();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", list.join(" "))?;
    Ok(())
}
