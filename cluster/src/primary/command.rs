//! What the [`Primary`](super::Primary) handle asks its driver (`Command`, each with where
//! the answer goes), and the names both sides share. A leaf: the handle and the driver
//! import it, it imports neither.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::core::{Outcome, Request};
use super::stats::Stats;
use crate::protocol::WorkerId;

/// How long an exited worker's channel may stay open before its exit is reported anyway
/// (its last messages are read first; a descendant may hold the channel open).
pub(crate) const EXIT_GRACE: Duration = Duration::from_secs(1);

pub(crate) type Reply<T> = oneshot::Sender<T>;
pub(crate) type UserSender = Arc<tokio::sync::Mutex<ipc::Sender>>;

/// What the [`Primary`] handle asks its driver, each with where the answer goes.
#[derive(Debug)]
pub(crate) enum Command {
    /// A request for the core: the driver keeps the reply under a `RequestId` and sends
    /// it the core's answer, once.
    Core(Request, Reply<Outcome>),
    /// The user-message channels of the connected workers (one, or all).
    Senders(Option<WorkerId>, Reply<Vec<UserSender>>),
    Stats(Reply<Stats>),
    /// Whether the round-robin handles accept (paused once an upgrade's new primary is
    /// ready, so that connections wait in the shared backlog for it).
    Accepting(bool, Reply<()>),
    /// Copies of every listening socket, for an upgrade.
    Handover(Reply<std::io::Result<Vec<(std::os::fd::OwnedFd, String)>>>),
}
