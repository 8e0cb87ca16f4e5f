//! The environment a primary gives its workers: the names, how they are written and
//! read, and the [`Role`] they give this process. A leaf: the primary (which writes them)
//! and the worker side (which reads them) both depend on it, and it on nothing of theirs.

use crate::protocol::WorkerId;

/// The environment variable that carries a worker's id (Node's `NODE_UNIQUE_ID`).
pub const WORKER_ID_ENV: &str = "CLUSTER_WORKER_ID";

/// What makes a Node program a cluster worker: its id, set for [`Settings::node`]
/// workers (Node reads and deletes it at start-up).
///
/// [`Settings::node`]: crate::Settings::node
pub(crate) const NODE_UNIQUE_ID_ENV: &str = "NODE_UNIQUE_ID";

/// The environment variable that carries a worker's slot index: which of the primary's
/// places it fills, kept by its replacements (PM2's `NODE_APP_INSTANCE`).
pub const WORKER_SLOT_ENV: &str = "CLUSTER_WORKER_SLOT";

/// A worker id as written in [`WORKER_ID_ENV`].
pub(crate) fn format_id(id: WorkerId) -> String {
    id.0.to_string()
}

/// The worker id in a [`WORKER_ID_ENV`] value: a positive number, else `None`.
pub(crate) fn parse_id(value: &str) -> Option<WorkerId> {
    value.parse::<u64>().ok().filter(|id| *id > 0).map(WorkerId)
}

/// The slot in a [`WORKER_SLOT_ENV`] value.
pub(crate) fn parse_slot(value: &str) -> Option<usize> {
    value.parse().ok()
}

/// Which part this process plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not started by a primary.
    Primary,
    /// Started by a primary, with this id.
    Worker(WorkerId),
}

/// This process's role, from [`WORKER_ID_ENV`]. A value that is not a positive number
/// counts as absent (the process is a primary).
pub fn role() -> Role {
    worker_id().map_or(Role::Primary, Role::Worker)
}

/// Whether this process is a primary (Node's `cluster.isPrimary`).
pub fn is_primary() -> bool {
    role() == Role::Primary
}

/// Whether this process is a worker (Node's `cluster.isWorker`).
pub fn is_worker() -> bool {
    !is_primary()
}

/// This process's worker id, if a primary started it.
pub(crate) fn worker_id() -> Option<WorkerId> {
    std::env::var(WORKER_ID_ENV)
        .ok()
        .as_deref()
        .and_then(parse_id)
}

/// This process's slot, if a primary started it.
pub(crate) fn worker_slot() -> Option<usize> {
    std::env::var(WORKER_SLOT_ENV)
        .ok()
        .as_deref()
        .and_then(parse_slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_slots_round_trip() {
        for n in [1, 2, 41, u64::MAX] {
            let id = WorkerId(n);
            assert_eq!(parse_id(&format_id(id)), Some(id));
        }
        for slot in [0, 7, usize::MAX] {
            assert_eq!(parse_slot(&slot.to_string()), Some(slot));
        }
    }

    #[test]
    fn malformed_ids_are_absent() {
        for value in ["", "0", "-1", "x", " 1", "1.5"] {
            assert_eq!(parse_id(value), None, "{value:?}");
        }
    }
}
