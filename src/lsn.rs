//! The log sequence number type.
//!
//! Every position in the pipeline (slot points, commit ends, flush positions) is an `Lsn`,
//! never a bare integer or string, so that a commit LSN cannot be mixed up with a row count
//! and the `X/X` text form Postgres uses is parsed and printed in one place.

use std::fmt;
use std::str::FromStr;

/// A Postgres write-ahead-log position (`pg_lsn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The invalid / "no position" LSN `0/0`.
    pub const ZERO: Lsn = Lsn(0);

    /// The raw 64-bit value.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Every change is versioned with one: rendered without the formatting machinery.
        let mut buf = [0u8; 17];
        let mut n = push_upper_hex(&mut buf, 0, self.0 >> 32, 1);
        buf[n] = b'/';
        n = push_upper_hex(&mut buf, n + 1, self.0 & 0xFFFF_FFFF, 1);
        // Only ASCII hex digits and '/' were written.
        f.write_str(std::str::from_utf8(&buf[..n]).map_err(|_| fmt::Error)?)
    }
}

/// Writes `v` in upper-case hexadecimal into `buf` at `at`, zero-padded to at least `width`
/// digits; returns the position after the last digit. `buf` must have room (16 digits at most).
pub(crate) fn push_upper_hex(buf: &mut [u8], at: usize, v: u64, width: usize) -> usize {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let digits = (16 - v.leading_zeros() as usize / 4).max(width).max(1);
    for i in 0..digits {
        buf[at + digits - 1 - i] = DIGITS[((v >> (4 * i)) & 0xF) as usize];
    }
    at + digits
}

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {input:?}: expected two hexadecimal halves like 0/16B3748")]
pub struct ParseLsnError {
    /// The text that was rejected.
    pub input: String,
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError {
            input: s.to_string(),
        };
        let (hi, lo) = s.trim().split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(0xA_0000_0000).to_string(), "A/0");
    }

    #[test]
    fn rejects_malformed_text_naming_the_input() {
        for bad in ["", "0", "/1", "1/", "G/0", "123456789/0", "0/0/0"] {
            let e = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(e.input, bad);
        }
    }

    #[test]
    fn orders_numerically() {
        assert!(Lsn(1) < Lsn(0x1_0000_0000));
    }
}
