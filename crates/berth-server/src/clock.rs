//! The engine's wall clock: container time, usage timestamps and the cron schedule read it.
//! `System` in production; `Manual` lets tests (and replays) hold time still and move it by
//! exact amounts; `Tokio` follows tokio's clock, so a test under `tokio::time::pause()` moves
//! wall time and the engine's timers (idle deadlines, lifetimes, park, cron sleeps — all tokio
//! timers) together with `tokio::time::advance`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Unix milliseconds, moved only by [`Clock::advance`].
    Manual(Arc<AtomicI64>),
    /// `base_ms` at `origin`, then moving with tokio's (pausable) clock.
    Tokio {
        base_ms: i64,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    pub fn manual(start_ms: i64) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// A clock at `base_ms` now, moving with tokio's clock from here.
    pub fn following_tokio(base_ms: i64) -> Clock {
        Clock::Tokio {
            base_ms,
            origin: tokio::time::Instant::now(),
        }
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
            Clock::Tokio { base_ms, origin } => base_ms + origin.elapsed().as_millis() as i64,
        }
    }

    /// Move a manual clock forward (no effect on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Clock::Manual(ms) = self {
            ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
        }
    }
}

/// RFC 3339 (UTC, millisecond precision) of a Unix time in milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

/// Unix milliseconds of an RFC 3339 time.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(Duration::from_secs(3600));
        assert_eq!(c.now_ms(), 3_601_000);
        assert_eq!(parse_rfc3339_ms(&rfc3339_ms(c.now_ms())), Some(3_601_000));
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_with_paused_time() {
        let c = Clock::following_tokio(5_000);
        assert_eq!(c.now_ms(), 5_000);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(c.now_ms(), 95_000);
    }
}
