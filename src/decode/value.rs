//! Typed column values.
//!
//! pgoutput sends values in their text output form. The replication session
//! fixes the styles that shape that form (`DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601`, `extra_float_digits=3`, `bytea_output=hex`; see
//! [`crate::source::sql::OUTPUT_STYLES`]), so the text can be read back exactly. A text that does
//! not parse as its type claims is kept as [`Value::Text`]: nothing is lost.
//!
//! Invariant: every text decodes to some [`Value`]; none is lost or panics.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime};
use serde::Serialize;

/// Type OIDs walgraph decodes (from `pg_type.dat`).
pub mod oid {
    #![allow(missing_docs)]
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const CHAR: u32 = 18;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const CIDR: u32 = 650;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const INET: u32 = 869;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const INTERVAL: u32 = 1186;
    pub const TIMETZ: u32 = 1266;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// A decoded column value.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Value {
    /// SQL NULL.
    Null,
    /// bool.
    Bool(bool),
    /// int2, int4, int8, oid.
    Int(i64),
    /// float4, float8 (including NaN and the infinities).
    Float(f64),
    /// numeric, exactly as Postgres printed it (no float rounding).
    Numeric(String),
    /// text, varchar, char, name, enums and every type walgraph does not know.
    Text(String),
    /// bytea.
    Bytes(Vec<u8>),
    /// uuid, in its canonical text form.
    Uuid(String),
    /// json and jsonb, as JSON text.
    Json(String),
    /// date.
    Date(NaiveDate),
    /// time without time zone.
    Time(NaiveTime),
    /// time with time zone.
    TimeTz(NaiveTime, i32),
    /// timestamp without time zone.
    Timestamp(NaiveDateTime),
    /// timestamp with time zone.
    TimestampTz(DateTime<FixedOffset>),
    /// interval.
    Interval(Interval),
    /// inet and cidr, in their text form.
    Inet(String),
    /// A one-dimensional array.
    Array(Vec<Value>),
}

impl Value {
    /// The value as plain JSON (no type tags): numbers, strings, booleans,
    /// null, arrays; temporal values in ISO 8601 text.
    pub fn to_plain_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Bool(b) => J::Bool(*b),
            Value::Int(i) => J::from(*i),
            Value::Float(f) => {
                serde_json::Number::from_f64(*f).map_or_else(|| J::String(f.to_string()), J::Number)
            }
            Value::Numeric(s) | Value::Text(s) | Value::Uuid(s) | Value::Inet(s) => {
                J::String(s.clone())
            }
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| J::String(s.clone())),
            Value::Bytes(b) => J::String(b.iter().map(|x| format!("{x:02x}")).collect()),
            Value::Date(d) => J::String(d.to_string()),
            Value::Time(t) => J::String(t.to_string()),
            Value::TimeTz(t, o) => {
                J::String(format!("{t}{:+03}:{:02}", o / 3600, (o.abs() % 3600) / 60))
            }
            Value::Timestamp(t) => J::String(t.format("%Y-%m-%dT%H:%M:%S%.f").to_string()),
            Value::TimestampTz(t) => J::String(t.to_rfc3339()),
            Value::Interval(i) => J::String(format!(
                "P{}M{}DT{}S",
                i.months,
                i.days,
                i.micros as f64 / 1e6
            )),
            Value::Array(items) => J::Array(items.iter().map(Value::to_plain_json).collect()),
        }
    }
}

/// An interval, split the way Postgres keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Interval {
    /// Whole months.
    pub months: i64,
    /// Whole days.
    pub days: i64,
    /// Microseconds.
    pub micros: i64,
}

/// The element type OID of an array type walgraph decodes, if `oid` is one.
pub fn array_element(array_oid: u32) -> Option<u32> {
    Some(match array_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1016 => oid::INT8,
        1009 => oid::TEXT,
        1028 => oid::OID,
        199 => oid::JSON,
        651 => oid::CIDR,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1041 => oid::INET,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1115 => oid::TIMESTAMP,
        1185 => oid::TIMESTAMPTZ,
        1187 => oid::INTERVAL,
        1270 => oid::TIMETZ,
        1231 => oid::NUMERIC,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// Decodes a value's text form by its type OID.
pub fn decode_text(type_oid: u32, text: &str) -> Value {
    if let Some(elem) = array_element(type_oid) {
        return match parse_array(text) {
            Some(items) => Value::Array(
                items
                    .into_iter()
                    .map(|item| match item {
                        None => Value::Null,
                        Some(s) => decode_text(elem, &s),
                    })
                    .collect(),
            ),
            None => Value::Text(text.to_string()),
        };
    }
    let parsed = match type_oid {
        oid::BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID => text.parse().ok().map(Value::Int),
        oid::FLOAT4 | oid::FLOAT8 => parse_float(text).map(Value::Float),
        oid::NUMERIC => Some(Value::Numeric(text.to_string())),
        oid::BYTEA => parse_bytea(text).map(Value::Bytes),
        oid::UUID => Some(Value::Uuid(text.to_string())),
        oid::JSON | oid::JSONB => Some(Value::Json(text.to_string())),
        oid::DATE => parse_date(text).map(Value::Date),
        oid::TIME => parse_time(text).map(Value::Time),
        oid::TIMETZ => parse_timetz(text),
        oid::TIMESTAMP => parse_timestamp(text).map(Value::Timestamp),
        oid::TIMESTAMPTZ => parse_timestamptz(text).map(Value::TimestampTz),
        oid::INTERVAL => parse_interval(text).map(Value::Interval),
        oid::INET | oid::CIDR => Some(Value::Inet(text.to_string())),
        // char(n) without its padding, which Postgres does not compare
        // either: char(5) and char(10) keys meet.
        oid::BPCHAR => Some(Value::Text(text.trim_end_matches(' ').to_string())),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::Text(text.to_string()))
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Splits a trailing `+HH`, `+HH:MM` or `+HH:MM:SS` zone offset into seconds east.
fn split_offset(text: &str) -> Option<(&str, i32)> {
    let at = text.rfind(['+', '-'])?;
    let (head, zone) = text.split_at(at);
    let sign = if zone.starts_with('-') { -1 } else { 1 };
    let mut secs = 0i32;
    for (i, part) in zone[1..].split(':').enumerate() {
        if i > 2 || part.len() != 2 {
            return None;
        }
        let n: i32 = part.parse().ok()?;
        secs += n * [3600, 60, 1][i];
    }
    Some((head, sign * secs))
}

/// Parses an ISO date: `2024-02-29`, `10000-01-01`, `0044-03-15 BC`, and
/// `infinity` / `-infinity` as the latest and earliest dates walgraph can
/// write. A year past the latest (Postgres goes to 5874897) is written as
/// the latest too: one type per column, never text.
fn parse_date(text: &str) -> Option<NaiveDate> {
    match text {
        "infinity" => return Some(NaiveDate::MAX),
        "-infinity" => return Some(NaiveDate::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (text, false),
    };
    let mut parts = body.splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.is_empty() || !y.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i64 = y.parse().ok()?;
    // 1 BC is the proleptic year 0, 2 BC is -1.
    let year = if bc { 1 - year } else { year };
    let (m, d): (u32, u32) = (m.parse().ok()?, d.parse().ok()?);
    if year > i64::from(NaiveDate::MAX.year()) {
        // A valid date only if month and day are (checked in a leap year).
        NaiveDate::from_ymd_opt(2000, m, d)?;
        return Some(NaiveDate::MAX);
    }
    NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, m, d)
}

/// Parses a time of day; Postgres' `24:00:00` is written as the last
/// instant a Neo4j time holds (`23:59:59.999999999`).
fn parse_time(text: &str) -> Option<NaiveTime> {
    if text == "24:00:00" {
        return NaiveTime::from_hms_nano_opt(23, 59, 59, 999_999_999);
    }
    NaiveTime::parse_from_str(text, "%H:%M:%S%.f").ok()
}

/// Parses an ISO timestamp (`2024-02-29 13:14:15.5`, with ` BC` or a year
/// past 9999 as [`parse_date`] reads them); `infinity` / `-infinity` are
/// the latest and earliest timestamps walgraph can write.
fn parse_timestamp(text: &str) -> Option<NaiveDateTime> {
    match text {
        "infinity" => return Some(NaiveDateTime::MAX),
        "-infinity" => return Some(NaiveDateTime::MIN),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let (date, time) = body.split_once(' ')?;
    let date = parse_date(&format!("{date}{bc}"))?;
    let time = NaiveTime::parse_from_str(time, "%H:%M:%S%.f").ok()?;
    if date == NaiveDate::MAX && !body.starts_with(&NaiveDate::MAX.year().to_string()) {
        return Some(NaiveDateTime::MAX);
    }
    Some(date.and_time(time))
}

fn parse_timetz(text: &str) -> Option<Value> {
    let (time, offset) = split_offset(text)?;
    Some(Value::TimeTz(parse_time(time)?, offset))
}

fn parse_timestamptz(text: &str) -> Option<DateTime<FixedOffset>> {
    match text {
        "infinity" => return Some(NaiveDateTime::MAX.and_utc().fixed_offset()),
        "-infinity" => return Some(NaiveDateTime::MIN.and_utc().fixed_offset()),
        _ => {}
    }
    let (body, bc) = match text.strip_suffix(" BC") {
        Some(b) => (b, " BC"),
        None => (text, ""),
    };
    let (ts, offset) = split_offset(body)?;
    let zone = FixedOffset::east_opt(offset)?;
    let naive = parse_timestamp(&format!("{ts}{bc}"))?;
    if naive == NaiveDateTime::MAX {
        return Some(NaiveDateTime::MAX.and_utc().fixed_offset());
    }
    naive.and_local_timezone(zone).single()
}

/// Parses the `iso_8601` interval style: `P1Y2M3DT4H5M6.5S`, with any part
/// possibly negative, or `PT0S`.
fn parse_interval(text: &str) -> Option<Interval> {
    let body = text.strip_prefix('P')?;
    let (date, time) = match body.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (body, None),
    };
    let mut iv = Interval {
        months: 0,
        days: 0,
        micros: 0,
    };
    let mut rest = date;
    while !rest.is_empty() {
        let end = rest.find(|c: char| c.is_ascii_alphabetic())?;
        let n: i64 = rest[..end].parse().ok()?;
        match rest.as_bytes()[end] {
            b'Y' => iv.months += n.checked_mul(12)?,
            b'M' => iv.months += n,
            b'W' => iv.days += n.checked_mul(7)?,
            b'D' => iv.days += n,
            _ => return None,
        }
        rest = &rest[end + 1..];
    }
    if let Some(mut rest) = time {
        while !rest.is_empty() {
            let end = rest.find(|c: char| c.is_ascii_alphabetic())?;
            let num = &rest[..end];
            let unit = rest.as_bytes()[end];
            let micros = match unit {
                b'H' => num.parse::<i64>().ok()?.checked_mul(3_600_000_000)?,
                b'M' => num.parse::<i64>().ok()?.checked_mul(60_000_000)?,
                b'S' => parse_seconds_micros(num)?,
                _ => return None,
            };
            iv.micros = iv.micros.checked_add(micros)?;
            rest = &rest[end + 1..];
        }
    }
    Some(iv)
}

fn parse_seconds_micros(num: &str) -> Option<i64> {
    let (neg, digits) = match num.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, num),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() || frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    let v = whole.checked_mul(1_000_000)?.checked_add(frac)?;
    Some(if neg { -v } else { v })
}

/// Parses a one-dimensional array literal (`{1,2,NULL,"a b"}`). Returns
/// `None` for anything else (multi-dimensional arrays, explicit bounds),
/// which the caller keeps as text.
fn parse_array(text: &str) -> Option<Vec<Option<String>>> {
    let inner = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut items = Vec::new();
    if inner.is_empty() {
        return Some(items);
    }
    let mut chars = inner.chars().peekable();
    loop {
        let mut item = String::new();
        let quoted = chars.peek() == Some(&'"');
        if quoted {
            chars.next();
            loop {
                match chars.next()? {
                    '\\' => item.push(chars.next()?),
                    '"' => break,
                    c => item.push(c),
                }
            }
            items.push(Some(item));
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                if c == '{' || c == '"' {
                    return None;
                }
                item.push(c);
                chars.next();
            }
            if item.is_empty() {
                return None;
            }
            items.push(if item == "NULL" { None } else { Some(item) });
        }
        match chars.next() {
            None => return Some(items),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_decode_by_type() {
        assert_eq!(decode_text(oid::INT4, "-42"), Value::Int(-42));
        assert_eq!(decode_text(oid::BOOL, "t"), Value::Bool(true));
        assert_eq!(decode_text(oid::FLOAT8, "1.5"), Value::Float(1.5));
        assert_eq!(
            decode_text(oid::NUMERIC, "12345678901234567890.000000000001"),
            Value::Numeric("12345678901234567890.000000000001".into())
        );
        assert_eq!(
            decode_text(oid::BYTEA, "\\x00ff"),
            Value::Bytes(vec![0, 255])
        );
        assert_eq!(decode_text(oid::TEXT, "hello"), Value::Text("hello".into()));
        assert_eq!(
            decode_text(99_999, "anything"),
            Value::Text("anything".into())
        );
        assert_eq!(decode_text(oid::INT4, "oops"), Value::Text("oops".into()));
        assert_eq!(decode_text(oid::BPCHAR, "ab   "), Value::Text("ab".into()));
    }

    #[test]
    fn temporal_values_decode_in_iso_style() {
        let Value::TimestampTz(ts) = decode_text(oid::TIMESTAMPTZ, "2024-02-29 13:14:15.123456+00")
        else {
            panic!("not a timestamptz")
        };
        assert_eq!(ts.to_rfc3339(), "2024-02-29T13:14:15.123456+00:00");
        assert!(matches!(
            decode_text(oid::TIMETZ, "10:00:00+05:30"),
            Value::TimeTz(_, 19800)
        ));
        assert_eq!(
            decode_text(oid::INTERVAL, "P1Y2M3DT4H5M6.5S"),
            Value::Interval(Interval {
                months: 14,
                days: 3,
                micros: 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000
            })
        );
        assert_eq!(
            decode_text(oid::INTERVAL, "P-1DT-0.25S"),
            Value::Interval(Interval {
                months: 0,
                days: -1,
                micros: -250_000
            })
        );
    }

    #[test]
    fn dates_keep_one_type_for_infinity_bc_and_far_years() {
        let date = |t| decode_text(oid::DATE, t);
        assert_eq!(date("infinity"), Value::Date(NaiveDate::MAX));
        assert_eq!(date("-infinity"), Value::Date(NaiveDate::MIN));
        assert_eq!(
            date("0044-03-15 BC"),
            Value::Date(NaiveDate::from_ymd_opt(-43, 3, 15).unwrap())
        );
        assert_eq!(
            date("12345-06-07"),
            Value::Date(NaiveDate::from_ymd_opt(12345, 6, 7).unwrap())
        );
        assert_eq!(date("5874897-12-31"), Value::Date(NaiveDate::MAX));
        assert!(matches!(date("2024-02-30"), Value::Text(_)));
        let ts = |t| decode_text(oid::TIMESTAMP, t);
        assert_eq!(ts("infinity"), Value::Timestamp(NaiveDateTime::MAX));
        assert_eq!(ts("-infinity"), Value::Timestamp(NaiveDateTime::MIN));
        assert_eq!(
            ts("0001-01-01 10:00:00.5 BC"),
            Value::Timestamp(
                NaiveDate::from_ymd_opt(0, 1, 1)
                    .unwrap()
                    .and_hms_milli_opt(10, 0, 0, 500)
                    .unwrap()
            )
        );
        assert_eq!(
            ts("294276-12-31 23:59:59"),
            Value::Timestamp(NaiveDateTime::MAX)
        );
        let tz = |t| decode_text(oid::TIMESTAMPTZ, t);
        assert_eq!(
            tz("infinity"),
            Value::TimestampTz(NaiveDateTime::MAX.and_utc().fixed_offset())
        );
        let Value::TimestampTz(bc) = tz("0044-03-15 12:00:00+00 BC") else {
            panic!("not a timestamptz")
        };
        assert_eq!(bc.year(), -43);
        assert!(matches!(decode_text(oid::TIME, "24:00:00"), Value::Time(_)));
        assert!(matches!(
            decode_text(oid::TIMETZ, "24:00:00+02"),
            Value::TimeTz(_, 7200)
        ));
    }

    #[test]
    fn arrays_decode_elementwise() {
        assert_eq!(
            decode_text(1007, "{1,NULL,3}"),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)])
        );
        assert_eq!(
            decode_text(1009, r#"{"a b","c\"d",NULL,"NULL"}"#),
            Value::Array(vec![
                Value::Text("a b".into()),
                Value::Text("c\"d".into()),
                Value::Null,
                Value::Text("NULL".into())
            ])
        );
        assert_eq!(decode_text(1007, "{}"), Value::Array(vec![]));
        assert_eq!(
            decode_text(1007, "{{1,2},{3,4}}"),
            Value::Text("{{1,2},{3,4}}".into())
        );
    }
}
