//! The one clock of the crate: a process-wide monotonic millisecond count for deadlines and
//! ages kept in atomics, and Unix time for what crosses the wire (`ts` in microseconds, ban
//! expiries in milliseconds).
//!
//! The monotonic count follows tokio's clock, so a test that pauses time moves it too.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds on a process-wide monotonic clock (cheap to store in an atomic).
pub fn monotonic_millis() -> u64 {
    static START: OnceLock<tokio::time::Instant> = OnceLock::new();
    START
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Microseconds since the Unix epoch, the unit of every `ts`.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Unix time in milliseconds (ban expiries).
pub fn unix_millis() -> u64 {
    unix_micros() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_agree_and_move_forward() {
        let a = monotonic_millis();
        let u = unix_millis();
        assert!(u / 1000 == unix_micros() / 1_000_000 || u / 1000 + 1 == unix_micros() / 1_000_000);
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(monotonic_millis() >= a + 5);
    }
}
