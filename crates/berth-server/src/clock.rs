//! The clock the ledger reads: container time and usage timestamps. `System` in production;
//! `Manual` lets tests (and replays) hold time still and move it by exact amounts.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub enum Clock {
    #[default]
    System,
    /// Unix milliseconds, moved only by [`Clock::advance`].
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn manual(start_ms: i64) -> Clock {
        Clock::Manual(Arc::new(AtomicI64::new(start_ms)))
    }

    /// Unix time in milliseconds.
    pub fn now_ms(&self) -> i64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0),
            Clock::Manual(ms) => ms.load(Ordering::SeqCst),
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
}
