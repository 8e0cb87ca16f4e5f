//! [`Link`]: what the [`Primary`](super::Primary) handle and the primary's own servers
//! (the control socket, the metrics endpoint) share to talk to the driver: the bounded
//! command channel and the readiness. Cloning it is cheap; none of its users owns any
//! of the cluster's state, they only ask the driver (which asks the core).

use tokio::sync::{mpsc, oneshot, watch};

use super::command::{Command, Reply};
use super::core::{Outcome, Request};
use super::stats::Stats;
use crate::error::Error;

/// A way to the driver: its commands and the readiness it publishes.
#[derive(Debug, Clone)]
// Without the `metrics` feature only the handle uses it, and asks the driver directly.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct Link {
    pub(crate) commands: mpsc::Sender<Command>,
    pub(crate) ready: watch::Receiver<bool>,
}

#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Link {
    /// Sends the driver a command and waits for its answer; `Stopped` once the driver
    /// has ended.
    pub(crate) async fn ask<T>(
        &self,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(command(tx))
            .await
            .map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Asks the core, through the driver.
    pub(crate) async fn request(&self, request: Request) -> Result<Outcome, Error> {
        self.ask(|reply| Command::Core(request, reply)).await
    }

    /// A snapshot of the cluster.
    pub(crate) async fn stats(&self) -> Result<Stats, Error> {
        self.ask(Command::Stats).await
    }

    /// Whether the cluster is ready now (false once the primary has ended).
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) fn ready(&self) -> bool {
        *self.ready.borrow() && !self.commands.is_closed()
    }

    /// Resolves once the driver has ended.
    pub(crate) async fn closed(&self) {
        self.commands.closed().await;
    }
}
