//! The long page header at the start of every WAL segment.
//!
//! Layout (PostgreSQL's `XLogLongPageHeaderData`, little-endian on every
//! platform Walden runs on):
//! ```text
//! 0  u16 xlp_magic      4  u32 xlp_tli     8  u64 xlp_pageaddr   16 u32 xlp_rem_len
//! 2  u16 xlp_info      24  u64 xlp_sysid  32  u32 xlp_seg_size   36 u32 xlp_xlog_blcksz
//! ```

/// Bytes needed to parse the long header.
pub const LONG_HEADER_LEN: usize = 40;
const XLP_LONG_HEADER: u16 = 0x0002;

/// WAL page magic numbers by PostgreSQL major version.
const MAGICS: &[(u16, u32)] = &[
    (0xD101, 12),
    (0xD106, 13),
    (0xD10D, 14),
    (0xD110, 15),
    (0xD113, 16),
    (0xD116, 17),
    (0xD118, 18),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub timeline: u32,
    pub page_addr: u64,
    pub system_identifier: u64,
    pub segment_size: u32,
    pub block_size: u32,
}

impl PageHeader {
    /// Parses and sanity-checks the long header from a segment's first bytes.
    pub fn parse(buf: &[u8]) -> Result<Self, String> {
        if buf.len() < LONG_HEADER_LEN {
            return Err(format!(
                "it is {} bytes long, shorter than a WAL page header",
                buf.len()
            ));
        }
        let u16_at = |o: usize| u16::from_le_bytes([buf[o], buf[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().unwrap_or([0; 8]));
        let h = Self {
            magic: u16_at(0),
            info: u16_at(2),
            timeline: u32_at(4),
            page_addr: u64_at(8),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        match h.pg_version() {
            None => {
                return Err(format!(
                    "its page magic 0x{:04X} is not that of a PostgreSQL 12-18 WAL segment",
                    h.magic
                ))
            }
            Some(major) => crate::pg::check_supported(major * 10000).map_err(|e| {
                format!(
                    "it is PostgreSQL {major} WAL (page magic 0x{:04X}): {e}",
                    h.magic
                )
            })?,
        }
        if h.info & XLP_LONG_HEADER == 0 {
            return Err("its first page has no long header (not the start of a segment)".into());
        }
        let seg_ok =
            h.segment_size.is_power_of_two() && (1 << 20..=1 << 30).contains(&h.segment_size);
        let blk_ok = h.block_size.is_power_of_two() && (1 << 10..=1 << 15).contains(&h.block_size);
        if !seg_ok || !blk_ok {
            return Err(format!(
                "its header has an impossible segment size {} or block size {}",
                h.segment_size, h.block_size
            ));
        }
        Ok(h)
    }

    pub fn pg_version(&self) -> Option<u32> {
        MAGICS
            .iter()
            .find(|(m, _)| *m == self.magic)
            .map(|(_, v)| *v)
    }
}

#[cfg(test)]
pub(crate) fn sample_header(sysid: u64, page_addr: u64) -> Vec<u8> {
    let mut b = vec![0u8; 8192];
    b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    b[2..4].copy_from_slice(&(XLP_LONG_HEADER | 0x0004).to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes());
    b[8..16].copy_from_slice(&page_addr.to_le_bytes());
    b[24..32].copy_from_slice(&sysid.to_le_bytes());
    b[32..36].copy_from_slice(&(16u32 << 20).to_le_bytes());
    b[36..40].copy_from_slice(&8192u32.to_le_bytes());
    b
}

/// A whole segment of `segment_size` bytes whose long header names `timeline`,
/// `page_addr` and the database `sysid`; `tag` is written after the header.
#[cfg(test)]
pub(crate) fn sample_segment(
    sysid: u64,
    timeline: u32,
    page_addr: u64,
    segment_size: u32,
    tag: &[u8],
) -> Vec<u8> {
    let mut b = sample_header(sysid, page_addr);
    b[4..8].copy_from_slice(&timeline.to_le_bytes());
    b[32..36].copy_from_slice(&segment_size.to_le_bytes());
    b.resize(segment_size as usize, 0);
    b[64..64 + tag.len()].copy_from_slice(tag);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_postgres_15_header() {
        let h = PageHeader::parse(&sample_header(7_300_000_000_000_000_001, 0x0100_0000)).unwrap();
        assert_eq!(h.system_identifier, 7_300_000_000_000_000_001);
        assert_eq!(h.page_addr, 0x0100_0000);
        assert_eq!(h.segment_size, 16 << 20);
        assert_eq!(h.pg_version(), Some(15));
    }

    #[test]
    fn wal_of_every_supported_version_parses_and_older_wal_is_refused_by_name() {
        for (magic, expected) in [
            (0xD101u16, Err("PostgreSQL 12 WAL")),
            (0xD106, Err("PostgreSQL 13 WAL")),
            (0xD10D, Ok(14)),
            (0xD110, Ok(15)),
            (0xD113, Ok(16)),
            (0xD116, Ok(17)),
            (0xD118, Ok(18)),
        ] {
            let mut buf = sample_header(1, 0);
            buf[0..2].copy_from_slice(&magic.to_le_bytes());
            match (PageHeader::parse(&buf), expected) {
                (Ok(h), Ok(v)) => assert_eq!(h.pg_version(), Some(v)),
                (Err(e), Err(needle)) => {
                    assert!(
                        e.contains(needle) && e.contains("supports PostgreSQL 14 to 18"),
                        "{e}"
                    )
                }
                (got, want) => panic!("magic 0x{magic:04X}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn rejects_non_segments() {
        let good = sample_header(1, 0);
        let mut short_header = good.clone();
        short_header[2] = 0x05; // long-header bit cleared
        let mut bad_magic = good.clone();
        bad_magic[0] = 0x00;
        let mut bad_size = good.clone();
        bad_size[32..36].copy_from_slice(&12345u32.to_le_bytes());
        for (buf, needle) in [
            (&good[..20], "shorter"),
            (&short_header[..], "no long header"),
            (&bad_magic[..], "page magic"),
            (&bad_size[..], "segment size"),
            (
                &b"this is a text file, not WAL at all, really"[..],
                "page magic",
            ),
        ] {
            let err = PageHeader::parse(buf).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
