//! Time formats shared by the stages and the reference central: RFC 3339 UTC with
//! microseconds (the contract's `committed_at`), written and read without a date library on
//! the hot path, and the civil-date arithmetic under them.

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` without going through `format!` (it is on the hot path).
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) fn rfc3339(y: i64, mo: i64, d: i64, h: i64, mi: i64, s: i64, micros: i64) -> String {
    let mut out = [0u8; 27];
    let mut put = |at: usize, v: i64, width: usize| {
        let mut v = v;
        for k in (0..width).rev() {
            out[at + k] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, y, 4);
    put(5, mo, 2);
    put(8, d, 2);
    put(11, h, 2);
    put(14, mi, 2);
    put(17, s, 2);
    put(20, micros, 6);
    out[4] = b'-';
    out[7] = b'-';
    out[10] = b'T';
    out[13] = b':';
    out[16] = b':';
    out[19] = b'.';
    out[26] = b'Z';
    // Every byte written above is ASCII.
    std::str::from_utf8(&out)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
#[inline]
pub(crate) fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (the inverse).
#[inline]
pub(crate) fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats microseconds since the Unix epoch as RFC 3339 UTC with microseconds.
pub fn format_unix_micros(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    rfc3339(y, mo, d, s / 3600, s % 3600 / 60, s % 60, frac)
}

/// Parses RFC 3339 UTC text as written by [`format_unix_micros`] (`…T…[.ffffff]Z`) into
/// microseconds since the Unix epoch.
pub fn parse_rfc3339_utc_micros(text: &str) -> Option<i64> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, mo, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut h = hms.splitn(3, ':');
    let (hh, mm, ss): (i64, i64, i64) = (
        h.next()?.parse().ok()?,
        h.next()?.parse().ok()?,
        h.next()?.parse().ok()?,
    );
    let mut micros = 0i64;
    for (i, c) in frac.bytes().take(6).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        micros += i64::from(c - b'0') * 10i64.pow(5 - i as u32);
    }
    let days = days_from_civil(y, mo, day);
    Some(((days * 86_400 + hh * 3600 + mm * 60 + ss) * 1_000_000) + micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_through_micros() {
        for m in [0i64, 1_795_557_622_123_456, 951_782_400_000_001] {
            assert_eq!(parse_rfc3339_utc_micros(&format_unix_micros(m)), Some(m));
        }
        assert_eq!(parse_rfc3339_utc_micros("2026-11-24 21:00:00"), None);
    }
}
