//! How many workers this machine lets the command start: a fixed cap, and what the
//! cgroup's `pids.max` and `RLIMIT_NPROC` leave. A number past them is refused at once,
//! before anything is forked, instead of forking until the pids run out.

use std::path::{Path, PathBuf};

/// The most workers the command starts, whatever the machine allows.
pub(crate) const MAX_WORKERS: usize = cluster::control::MAX_WORKERS;

/// Why a worker count is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TooMany {
    /// Zero.
    #[error("--workers must be at least 1")]
    Zero,
    /// Past the command's cap.
    #[error("--workers {0} is more than the cap of {MAX_WORKERS}")]
    Cap(usize),
    /// Past what a process limit leaves.
    #[error(
        "--workers {asked}: {limit} leaves room for {room} more processes (each worker is \
         at least one); lower --workers or raise the limit"
    )]
    Limit {
        /// The count asked for.
        asked: usize,
        /// Which limit.
        limit: &'static str,
        /// How many processes it leaves.
        room: usize,
    },
}

/// Checks `workers` against the cap and the limits of this process.
pub(crate) fn check(workers: usize) -> Result<(), TooMany> {
    check_against(workers, pids_room(), nproc_room())
}

fn check_against(workers: usize, pids: Option<usize>, nproc: Option<usize>) -> Result<(), TooMany> {
    if workers == 0 {
        return Err(TooMany::Zero);
    }
    if workers > MAX_WORKERS {
        return Err(TooMany::Cap(workers));
    }
    for (limit, room) in [("the cgroup's pids.max", pids), ("RLIMIT_NPROC", nproc)] {
        if let Some(room) = room
            && workers > room
        {
            return Err(TooMany::Limit {
                asked: workers,
                limit,
                room,
            });
        }
    }
    Ok(())
}

/// How many more tasks the cgroups of this process admit (`pids.max` - `pids.current`,
/// the least over the cgroup and its ancestors), if any of them sets a limit.
fn pids_room() -> Option<usize> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: one line `0::/path`.
    let path = text.lines().find_map(|line| line.strip_prefix("0::"))?;
    let mut dir = PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let mut room: Option<usize> = None;
    loop {
        if let Some(here) = cgroup_room(&dir) {
            room = Some(room.map_or(here, |r| r.min(here)));
        }
        if dir == Path::new("/sys/fs/cgroup") || !dir.pop() {
            return room;
        }
    }
}

fn cgroup_room(dir: &Path) -> Option<usize> {
    let read = |name| std::fs::read_to_string(dir.join(name)).ok();
    let max: usize = read("pids.max")?.trim().parse().ok()?; // "max": no limit here
    let current: usize = read("pids.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// How many more processes `RLIMIT_NPROC` admits for this user (none for root, whom
/// it does not bind), counting the processes of this user now running.
fn nproc_room() -> Option<usize> {
    if nix::unistd::geteuid().is_root() {
        return None;
    }
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC).ok()?;
    if soft == nix::sys::resource::RLIM_INFINITY {
        return None;
    }
    let uid = nix::unistd::getuid().as_raw();
    let mine = std::fs::read_dir("/proc")
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter(|entry| {
            std::os::unix::fs::MetadataExt::uid(&match entry.metadata() {
                Ok(meta) => meta,
                Err(_) => return false,
            }) == uid
        })
        .count();
    Some(usize::try_from(soft).ok()?.saturating_sub(mine))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_cap_or_a_limit_are_refused_with_the_reason() {
        assert_eq!(check_against(0, None, None), Err(TooMany::Zero));
        assert_eq!(check_against(MAX_WORKERS, None, None), Ok(()));
        assert_eq!(
            check_against(100_000, None, None),
            Err(TooMany::Cap(100_000))
        );
        assert_eq!(
            check_against(300, Some(299), None),
            Err(TooMany::Limit {
                asked: 300,
                limit: "the cgroup's pids.max",
                room: 299
            })
        );
        assert_eq!(
            check_against(8, Some(100), Some(5)),
            Err(TooMany::Limit {
                asked: 8,
                limit: "RLIMIT_NPROC",
                room: 5
            })
        );
        assert_eq!(check_against(4, Some(100), Some(5)), Ok(()));
    }

    #[test]
    fn this_machine_has_room_for_one_worker() {
        assert_eq!(check(1), Ok(()));
    }
}
