//! Reading a worker's memory and CPU from `/proc` (the `procfs` crate) for the core's
//! `Sample` effect.

use std::time::Duration;

use crate::primary::core::Sample;

/// `pid`'s resident set size and CPU time, or `None` if its `/proc` entry cannot be read
/// (it has just exited).
pub(super) fn read(pid: u32) -> Option<Sample> {
    let process = procfs::process::Process::new(i32::try_from(pid).ok()?).ok()?;
    let stat = process.stat().ok()?;
    let ticks = procfs::ticks_per_second().max(1);
    let cpu_ticks = stat.utime.saturating_add(stat.stime);
    let cpu_time = Duration::from_secs(cpu_ticks / ticks)
        + Duration::from_nanos((cpu_ticks % ticks) * 1_000_000_000 / ticks);
    Some(Sample {
        rss_bytes: stat.rss.saturating_mul(procfs::page_size()),
        cpu_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_and_a_pid_that_is_not_there_has_none() {
        let me = read(std::process::id()).expect("our own /proc entry");
        assert!(me.rss_bytes > 0);
        // pid_max is at most 2^22: this one cannot exist.
        assert_eq!(read(1 << 23), None);
    }
}
