//! The workspace's multi-process integration tests, built as one test binary.
mod child;
mod cluster;
mod ipc_channel;
mod node_ipc;
mod tidy;
