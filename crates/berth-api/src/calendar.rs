//! Calendar months in UTC, the period of tenants' budgets: one definition for the gateway
//! (which refuses over budget) and the ledger (which sums what was spent).

/// (year, month 1..=12) in UTC of a Unix time in seconds (civil-from-days, Howard Hinnant's
/// algorithm; exact for every `i64` second whose year fits an `i32`).
pub fn month_of(unix_secs: i64) -> (i32, u8) {
    let z = unix_secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8)
}

/// Unix seconds of the first day (00:00 UTC) of `month` in `year` (days-from-civil).
fn month_start_secs(year: i32, month: u8) -> i64 {
    let m = i64::from(month);
    let y = i64::from(year) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400
}

/// Unix ms of the first instant of the calendar month (UTC) holding `unix_ms`.
pub fn month_start_ms(unix_ms: i64) -> i64 {
    let (y, m) = month_of(unix_ms.div_euclid(1000));
    month_start_secs(y, m).saturating_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-11-29T12:00:00Z and 2026-11-01T00:00:00Z
    const NOV_29_2026: i64 = 1_795_953_600;
    const NOV_1_2026: i64 = 1_793_491_200;

    #[test]
    fn months_of_known_days() {
        assert_eq!(month_of(0), (1970, 1));
        assert_eq!(month_of(NOV_29_2026), (2026, 11));
        assert_eq!(month_of(1_709_164_800), (2024, 2)); // 2024-02-29, a leap day
        assert_eq!(month_of(951_868_800), (2000, 3)); // 2000-03-01
        assert_eq!(month_of(-1), (1969, 12));
    }

    #[test]
    fn months_start_at_midnight_utc_on_the_first() {
        assert_eq!(month_start_ms(NOV_29_2026 * 1000), NOV_1_2026 * 1000);
        assert_eq!(month_start_ms(NOV_1_2026 * 1000), NOV_1_2026 * 1000);
        assert_eq!(month_start_ms(NOV_1_2026 * 1000 - 1), 1_790_812_800_000); // Oct 1
    }

    #[test]
    fn year_boundaries() {
        let new_year_2027 = 1_798_761_600; // 2027-01-01T00:00:00Z
        assert_eq!(month_of(new_year_2027 - 1), (2026, 12));
        assert_eq!(month_of(new_year_2027), (2027, 1));
        assert_eq!(month_start_ms(new_year_2027 * 1000 - 1), 1_796_083_200_000); // 2026-12-01
        assert_eq!(month_start_ms(new_year_2027 * 1000), new_year_2027 * 1000);
        assert_eq!(
            month_start_ms(new_year_2027 * 1000 + 86_399_999),
            new_year_2027 * 1000
        );
        // Into and out of a leap February, and across a century that is not a leap year.
        assert_eq!(month_start_ms(1_709_251_199_999), 1_706_745_600_000); // 2024-02-29 → 02-01
        assert_eq!(month_start_ms(1_709_251_200_000), 1_709_251_200_000); // 2024-03-01
        assert_eq!(month_of(4_107_542_400), (2100, 3)); // 2100-03-01 (no Feb 29 in 2100)
        assert_eq!(month_of(4_107_542_399), (2100, 2));
        assert_eq!(month_start_ms(-1), -2_678_400_000); // 1969-12-01
    }

    #[test]
    fn the_start_agrees_with_the_month_for_every_day_of_a_span() {
        // Every day from 1999-12-01 to 2030-01-31: the start is in the same month, at most
        // 31 days before, at midnight, and the day before it is in another month.
        let mut t = 944_006_400; // 1999-12-01
        while t < 1_896_134_400 {
            let s = month_start_ms(t * 1000) / 1000;
            assert_eq!(month_of(s), month_of(t), "{t}");
            assert_ne!(month_of(s - 1), month_of(t), "{t}");
            assert!(t - s < 31 * 86_400 && s % 86_400 == 0, "{t}");
            t += 86_400 + 3_600;
        }
    }
}
