//! The child's argv and environment as C strings, each list built in one buffer, and the
//! environment itself (inherited, changed, channel variables set or stripped).
//!
//! One buffer per list instead of one allocation per string: with a typical environment
//! (a few dozen variables), building the `envp` of every spawn was a measurable share of
//! `spawn`'s cost. The inherited variables are copied once, straight from
//! [`std::env::vars_os`] (which takes std's environment lock), in their original order.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString, c_char};
use std::marker::PhantomData;
use std::os::unix::ffi::OsStrExt;

use crate::channel_env::{
    CHANNEL_FD_ENV, NODE_CHANNEL_FD_ENV, NODE_SERIALIZATION_ENV, PARENT_DEATH_ENV, ParentDeath,
};
use crate::options::SpawnOptions;

/// NUL-terminated strings in one buffer; for `KEY=VALUE` strings, where each key ends.
#[derive(Debug, Default)]
pub(crate) struct CStrings {
    bytes: Vec<u8>,
    /// For each string: its start in `bytes` and the length of its key (up to the first
    /// `=` of a pair pushed by [`CStrings::push_pair`]; the whole string otherwise).
    spans: Vec<(usize, usize)>,
    /// Whether a string holds a NUL byte of its own (it cannot be passed to `execve`).
    nul: bool,
}

impl CStrings {
    pub(crate) fn with_capacity(strings: usize, bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            spans: Vec::with_capacity(strings),
            nul: false,
        }
    }

    /// Appends `s`.
    pub(crate) fn push(&mut self, s: &OsStr) {
        let s = s.as_bytes();
        self.nul |= s.contains(&0);
        self.spans.push((self.bytes.len(), s.len()));
        self.bytes.extend_from_slice(s);
        self.bytes.push(0);
    }

    /// Appends `key=value`.
    pub(crate) fn push_pair(&mut self, key: &OsStr, value: &OsStr) {
        let (key, value) = (key.as_bytes(), value.as_bytes());
        self.nul |= key.contains(&0) || value.contains(&0);
        self.push_pair_bytes(key, value);
    }

    /// Appends `key=value` from this process's environment, whose strings are C strings
    /// and so hold no NUL byte.
    fn push_inherited(&mut self, key: &OsStr, value: &OsStr) {
        self.push_pair_bytes(key.as_bytes(), value.as_bytes());
    }

    fn push_pair_bytes(&mut self, key: &[u8], value: &[u8]) {
        self.spans.push((self.bytes.len(), key.len()));
        self.bytes.reserve(key.len() + value.len() + 2);
        self.bytes.extend_from_slice(key);
        self.bytes.push(b'=');
        self.bytes.extend_from_slice(value);
        self.bytes.push(0);
    }

    pub(crate) fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether a string holds a NUL byte of its own.
    pub(crate) fn has_nul(&self) -> bool {
        self.nul
    }

    /// String `index` without its terminating NUL.
    fn bytes_of(&self, index: usize) -> &[u8] {
        let start = self.spans[index].0;
        let end = self
            .spans
            .get(index + 1)
            .map_or(self.bytes.len(), |&(next, _)| next);
        &self.bytes[start..end - 1]
    }

    /// The strings pushed with [`CStrings::push_pair`] as `(key, value)`, in order.
    pub(crate) fn pairs(&self) -> impl Iterator<Item = (&OsStr, &OsStr)> + '_ {
        (0..self.len()).map(|index| {
            let (key, value) = self.bytes_of(index).split_at(self.spans[index].1);
            let value = value.strip_prefix(b"=").unwrap_or(value);
            (OsStr::from_bytes(key), OsStr::from_bytes(value))
        })
    }

    /// The value of the first `key=` pair, as `getenv` would find it.
    pub(crate) fn var(&self, key: &str) -> Option<&OsStr> {
        self.pairs()
            .find(|(k, _)| k.as_bytes() == key.as_bytes())
            .map(|(_, value)| value)
    }

    /// The NULL-terminated pointer array `execve` takes, valid while `self` is borrowed.
    pub(crate) fn pointers(&self) -> CPointers<'_> {
        let mut pointers = Vec::with_capacity(self.len() + 1);
        pointers.extend(
            self.spans
                .iter()
                .map(|&(start, _)| self.bytes[start..].as_ptr().cast::<c_char>()),
        );
        pointers.push(std::ptr::null());
        CPointers {
            pointers,
            _strings: PhantomData,
        }
    }
}

/// Pointers into a [`CStrings`], then a NULL: an `argv` or `envp`.
#[derive(Debug)]
pub(crate) struct CPointers<'a> {
    pointers: Vec<*const c_char>,
    _strings: PhantomData<&'a CStrings>,
}

impl CPointers<'_> {
    pub(crate) fn as_ptr(&self) -> *const *mut c_char {
        self.pointers.as_ptr().cast()
    }
}

/// The variables through which this crate configures a child: never inherited.
const CHANNEL_VARS: [&str; 4] = [
    CHANNEL_FD_ENV,
    NODE_CHANNEL_FD_ENV,
    NODE_SERIALIZATION_ENV,
    PARENT_DEATH_ENV,
];

fn is_channel_var(key: &OsStr) -> bool {
    CHANNEL_VARS
        .iter()
        .any(|var| key.as_bytes() == var.as_bytes())
}

/// The child's environment: inherited (unless cleared) in this process's order, minus the
/// changed variables, then the changes that set a variable (the last change to a key wins),
/// with this crate's channel variables removed unless this child gets a channel.
pub(crate) fn environment(options: &SpawnOptions, ipc_slot: Option<usize>) -> CStrings {
    let changes = &options.env.vars;
    let inherited: Vec<(OsString, OsString)> = if options.env.clear {
        Vec::new()
    } else {
        std::env::vars_os().collect()
    };
    let bytes = inherited
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>();
    let mut env = CStrings::with_capacity(inherited.len() + changes.len() + 3, bytes + 64);
    let changed: HashSet<&OsStr> = changes.iter().map(|(key, _)| key.as_os_str()).collect();
    for (key, value) in &inherited {
        if !changed.contains(key.as_os_str()) && !is_channel_var(key) {
            env.push_inherited(key, value);
        }
    }
    if !changes.is_empty() {
        // Each key's last change, in the order of those last changes.
        let mut seen = HashSet::with_capacity(changes.len());
        let mut last: Vec<(&OsStr, &OsStr)> = Vec::with_capacity(changes.len());
        for (key, value) in changes.iter().rev() {
            if seen.insert(key.as_os_str())
                && let Some(value) = value
                && !is_channel_var(key)
            {
                last.push((key, value));
            }
        }
        for (key, value) in last.into_iter().rev() {
            env.push_pair(key, value);
        }
    }
    if let Some(slot) = ipc_slot {
        let slot = OsString::from(slot.to_string());
        match options.serialization {
            ipc::Format::Json => {
                env.push_inherited(NODE_CHANNEL_FD_ENV.as_ref(), &slot);
                env.push_inherited(NODE_SERIALIZATION_ENV.as_ref(), "json".as_ref());
            }
            _ => env.push_inherited(CHANNEL_FD_ENV.as_ref(), &slot),
        }
        if let Some(signal) = options.parent_death_signal {
            let parent = std::process::id() as i32;
            let value = ParentDeath { signal, parent }.to_value();
            env.push_inherited(PARENT_DEATH_ENV.as_ref(), &value);
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(env: &CStrings) -> Vec<(String, String)> {
        env.pairs()
            .map(|(k, v)| (k.to_str().unwrap().into(), v.to_str().unwrap().into()))
            .collect()
    }

    #[test]
    fn strings_and_pairs_round_trip_through_one_buffer() {
        let mut strings = CStrings::with_capacity(0, 0);
        strings.push_pair("A".as_ref(), "1=2".as_ref());
        strings.push_pair("EMPTY".as_ref(), "".as_ref());
        assert_eq!(
            vars(&strings),
            [("A".into(), "1=2".into()), ("EMPTY".into(), String::new())]
        );
        assert_eq!(strings.var("A").unwrap(), "1=2");
        assert_eq!(strings.var("B"), None);
        assert!(!strings.has_nul());
        strings.push("with\0nul".as_ref());
        assert!(strings.has_nul());
        assert_eq!(strings.bytes, b"A=1=2\0EMPTY=\0with\0nul\0");
        assert_eq!(strings.pointers().pointers.len(), 4);
    }

    #[test]
    fn the_last_change_to_a_key_wins_and_removals_remove() {
        let options = SpawnOptions::new()
            .env_clear()
            .env("A", "1")
            .env("B", "2")
            .env("A", "3")
            .env("C", "4")
            .env_remove("C")
            .env("D", "5");
        assert_eq!(
            vars(&environment(&options, None)),
            [
                ("B".into(), "2".into()),
                ("A".into(), "3".into()),
                ("D".into(), "5".into())
            ]
        );
    }

    #[test]
    fn inherited_variables_keep_their_order_unless_changed() {
        let inherited: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        let Some((key, _)) = inherited.first() else {
            return;
        };
        let options = SpawnOptions::new().env(key, "changed");
        let env = environment(&options, None);
        let mut expected: Vec<(&OsStr, &OsStr)> = inherited
            .iter()
            .filter(|(k, _)| k != key && !is_channel_var(k))
            .map(|(k, v)| (k.as_os_str(), v.as_os_str()))
            .collect();
        expected.push((key, "changed".as_ref()));
        assert_eq!(env.pairs().collect::<Vec<_>>(), expected);
    }

    #[test]
    fn channel_variables_are_stripped_without_a_channel() {
        let options = SpawnOptions::new()
            .env(CHANNEL_FD_ENV, "3")
            .env(PARENT_DEATH_ENV, "9:1")
            .env("KEEP", "1");
        let env = environment(&options, None);
        assert!(env.var(CHANNEL_FD_ENV).is_none() && env.var(PARENT_DEATH_ENV).is_none());
        assert_eq!(env.var("KEEP").unwrap(), "1");
        let env = environment(&options, Some(4));
        assert_eq!(env.var(CHANNEL_FD_ENV).unwrap(), "4");
        assert!(env.var(NODE_CHANNEL_FD_ENV).is_none());
    }

    #[test]
    fn a_json_channel_gets_node_variables_and_no_other() {
        let options = SpawnOptions::new()
            .env(NODE_CHANNEL_FD_ENV, "9")
            .env(NODE_SERIALIZATION_ENV, "advanced")
            .env(CHANNEL_FD_ENV, "3");
        let env = environment(&options, None);
        assert!(env.var(NODE_CHANNEL_FD_ENV).is_none());
        assert!(env.var(NODE_SERIALIZATION_ENV).is_none());
        let env = environment(&options.serialization(ipc::Format::Json), Some(3));
        assert_eq!(env.var(NODE_CHANNEL_FD_ENV).unwrap(), "3");
        assert_eq!(env.var(NODE_SERIALIZATION_ENV).unwrap(), "json");
        assert!(env.var(CHANNEL_FD_ENV).is_none());
    }
}
