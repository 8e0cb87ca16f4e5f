//! Node-style process launching (`spawn`, `exec`, `exec_file`, `fork`).
//!
//! This crate is being built; it exposes nothing yet.
