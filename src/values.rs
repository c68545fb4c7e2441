//! Type-aware conversion of Postgres text-format values into event values (DESIGN §2).
//!
//! pgoutput sends every column in the type's text output form. The replication session is
//! started with `TimeZone=UTC`, `DateStyle=ISO` and `extra_float_digits=3`, so the forms
//! handled here are fixed and lossless. A value that does not parse as its type says it is
//! not what the type promises; it is then passed on as its text rather than dropped.

use base64::Engine;

use crate::event::{Text, Value};
use crate::time::{civil_from_days, days_from_civil, rfc3339};

/// Type OIDs the converter knows (from `pg_type.dat`).
#[allow(missing_docs)]
pub mod oid {
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
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIME: u32 = 1083;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Maps an array type OID to its element type OID, for the element types we convert.
pub fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1001 => oid::BYTEA,
        1002 => oid::CHAR,
        1003 => oid::NAME,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1009 => oid::TEXT,
        1014 => oid::BPCHAR,
        1015 => oid::VARCHAR,
        1016 => oid::INT8,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        1028 => oid::OID,
        1115 => oid::TIMESTAMP,
        1182 => oid::DATE,
        1183 => oid::TIME,
        1185 => oid::TIMESTAMPTZ,
        1231 => oid::NUMERIC,
        199 => oid::JSON,
        2951 => oid::UUID,
        3807 => oid::JSONB,
        _ => return None,
    })
}

/// Why a value could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The bytes are not UTF-8 (the database is not UTF8-encoded).
    #[error(
        "value is not valid UTF-8 (valid for the first {valid_up_to} bytes); the warehouse database must use UTF8 encoding"
    )]
    NotUtf8 {
        /// Valid prefix length.
        valid_up_to: usize,
    },
}

/// Converts one text-format value of type `type_oid`, as the server sent it.
pub fn convert_text(type_oid: u32, raw: &[u8]) -> Result<Value, ValueError> {
    let text = Text::from_utf8(raw).map_err(|e| ValueError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    Ok(convert_str(type_oid, text))
}

/// Converts a binary-format value: passed on as base64, since we never ask for binary.
pub fn convert_binary(raw: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(raw).into())
}

fn convert_str(type_oid: u32, text: Text) -> Value {
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::OID if is_integer(&text) => Value::Number(text),
        // NaN, Infinity, -Infinity have no JSON number form and stay strings.
        oid::FLOAT4 | oid::FLOAT8 if is_json_number(&text) => Value::Number(text),
        oid::BOOL if &*text == "t" => Value::Bool(true),
        oid::BOOL if &*text == "f" => Value::Bool(false),
        // jsonb's output form is one line of valid JSON already: embed it as it came.
        oid::JSONB if !text.is_empty() => Value::Json(text),
        oid::JSON | oid::JSONB => match minify_json(&text) {
            Some(j) => Value::Json(j.into()),
            None => Value::String(text),
        },
        oid::TIMESTAMPTZ => match parse_timestamptz(&text) {
            Some(t) => Value::String(t.into()),
            None => Value::String(text),
        },
        oid::TIMESTAMP => Value::String(text.replacen(' ', "T", 1).into()),
        oid::BYTEA => match decode_bytea_hex(&text) {
            Some(bytes) => Value::String(
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .into(),
            ),
            None => Value::String(text),
        },
        t => match array_element(t).and_then(|elem| parse_array(&text, elem)) {
            Some(v) => v,
            // numeric, text, varchar, char, uuid, date, time, enums and everything else.
            None => Value::String(text),
        },
    }
}

fn is_integer(s: &str) -> bool {
    is_integer_bytes(s.as_bytes())
}

fn is_integer_bytes(b: &[u8]) -> bool {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    !digits.is_empty() && digits.iter().all(u8::is_ascii_digit)
}

/// Whether `s` is a number in JSON's grammar.
fn is_json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_len = i - int_start;
    if int_len == 0 || (int_len > 1 && b[int_start] == b'0') {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        let f = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == f {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let e = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == e {
            return false;
        }
    }
    i == b.len()
}

/// Removes insignificant white space from JSON text (the `json` type keeps the input's
/// layout, newlines included), so that an event stays on one line. `None` if unbalanced.
pub fn minify_json(text: &str) -> Option<String> {
    // Only ASCII white space is removed, so the output stays valid UTF-8; working on bytes
    // and copying whole runs keeps this off the profile.
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut in_string = false;
    let mut run_start = 0;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else if c == b'"' {
            in_string = true;
        } else if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            out.extend_from_slice(&b[run_start..i]);
            run_start = i + 1;
        }
        i += 1;
    }
    if in_string {
        return None;
    }
    out.extend_from_slice(&b[run_start.min(b.len())..]);
    if out.is_empty() {
        return None;
    }
    String::from_utf8(out).ok()
}

/// `2026-11-24 21:00:00.1234+00` → `2026-11-24T21:00:00.123400Z`. Other offsets are
/// normalised to UTC; forms we do not recognise (`infinity`, BC dates, years past 9999)
/// are returned as they are.
pub fn timestamptz_to_rfc3339(text: &str) -> String {
    parse_timestamptz(text).unwrap_or_else(|| text.to_owned())
}

/// The common case in a `TimeZone=UTC` session, `YYYY-MM-DD HH:MM:SS[.f{1,6}]+00`, rewritten
/// byte by byte; anything else takes the general path.
fn utc_timestamptz_fast(b: &[u8]) -> Option<String> {
    let n = b.len();
    if !(22..=29).contains(&n) || &b[n - 3..] != b"+00" {
        return None;
    }
    let digits_at = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    if b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !digits_at.iter().all(|&i| b[i].is_ascii_digit()) {
        return None;
    }
    let frac = &b[19..n - 3];
    let frac_digits = match frac {
        [] => &[][..],
        [b'.', rest @ ..]
            if !rest.is_empty() && rest.len() <= 6 && rest.iter().all(u8::is_ascii_digit) =>
        {
            rest
        }
        _ => return None,
    };
    let mut out = [b'0'; 27];
    out[..19].copy_from_slice(&b[..19]);
    out[10] = b'T';
    out[19] = b'.';
    out[20..20 + frac_digits.len()].copy_from_slice(frac_digits);
    out[26] = b'Z';
    std::str::from_utf8(&out).ok().map(str::to_owned)
}

fn parse_timestamptz(text: &str) -> Option<String> {
    if let Some(fast) = utc_timestamptz_fast(text.as_bytes()) {
        return Some(fast);
    }
    let b = text.as_bytes();
    if b.len() < 22 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = text.get(r)?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &text[start..i];
        if frac.is_empty() || frac.len() > 6 {
            return None;
        }
        micros = frac.parse::<i64>().ok()? * 10i64.pow(6 - frac.len() as u32);
    }
    // Offset: +HH, +HH:MM or +HH:MM:SS.
    let sign = match b.get(i)? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let off = &text[i + 1..];
    let mut parts = off.split(':');
    let oh: i64 = parts.next()?.parse().ok()?;
    let om: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    let os: i64 = parts.next().map_or(Some(0), |p| p.parse().ok())?;
    if parts.next().is_some() {
        return None;
    }
    let offset_secs = sign * (oh * 3600 + om * 60 + os);
    let (mut y, mut mo, mut d, mut h, mut mi, mut s) = (year, month, day, hour, minute, second);
    if offset_secs != 0 {
        let days = days_from_civil(year, month, day);
        let total = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
        let (dd, secs) = (total.div_euclid(86_400), total.rem_euclid(86_400));
        (y, mo, d) = civil_from_days(dd);
        (h, mi, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
        if !(1..=9999).contains(&y) {
            return None;
        }
    }
    Some(rfc3339(y, mo, d, h, mi, s, micros))
}

/// Decodes bytea's hex output form `\x0a0b…`.
fn decode_bytea_hex(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    hex.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Parses Postgres array text (`{1,2,NULL}`, `{{"a b",c},{d,e}}`, `[0:1]={x,y}`) with
/// elements of type `elem`.
pub fn parse_array(text: &str, elem: u32) -> Option<Value> {
    let body = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = body.char_indices().peekable();
    let v = parse_array_level(body, &mut chars, elem)?;
    chars.next().is_none().then_some(v)
}

fn parse_array_level(
    src: &str,
    it: &mut std::iter::Peekable<std::str::CharIndices<'_>>,
    elem: u32,
) -> Option<Value> {
    if it.next()?.1 != '{' {
        return None;
    }
    let mut items = Vec::new();
    if it.peek()?.1 == '}' {
        it.next();
        return Some(Value::Array(items));
    }
    loop {
        match it.peek()?.1 {
            '{' => items.push(parse_array_level(src, it, elem)?),
            '"' => {
                it.next();
                let mut s = String::new();
                loop {
                    let (_, c) = it.next()?;
                    match c {
                        '\\' => s.push(it.next()?.1),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(convert_str(elem, s.into()));
            }
            _ => {
                let (start, _) = *it.peek()?;
                let mut end = start;
                while let Some(&(i, c)) = it.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    end = i + c.len_utf8();
                    it.next();
                }
                let raw = src[start..end].trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    items.push(Value::Null);
                } else {
                    items.push(convert_str(elem, raw.into()));
                }
            }
        }
        match it.next()?.1 {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }
    fn n(v: &str) -> Value {
        Value::Number(v.into())
    }
    fn convert_str(type_oid: u32, text: &str) -> Value {
        convert_text(type_oid, text.as_bytes()).unwrap()
    }

    #[test]
    fn numbers_and_their_special_values() {
        assert_eq!(convert_str(oid::INT4, "-42"), n("-42"));
        assert_eq!(
            convert_str(oid::INT8, "9223372036854775807"),
            n("9223372036854775807")
        );
        assert_eq!(convert_str(oid::FLOAT8, "1.5e+20"), n("1.5e+20"));
        assert_eq!(convert_str(oid::FLOAT8, "NaN"), s("NaN"));
        assert_eq!(convert_str(oid::FLOAT4, "-Infinity"), s("-Infinity"));
        assert_eq!(convert_str(oid::NUMERIC, "12.3400"), s("12.3400"));
        assert_eq!(convert_str(oid::BOOL, "t"), Value::Bool(true));
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        assert_eq!(
            timestamptz_to_rfc3339("2026-11-24 21:00:00.1234+00"),
            "2026-11-24T21:00:00.123400Z"
        );
        assert_eq!(
            timestamptz_to_rfc3339("2026-01-01 00:30:00+01"),
            "2025-12-31T23:30:00.000000Z"
        );
        assert_eq!(
            timestamptz_to_rfc3339("2000-02-29 12:00:00-05:30"),
            "2000-02-29T17:30:00.000000Z"
        );
        assert_eq!(timestamptz_to_rfc3339("infinity"), "infinity");
        assert_eq!(
            timestamptz_to_rfc3339("2026-11-24 21:00:00+00"),
            "2026-11-24T21:00:00.000000Z"
        );
        assert_eq!(
            timestamptz_to_rfc3339("2026-11-24 21:00:00.123456+00"),
            "2026-11-24T21:00:00.123456Z"
        );
        assert_eq!(
            timestamptz_to_rfc3339("2026-11-24 21:00:00.5+00"),
            "2026-11-24T21:00:00.500000Z"
        );
        assert_eq!(
            timestamptz_to_rfc3339("12026-11-24 21:00:00+00"),
            "12026-11-24 21:00:00+00"
        );
        assert_eq!(
            convert_str(oid::TIMESTAMP, "2026-11-24 21:00:00"),
            s("2026-11-24T21:00:00")
        );
        assert_eq!(
            crate::time::format_unix_micros(1_795_557_622_123_456),
            "2026-11-24T22:00:22.123456Z"
        );
    }

    #[test]
    fn bytea_becomes_base64() {
        assert_eq!(convert_str(oid::BYTEA, "\\x00ff10"), s("AP8Q"));
    }

    #[test]
    fn json_is_embedded_on_one_line() {
        assert_eq!(
            convert_str(oid::JSON, "{\"a\" :\n [1, \"x y\"]}"),
            Value::Json("{\"a\":[1,\"x y\"]}".into())
        );
    }

    #[test]
    fn arrays_of_every_kind() {
        assert_eq!(
            convert_str(1007, "{1,NULL,-3}"),
            Value::Array(vec![n("1"), Value::Null, n("-3")])
        );
        assert_eq!(
            convert_str(1009, r#"{"a b","c\"d",e,"NULL"}"#),
            Value::Array(vec![s("a b"), s("c\"d"), s("e"), s("NULL")])
        );
        assert_eq!(
            convert_str(1007, "{{1,2},{3,4}}"),
            Value::Array(vec![
                Value::Array(vec![n("1"), n("2")]),
                Value::Array(vec![n("3"), n("4")])
            ])
        );
        assert_eq!(
            convert_str(1007, "[0:1]={7,8}"),
            Value::Array(vec![n("7"), n("8")])
        );
        assert_eq!(
            convert_str(1022, "{NaN,1.5}"),
            Value::Array(vec![s("NaN"), n("1.5")])
        );
        assert_eq!(convert_str(1000, "{}"), Value::Array(vec![]));
        assert_eq!(
            convert_str(3807, r#"{"{\"a\": 1}"}"#),
            Value::Array(vec![Value::Json("{\"a\": 1}".into())])
        );
    }

    #[test]
    fn non_utf8_is_a_clear_error() {
        let e = convert_text(oid::TEXT, b"ok\xff").unwrap_err();
        assert_eq!(e, ValueError::NotUtf8 { valid_up_to: 2 });
    }

    #[test]
    fn json_number_grammar() {
        for ok in ["0", "-1", "1.5", "1e5", "1E-5", "-0.0"] {
            assert!(is_json_number(ok), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "Infinity", "1e+"] {
            assert!(!is_json_number(bad), "{bad}");
        }
    }
}
