//! What `/proc/PID/stat` says about a process: its state letter and its parent.
//!
//! The only way to watch processes that are not our children (a detached grandchild, the
//! workers of a killed primary) is to read the process table.

/// The fields of `/proc/PID/stat` the tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The state letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
}

impl ProcStat {
    /// Parses the text of a `/proc/PID/stat` file.
    ///
    /// The command name (second field, in parentheses) may hold spaces and parentheses
    /// itself, so the fields are read after the *last* `") "`.
    pub fn parse(stat: &str) -> Option<Self> {
        let mut fields = stat.rsplit_once(") ")?.1.split(' ');
        let state = fields.next()?.chars().next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(Self { state, ppid })
    }

    /// Reads `/proc/<pid>/stat`; `None` once the process is gone (reaped).
    pub fn read(pid: u32) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
    }

    /// Neither a zombie nor dead.
    pub fn is_running(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// The process exists and is neither a zombie nor dead.
pub fn is_running(pid: u32) -> bool {
    ProcStat::read(pid).is_some_and(|stat| stat.is_running())
}

/// The running (not zombie) children of `parent`, in pid order.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            ProcStat::read(pid).is_some_and(|stat| stat.ppid == parent && stat.is_running())
        })
        .collect();
    pids.sort_unstable();
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(stat: &str, expected: Option<(char, u32)>) {
        let parsed = ProcStat::parse(stat).map(|s| (s.state, s.ppid));
        assert_eq!(parsed, expected, "{stat:?}");
    }

    #[test]
    fn plain_command_names() {
        check("1234 (sleep) S 1 1234 1234 0 -1 4194560", Some(('S', 1)));
        check("77 (httpd-demo) Z 76 76 76 0", Some(('Z', 76)));
    }

    #[test]
    fn command_names_with_spaces_and_parentheses() {
        check("42 (a b) R 7 42 42 0", Some(('R', 7)));
        check("42 (x) (y) ) S 9 42", Some(('S', 9)));
        check("42 ((sd-pam)) S 1 42", Some(('S', 1)));
    }

    #[test]
    fn broken_lines_are_none() {
        check("", None);
        check("42 (no close paren S 1", None);
        check("42 (x) S notapid", None);
    }

    #[test]
    fn zombies_and_dead_are_not_running() {
        for (state, running) in [
            ('R', true),
            ('S', true),
            ('D', true),
            ('Z', false),
            ('X', false),
        ] {
            let stat = ProcStat { state, ppid: 1 };
            assert_eq!(stat.is_running(), running, "{state}");
        }
    }

    #[test]
    fn this_process_is_running_and_a_child_of_its_parent() {
        let me = std::process::id();
        assert!(is_running(me));
        let parent = ProcStat::read(me).expect("own stat").ppid;
        assert!(children_of(parent).contains(&me));
    }
}
