//! Log sequence numbers.
//!
//! An [`Lsn`] is a byte position in the Postgres write-ahead log. It is shown
//! and parsed in the server's own `X/Y` form (two hexadecimal halves of a
//! 64-bit number), ordered, and never passed around as a bare integer.
//! See <https://www.postgresql.org/docs/current/datatype-pg-lsn.html>.
//!
//! Also here, as positions of the stream: [`Checkpoint`] (an LSN that may
//! fall inside a transaction applied in part) and the protocol's clock
//! (microseconds since 2000-01-01).
//!
//! Invariant: positions are never bare integers in an interface, and
//! conversions to Neo4j's signed integers clamp instead of wrapping.

use std::fmt;
use std::str::FromStr;

/// A position in the write-ahead log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(u64);

impl Lsn {
    /// The zero position; the server reads it as "wherever the slot is".
    pub const ZERO: Lsn = Lsn(0);

    /// Wraps a raw 64-bit position.
    pub const fn new(raw: u64) -> Self {
        Lsn(raw)
    }

    /// The raw 64-bit position, for the wire protocol.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// The position as a non-negative `i64`, the form stored in Neo4j
    /// (Bolt integers are signed). Positions beyond `i64::MAX` do not occur
    /// in practice (that is 8 EiB of WAL) and are clamped.
    pub fn to_i64(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }

    /// The inverse of [`Lsn::to_i64`]; negative numbers become zero.
    pub fn from_i64(v: i64) -> Self {
        Lsn(u64::try_from(v).unwrap_or(0))
    }

    /// Bytes from `earlier` to `self`, zero when `earlier` is ahead.
    pub fn bytes_since(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Why a text is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an LSN: write it as two hexadecimal numbers separated by a slash, like 0/16B3748"
)]
pub struct ParseLsnError(String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        let valid =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !valid(hi) || !valid(lo) {
            return Err(err());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A transaction applied in part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Partial {
    /// End LSN of the transaction.
    pub end_lsn: Lsn,
    /// How many of its changes, from the first, are applied.
    pub changes: u64,
}

/// A position in the stream that the graph reflects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Checkpoint {
    /// End LSN of the last transaction applied whole.
    pub lsn: Lsn,
    /// The transaction after it, when some but not all of its changes are applied.
    pub partial: Option<Partial>,
}

impl Checkpoint {
    /// A checkpoint at a transaction boundary.
    pub fn at(lsn: Lsn) -> Self {
        Checkpoint { lsn, partial: None }
    }

    /// How many leading changes of the transaction ending at `end_lsn` are
    /// already applied: all of them (`None`) when it ends at or below
    /// `lsn`, some when it is the partial one, otherwise none.
    pub fn applied_changes(&self, end_lsn: Lsn) -> Option<u64> {
        if end_lsn <= self.lsn {
            return None;
        }
        match self.partial {
            Some(p) if p.end_lsn == end_lsn => Some(p.changes),
            _ => Some(0),
        }
    }
}

impl std::fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.lsn)?;
        if let Some(p) = self.partial {
            write!(
                f,
                " and {} changes of the transaction ending at {}",
                p.changes, p.end_lsn
            )?;
        }
        Ok(())
    }
}

/// Microseconds from the Unix epoch to Postgres' (2000-01-01 UTC), the
/// origin of every timestamp in the replication protocol.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// A Postgres protocol time (microseconds since 2000-01-01) as microseconds
/// since the Unix epoch.
pub fn pg_micros_to_unix(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)
}

/// A Postgres protocol time (microseconds since 2000-01-01) as a UTC time.
pub fn pg_time(pg_micros: i64) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp_micros(pg_micros_to_unix(pg_micros)).unwrap_or_default()
}

/// Now, in microseconds since 2000-01-01 UTC (the protocol's clock).
pub fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    unix - PG_EPOCH_UNIX_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_the_server_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.raw(), 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn::ZERO);
    }

    #[test]
    fn rejects_malformed_text_with_a_sentence() {
        for bad in ["", "0", "/1", "1/", "g/1", "1/2/3", "123456789/0", "-1/0"] {
            let err = bad.parse::<Lsn>().unwrap_err();
            assert!(err.to_string().contains("is not an LSN"), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn display_round_trips(raw in any::<u64>()) {
            let lsn = Lsn::new(raw);
            prop_assert_eq!(lsn.to_string().parse::<Lsn>().unwrap(), lsn);
        }
    }

    #[test]
    fn applied_changes_skips_whole_and_partial_transactions() {
        let cp = Checkpoint {
            lsn: Lsn::new(100),
            partial: Some(Partial {
                end_lsn: Lsn::new(200),
                changes: 7,
            }),
        };
        assert_eq!(cp.applied_changes(Lsn::new(90)), None);
        assert_eq!(cp.applied_changes(Lsn::new(100)), None);
        assert_eq!(cp.applied_changes(Lsn::new(200)), Some(7));
        assert_eq!(cp.applied_changes(Lsn::new(150)), Some(0));
        assert_eq!(cp.applied_changes(Lsn::new(300)), Some(0));
        assert!(Checkpoint::at(Lsn::new(100)) < cp);
        assert!(cp < Checkpoint::at(Lsn::new(200)));
    }
}
