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

#[cfg(test)]
mod tests {
    use super::from_bytes;

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
