//! Bearer API keys for the `/sync` routes.
//!
//! Keys come from `API_KEYS` as a comma-separated list, each either the key itself or
//! `sha256:<64 hex digits>` (its SHA-256 digest, so the configuration need not hold the key).
//! Every key is kept only as its digest, and a presented key is hashed and compared with each
//! digest in constant time, so neither the keys nor their lengths leak through timing.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::setting::ConfigError;

/// The accepted API keys, as SHA-256 digests.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests of secrets are not printed either.
        write!(f, "ApiKeys({} key(s))", self.digests.len())
    }
}

impl ApiKeys {
    /// Parses `API_KEYS`: comma-separated keys, each plain or `sha256:<hex>`; the error names
    /// the entry by position (never its text).
    pub fn parse(list: &str) -> Result<Self, ConfigError> {
        let mut digests = Vec::new();
        for (i, entry) in list.split(',').map(str::trim).enumerate() {
            let invalid = |reason: String| ConfigError::Invalid {
                key: "API_KEYS".into(),
                reason: format!("entry {}: {reason}", i + 1),
            };
            if entry.is_empty() {
                continue;
            }
            match entry.strip_prefix("sha256:") {
                Some(hex) => digests.push(parse_digest(hex).map_err(invalid)?),
                None if entry.len() < 16 => {
                    return Err(invalid(format!(
                        "a key must have at least 16 characters, this one has {}",
                        entry.chars().count()
                    )));
                }
                None => digests.push(Sha256::digest(entry.as_bytes()).into()),
            }
        }
        Ok(Self { digests })
    }

    /// Whether no key is configured (then every `/sync` request is refused).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `presented` is one of the keys (constant time in the keys' contents).
    pub fn accepts(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0u8);
        for d in &self.digests {
            found |= d.ct_eq(&digest);
        }
        found.into()
    }
}

/// Who presented `key`, as records name them: `key sha256:` and the first 12 hexadecimal
/// digits of its digest (what `sha256:` entries of `API_KEYS` begin with), never the key.
pub fn fingerprint(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("key sha256:{hex}")
}

fn parse_digest(hex: &str) -> Result<[u8; 32], String> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return Err(format!(
            "sha256: must be followed by 64 hexadecimal digits, found {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
            _ => {
                return Err(format!(
                    "sha256: digest has a non-hexadecimal character near position {}",
                    i * 2 + 1
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "demo-key-0123456789";

    fn sha256_hex(s: &str) -> String {
        Sha256::digest(s.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn plain_and_hashed_keys_are_accepted_and_others_are_not() {
        let other = "another-key-abcdefgh";
        let keys = ApiKeys::parse(&format!("{KEY}, sha256:{}", sha256_hex(other))).expect("valid");
        assert!(keys.accepts(KEY));
        assert!(keys.accepts(other));
        assert!(!keys.accepts("demo-key-012345678"));
        assert!(!keys.accepts(""));
        // The digest itself is not a key.
        assert!(!keys.accepts(&format!("sha256:{}", sha256_hex(other))));
        let upper = ApiKeys::parse(&format!("sha256:{}", sha256_hex(other).to_uppercase()))
            .expect("upper-case hex");
        assert!(upper.accepts(other));
    }

    #[test]
    fn bad_entries_are_named_by_position_without_their_text() {
        for (list, expected) in [
            ("short", "entry 1: a key must have at least 16 characters"),
            (
                "demo-key-0123456789,sha256:abc",
                "entry 2: sha256: must be followed by 64 hexadecimal digits, found 3",
            ),
            (
                &format!("sha256:{}zz", "0".repeat(62)) as &str,
                "entry 1: sha256: digest has a non-hexadecimal character near position 63",
            ),
        ] {
            let e = ApiKeys::parse(list).expect_err(list).to_string();
            assert!(e.contains(expected), "{e}");
            assert!(!e.contains("short") || list != "short", "{e}");
        }
        assert!(ApiKeys::parse(" , ").expect("empty").is_empty());
        assert_eq!(
            format!("{:?}", ApiKeys::parse(KEY).expect("key")),
            "ApiKeys(1 key(s))"
        );
    }
}
