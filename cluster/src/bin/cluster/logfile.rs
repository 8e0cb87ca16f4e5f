//! `--log-file PATH`: the file that takes the command's whole output (the workers' lines
//! and the primary's own messages and log), and its reopen on SIGUSR1 for logrotate (as
//! nginx does: the rotation renames the file, then `postrotate` signals the command).
//!
//! The file is opened `O_WRONLY|O_APPEND|O_CREAT|O_CLOEXEC`, created with mode 0640 (less
//! the umask: a log may hold what requests carried, so it is not world-readable); an
//! existing file keeps its mode and owner. Only the writer thread of its sink
//! (`output.rs`) writes to it, one line per write(2), and only that thread reopens it,
//! between two lines, when [`Sink::reopen`](super::output::Sink::reopen) asked for it.
//! A reopen that fails (the directory is gone, no permission) keeps the file it had.
//!
//! What still reaches the terminal (the command's own stderr) with a log file: whatever
//! is said before the file is open (usage errors, a file that cannot be opened), the
//! error that ends the command (also in the file), and a reopen or write that fails (also
//! in the file when it can still be written).

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The mode a new log file is created with (less the umask).
const MODE: u32 = 0o640;

/// The first line written into a reopened file.
pub(crate) const REOPENED: &str = "cluster: reopened the log file";

/// The open log file and the path it is reopened from.
#[derive(Debug)]
pub(crate) struct LogFile {
    path: PathBuf,
    file: File,
    /// A write failed and was reported; the next failure is not reported again until a
    /// write succeeds.
    failing: bool,
}

impl LogFile {
    /// Opens (or creates) `path` for appending.
    pub(crate) fn open(path: &Path) -> std::io::Result<LogFile> {
        Ok(LogFile {
            path: path.to_owned(),
            file: open(path)?,
            failing: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the path again (a new file if the old one was renamed away) and writes
    /// [`REOPENED`] as the new file's first line; on failure keeps the file it had.
    pub(crate) fn reopen(&mut self) -> std::io::Result<()> {
        let mut file = open(&self.path)?;
        // The first line of the new file says it is the reopened one; a failure to write
        // it shows in the next line's write.
        let _ = file.write_all(format!("{REOPENED}\n").as_bytes());
        self.file = file;
        self.failing = false;
        Ok(())
    }

    /// Writes `line` (a whole line, with its newline) in one write(2) as long as the
    /// file takes it whole. `Err` only for the first failure of a run of them, so that
    /// it is reported once; a failed line is lost.
    pub(crate) fn write_line(&mut self, line: &[u8]) -> Result<(), std::io::Error> {
        match self.file.write_all(line) {
            Ok(()) => {
                self.failing = false;
                Ok(())
            }
            Err(_) if self.failing => Ok(()),
            Err(e) => {
                self.failing = true;
                Err(e)
            }
        }
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    // std opens every file with O_CLOEXEC: the workers do not inherit it.
    File::options()
        .append(true)
        .create(true)
        .mode(MODE)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use testkit::TempDir;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).expect("read the log file")
    }

    #[test]
    fn a_reopen_after_a_rename_writes_on_in_a_new_file_that_says_so() {
        let dir = TempDir::new("rename");
        let path = dir.path().join("cluster.log");
        let mut file = LogFile::open(&path).expect("open");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077 & !MODE, 0, "not more than 0640: {mode:o}");
        file.write_line(b"before\n").expect("write");
        let rotated = dir.path().join("cluster.log.1");
        std::fs::rename(&path, &rotated).expect("rename");
        file.write_line(b"still the old file\n").expect("write");
        file.reopen().expect("reopen");
        file.write_line(b"after\n").expect("write");
        assert_eq!(read(&rotated), "before\nstill the old file\n");
        assert_eq!(read(&path), format!("{REOPENED}\nafter\n"));
    }

    #[test]
    fn a_failed_reopen_keeps_the_old_file() {
        let dir = TempDir::new("gone");
        std::fs::create_dir(dir.path().join("logs")).expect("mkdir");
        let mut file = LogFile::open(&dir.path().join("logs/cluster.log")).expect("open");
        std::fs::rename(dir.path().join("logs"), dir.path().join("old"))
            .expect("rename the directory");
        let error = file.reopen().expect_err("the directory is gone");
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        file.write_line(b"kept\n").expect("write");
        assert_eq!(read(&dir.path().join("old/cluster.log")), "kept\n");
    }
}
