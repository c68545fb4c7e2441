//! Reading JSON from bytes received over the wire (Kafka records, HTTP bodies) as fast as
//! serde_json allows: the records are full of short strings, and serde_json checks each
//! string of a byte slice as UTF-8 on its own, which cost more than a fifth of parsing a
//! change event. Checking the whole input once and parsing it as text avoids that.

use serde::Deserialize;

/// Parses `bytes` as JSON into `T`, borrowing strings from it where `T` does. Input that is
/// not UTF-8 is parsed as bytes, so the error names the line and column of the bad byte.
pub fn from_bytes<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// What kind of JSON value `v` is, in words (for errors that say what was expected).
pub fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Where in `v` a string (a value or a member name) holds a NUL character, which PostgreSQL
/// text cannot hold: a JSON pointer such as `/warehouses/0`, or `/` for the whole value.
pub fn nul_at(v: &serde_json::Value) -> Option<String> {
    fn walk(v: &serde_json::Value, at: &mut String) -> bool {
        match v {
            serde_json::Value::String(s) => s.contains('\0'),
            serde_json::Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = at.len();
                at.push_str(&format!("/{i}"));
                let found = walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            serde_json::Value::Object(members) => members.iter().any(|(name, item)| {
                let len = at.len();
                at.push('/');
                // The pointer is shown in errors: its NUL as the escape, not the character.
                at.push_str(
                    &name
                        .replace('~', "~0")
                        .replace('/', "~1")
                        .replace('\0', "\\u0000"),
                );
                let found = name.contains('\0') || walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut at = String::new();
    walk(v, &mut at).then(|| if at.is_empty() { "/".into() } else { at })
}

#[cfg(test)]
mod tests {
    use super::{from_bytes, kind_of, nul_at};

    #[test]
    fn a_nul_character_is_found_where_it_is_and_kinds_are_named() {
        let v = serde_json::json!({"a": ["x", "y\u{0}"], "b": 1});
        assert_eq!(nul_at(&v).as_deref(), Some("/a/1"));
        assert_eq!(
            nul_at(&serde_json::json!({"n\u{0}": 1})).as_deref(),
            Some("/n\\u0000")
        );
        assert_eq!(nul_at(&serde_json::json!("\u{0}")).as_deref(), Some("/"));
        assert_eq!(nul_at(&serde_json::json!({"a": ["x"], "b": null})), None);
        assert_eq!(kind_of(&serde_json::json!([null])), "an array");
    }

    #[test]
    fn text_and_bytes_parse_alike_and_bad_utf8_is_located() {
        let v: serde_json::Value = from_bytes(br#"{"a":"b\u00e9","c":[1,2]}"#).expect("parses");
        assert_eq!(v["a"], "bé");
        let borrowed: std::collections::HashMap<&str, &str> =
            from_bytes(br#"{"sku":"SKU-1"}"#).expect("borrows");
        assert_eq!(borrowed["sku"], "SKU-1");
        let err = from_bytes::<serde_json::Value>(b"{\"a\":\n\"x\xffy\"}").expect_err("not UTF-8");
        assert_eq!(err.line(), 2, "{err}");
        assert!(err.to_string().contains("invalid unicode"), "{err}");
    }
}
