//! The workspace's multi-process integration tests, built as one test binary.
