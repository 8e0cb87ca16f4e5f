//! Helpers shared by the integration-test helper binaries.
