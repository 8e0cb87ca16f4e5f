//! CPU time per request, from `/proc/PID/stat`: the user and system time a server's
//! workers (and, apart, its primary) spent during one load run, divided by the requests
//! the run completed. Clock ticks (`USER_HZ`, 100 per second) over a run of 2 s or
//! more at tens of thousands of requests per second resolve well under 1 %.

use anyhow::{Context, Result};

/// User and system time of one process, in clock ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Ticks {
    pub(crate) user: u64,
    pub(crate) system: u64,
}

impl std::ops::Sub for Ticks {
    type Output = Ticks;
    fn sub(self, earlier: Ticks) -> Ticks {
        Ticks {
            user: self.user.saturating_sub(earlier.user),
            system: self.system.saturating_sub(earlier.system),
        }
    }
}

impl std::ops::Add for Ticks {
    type Output = Ticks;
    fn add(self, other: Ticks) -> Ticks {
        Ticks {
            user: self.user + other.user,
            system: self.system + other.system,
        }
    }
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name
/// (field 2) may hold spaces and `)`, so fields are counted after its last `)`.
pub(crate) fn parse_stat(stat: &str) -> Option<Ticks> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state (3), ppid (4), ... utime is the 12th field from here.
    let mut fields = rest.split_whitespace().skip(11);
    let user = fields.next()?.parse().ok()?;
    let system = fields.next()?.parse().ok()?;
    Some(Ticks { user, system })
}

/// The CPU time of `pid` so far (all its threads).
pub(crate) fn read(pid: u32) -> Result<Ticks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    parse_stat(&stat).with_context(|| format!("no utime/stime in /proc/{pid}/stat"))
}

/// The sum over `pids`.
pub(crate) fn read_all(pids: &[u32]) -> Result<Ticks> {
    pids.iter()
        .try_fold(Ticks::default(), |sum, pid| Ok(sum + read(*pid)?))
}

/// Clock ticks per second in `/proc`: `USER_HZ`, which Linux fixes at 100 for the
/// user-space ABI whatever the kernel's own tick rate.
pub(crate) const TICKS_PER_SECOND: f64 = 100.0;

/// Microseconds of user and system time per request.
pub(crate) fn per_request_us(spent: Ticks, requests: u64, hz: f64) -> (f64, f64) {
    let per = |ticks: u64| ticks as f64 / hz * 1e6 / requests.max(1) as f64;
    (per(spent.user), per(spent.system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_a_name_with_spaces_and_parens() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    345 67 0 0 20 0 1 0 123 456 7 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(Ticks {
                user: 345,
                system: 67
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn this_process_has_a_stat() {
        read(std::process::id()).unwrap();
    }

    #[test]
    fn per_request_divides_ticks_by_requests() {
        let spent = Ticks {
            user: 150,
            system: 50,
        };
        // 1.5 s user and 0.5 s system over 100,000 requests: 15 us and 5 us.
        assert_eq!(per_request_us(spent, 100_000, 100.0), (15.0, 5.0));
        assert_eq!(
            Ticks { user: 5, system: 9 } - Ticks { user: 7, system: 1 },
            Ticks { user: 0, system: 8 }
        );
    }
}
