//! Log sequence numbers, written as PostgreSQL writes them: `16/B374D848`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not an LSN; expected the form 16/B374D848");
        let (hi, lo) = s.trim().split_once('/').ok_or_else(bad)?;
        let ok =
            |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok(hi) || !ok(lo) {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(hi << 32 | lo))
    }
}

impl Serialize for Lsn {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Lsn {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_postgres() {
        for (text, value) in [
            ("0/0", 0u64),
            ("16/B374D848", 0x16_B374_D848),
            ("0/1000028", 0x100_0028),
            ("FFFFFFFF/FFFFFFFF", u64::MAX),
        ] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.0, value);
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("16/b374d848".parse::<Lsn>().unwrap().0, 0x16_B374_D848);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "/",
            "16",
            "16/",
            "/1",
            "x/1",
            "1/2/3",
            "123456789/0",
            "-1/0",
        ] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }
}
