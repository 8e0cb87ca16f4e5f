//! Node-style cluster: a primary process that supervises workers.
//!
//! This crate is being built; it exposes nothing yet.
