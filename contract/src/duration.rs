//! The duration grammar the CLI, the daemon and the CRDs all accept: one
//! or more `<number><unit>` terms with units in the order `w`, `d`, `h`,
//! `m`, `s`, each at most once, numbers from 1 without leading zeros —
//! `7d`, `36h`, `1d12h`, `90m`, `2w`. The CRD's pattern is [`PATTERN`], so
//! what the API server admits is exactly what walden parses.

use chrono::Duration;

/// [`parse`]'s grammar as a regular expression (RE2 and ECMA alike; an
/// empty string matches it, so the schema also sets a minimum length of 1).
pub const PATTERN: &str =
    r"^([1-9][0-9]*w)?([1-9][0-9]*d)?([1-9][0-9]*h)?([1-9][0-9]*m)?([1-9][0-9]*s)?$";

const UNITS: [(char, i64); 5] = [
    ('w', 7 * 86_400),
    ('d', 86_400),
    ('h', 3_600),
    ('m', 60),
    ('s', 1),
];

/// Parses a duration such as `7d`, `36h`, `1d12h`, `90m`, `45s`, `2w`.
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration; expected terms like 7d, 36h, 1d12h, 90m, 45s, 2w \
             (units in the order w, d, h, m, s, each once)"
        )
    };
    let mut rest = s;
    let mut next_unit = 0;
    let mut seconds: i64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || rest.starts_with('0') {
            return Err(bad());
        }
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = rest[digits..].chars().next().ok_or_else(bad)?;
        let at = UNITS[next_unit..]
            .iter()
            .position(|(u, _)| *u == unit)
            .ok_or_else(bad)?;
        let (_, size) = UNITS[next_unit + at];
        next_unit += at + 1;
        seconds = n
            .checked_mul(size)
            .and_then(|t| seconds.checked_add(t))
            .ok_or_else(bad)?;
        rest = &rest[digits + unit.len_utf8()..];
    }
    if seconds == 0 {
        return Err(bad());
    }
    Duration::try_seconds(seconds).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_table() {
        for (s, secs) in [
            ("7d", 7 * 86_400),
            ("36h", 36 * 3_600),
            ("1d12h", 36 * 3_600),
            ("90m", 5_400),
            ("45s", 45),
            ("2w", 14 * 86_400),
            (
                "1w2d3h4m5s",
                7 * 86_400 + 2 * 86_400 + 3 * 3_600 + 4 * 60 + 5,
            ),
        ] {
            assert_eq!(parse(s).map(|d| d.num_seconds()), Ok(secs), "{s}");
        }
        for bad in [
            "",
            "7",
            "d",
            "7x",
            "0d",
            "-1d",
            "1.5d",
            "1d1d",
            "12h1d",
            "07d",
            " 7d",
            "7d ",
            "7D",
            "9999999999999999999d",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
