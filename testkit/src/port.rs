//! [`free_port`]: a loopback TCP port for a test that needs a fixed one.

use std::sync::atomic::{AtomicU32, Ordering};

/// The lowest port handed out; below it lie well-known and registered services.
const LOWEST: u16 = 10_000;

/// A TCP port free on 127.0.0.1 now, for a server a test starts on a fixed port.
///
/// A port the kernel picked for a probe (`bind` to port 0, then close) is in the
/// ephemeral range, where any connection another test opens meanwhile may take it as its
/// source port, and the test's own bind then fails with `EADDRINUSE` (one run in a few
/// hundred with the tests in parallel). This one lies below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), which no connection and no bind to port 0 is given,
/// spread by the process id and a counter so that parallel tests do not pick the same
/// one, and is checked free by binding it.
///
/// # Panics
///
/// When no port below the ephemeral range is free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let highest = ephemeral_low().saturating_sub(1).max(LOWEST + 1);
    let span = u32::from(highest - LOWEST);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let start = std::process::id()
        .wrapping_mul(7_919)
        .wrapping_add(n.wrapping_mul(104_729))
        % span;
    (0..span)
        .map(|i| LOWEST + u16::try_from((start + i) % span).expect("below the range"))
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// The first port of the kernel's ephemeral range (32768 when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_below_the_ephemeral_range_and_differ() {
        let (a, b) = (free_port(), free_port());
        assert_ne!(a, b);
        for port in [a, b] {
            assert!((LOWEST..ephemeral_low()).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).expect("free");
        }
    }
}
