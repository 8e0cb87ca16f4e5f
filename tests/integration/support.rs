//! Test support: processes that are always reaped.

use std::process::{Child, ExitStatus, Output};

/// A child process that is killed and reaped when the guard is dropped, so a failing
/// test leaves no process behind.
#[derive(Debug)]
pub(crate) struct Reaped(Option<Child>);

impl Reaped {
    pub(crate) fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Waits for the child to exit.
    pub(crate) fn wait(&mut self) -> ExitStatus {
        self.0.as_mut().expect("child").wait().expect("wait")
    }

    /// Waits for the child, collecting its piped output.
    pub(crate) fn wait_with_output(mut self) -> Output {
        self.0
            .take()
            .expect("child")
            .wait_with_output()
            .expect("wait")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
