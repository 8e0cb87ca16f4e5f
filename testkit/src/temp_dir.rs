//! [`TempDir`]: a fresh directory that is removed when the guard is dropped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A new, empty directory under the system's temporary directory, named after `what`,
/// this process and a counter (so tests running in parallel never share one), removed
/// with everything in it when dropped, also when a test fails.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/testkit-WHAT-PID-N`, empty (a leftover of a crashed run with the
    /// same pid is removed first).
    ///
    /// # Panics
    ///
    /// When the directory cannot be created: a test cannot go on without it.
    pub fn new(what: &str) -> Self {
        Self::new_in(&std::env::temp_dir(), what)
    }

    /// The same under `base` (for example `CARGO_TARGET_TMPDIR`, where a copied
    /// executable may run: `/tmp` can be mounted `noexec`).
    ///
    /// # Panics
    ///
    /// When the directory cannot be created.
    pub fn new_in(base: &Path, what: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join(format!("testkit-{what}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_is_new_and_empty_and_goes_with_its_guard() {
        let (a, b) = (TempDir::new("t"), TempDir::new("t"));
        assert_ne!(a.path(), b.path());
        assert_eq!(std::fs::read_dir(a.path()).expect("a dir").count(), 0);
        std::fs::write(a.path().join("f"), b"x").expect("a file in it");
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }
}
