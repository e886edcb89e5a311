//! Time as an input: [`Timestamp`], the [`Clock`] trait, [`SystemClock`] and [`ManualClock`].
//!
//! This is the only module that reads the system clock. Every operation of the engine takes
//! exactly one reading from its clock; wait timeouts use real elapsed time instead.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A UTC instant with microsecond precision: microseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The instant `micros` microseconds after 1970-01-01T00:00:00Z.
    pub const fn from_micros(micros: i64) -> Timestamp {
        Timestamp(micros)
    }

    /// Microseconds since the Unix epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// This instant plus `d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_micros(d)))
    }

    /// This instant minus `d`, saturating at the start of time.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_micros(d)))
    }

    /// The UTC calendar fields `(year, month, day, hour, minute, second, microsecond)`
    /// (proleptic Gregorian; months and days from 1).
    pub fn to_utc(self) -> (i64, u32, u32, u32, u32, u32, u32) {
        let secs = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(days);
        // Every value below is in range: month 1..=12, day 1..=31, rem < 86_400.
        let small = |v: i64| u32::try_from(v).unwrap_or(0);
        (
            y,
            small(m),
            small(d),
            small(rem / 3600),
            small(rem % 3600 / 60),
            small(rem % 60),
            small(micros),
        )
    }
}

/// A duration in whole microseconds, saturating at `i64::MAX`.
pub(crate) fn duration_micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl fmt::Display for Timestamp {
    /// RFC 3339 in UTC with six fractional digits, e.g. `2026-12-04T15:55:00.000000Z`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d, h, min, s, us) = self.to_utc();
        write!(f, "{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{us:06}Z")
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Where the engine gets the current time from.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The real UTC wall clock (the default).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        // A clock before 1970 reads as negative microseconds, never as a panic.
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => Timestamp(duration_micros(d)),
            Err(e) => Timestamp(-duration_micros(e.duration())),
        }
    }
}

/// A clock that only moves when told to: for tests, simulation and fuzzing.
///
/// Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// A manual clock reading `start`.
    pub fn new(start: Timestamp) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(start.0)))
    }

    /// A manual clock starting at the current system time (rounded to microseconds).
    pub fn starting_now() -> ManualClock {
        ManualClock::new(SystemClock.now())
    }

    /// Sets the time (it may go backwards; the engine copes).
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }

    /// Moves the time forward by `d`.
    pub fn advance(&self, d: Duration) {
        let by = duration_micros(d);
        let _ = self
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_add(by))
            });
    }

    /// The current reading.
    pub fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        ManualClock::now(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339_utc_micros() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            Timestamp(1_796_399_700_123_456).to_string(),
            "2026-12-04T15:55:00.123456Z"
        );
        assert_eq!(Timestamp(-1).to_string(), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn utc_fields() {
        assert_eq!(Timestamp(0).to_utc(), (1970, 1, 1, 0, 0, 0, 0));
        assert_eq!(
            Timestamp(1_796_399_700_123_456).to_utc(),
            (2026, 12, 4, 15, 55, 0, 123_456)
        );
        assert_eq!(Timestamp(-1).to_utc(), (1969, 12, 31, 23, 59, 59, 999_999));
        // 2024-02-29T23:59:59.5Z, a leap day.
        assert_eq!(
            Timestamp(1_709_251_199_500_000).to_utc(),
            (2024, 2, 29, 23, 59, 59, 500_000)
        );
    }

    #[test]
    fn manual_clock_is_shared_between_clones() {
        let c = ManualClock::new(Timestamp(10));
        let d = c.clone();
        c.advance(Duration::from_micros(5));
        assert_eq!(d.now(), Timestamp(15));
    }
}
