//! Typed framed messages with fd passing.
