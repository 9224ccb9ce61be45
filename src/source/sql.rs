//! SQL text walgraph writes: quoted identifiers and literals, and the
//! output formats the decoder reads values in.
//!
//! Invariant: names are always quoted and values always escaped here (or
//! sent as parameters); no other module builds SQL from raw names.

/// The settings that pin the text form of values to what the decoder reads
/// (ISO dates, UTC, ISO 8601 intervals, exact floats, hex bytea). Every
/// connection walgraph opens sets them at startup — the replication
/// connection as startup parameters, SQL connections in `options` — so the
/// server's, database's or role's own defaults never reach the decoder.
pub const OUTPUT_STYLES: [(&str, &str); 5] = [
    ("DateStyle", "ISO"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

/// [`OUTPUT_STYLES`] as a startup `options` value: `-c name=value …`.
pub fn output_style_options() -> String {
    OUTPUT_STYLES
        .iter()
        .map(|(k, v)| format!("-c {k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

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
