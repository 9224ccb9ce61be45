//! SQL text walgraph writes: quoted identifiers and literals, and the
//! output formats the decoder reads values in.
//!
//! Invariant: names are always quoted and values always escaped here (or
//! sent as parameters); no other module builds SQL from raw names.

/// Output formats the decoder reads values in (as the replication
/// connection sets them), for the current transaction.
pub const TEXT_FORMATS: &str = "SET LOCAL DateStyle = ISO; SET LOCAL TimeZone = 'UTC'; \
     SET LOCAL IntervalStyle = iso_8601; SET LOCAL extra_float_digits = 3; SET LOCAL bytea_output = hex;";

/// Double-quotes an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Single-quotes a string literal (standard_conforming_strings on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quotes `schema.table` part by part.
pub fn quote_qualified(t: &str) -> String {
    match t.split_once('.') {
        Some((s, n)) => format!("{}.{}", quote_ident(s), quote_ident(n)),
        None => quote_ident(t),
    }
}
