//! WAL file names as PostgreSQL writes them, and where each is stored.
//!
//! ```text
//! 000000010000000A000000FF           segment (timeline, log id, segment in log)
//! 000000010000000A000000FF.partial   last, incomplete segment of a timeline after promotion
//! 00000002.history                   timeline history file
//! 000000010000000A000000FF.00000028.backup   backup history file
//! ```
//! Stored as `wal/<TTTTTTTTLLLLLLLL>/<name>.zst` (one folder per timeline and
//! log id, at most 256 segments of 16 MiB each) and `wal/<TTTTTTTT>.history.zst`.

use std::fmt;

/// A segment's position: timeline, log id and segment number within the log id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentName {
    pub timeline: u32,
    pub log: u32,
    pub seg: u32,
}

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b)))
    .then(|| u32::from_str_radix(s, 16).ok())
    .flatten()
}

impl SegmentName {
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 24 {
            return None;
        }
        Some(Self {
            timeline: hex8(&s[0..8])?,
            log: hex8(&s[8..16])?,
            seg: hex8(&s[16..24])?,
        })
    }

    /// Segments per log id for a segment size (256 for 16 MiB).
    pub fn segments_per_log(segment_size: u32) -> u64 {
        0x1_0000_0000 / u64::from(segment_size.max(1))
    }

    /// The segment number counted from LSN 0.
    pub fn segno(&self, segment_size: u32) -> u64 {
        u64::from(self.log) * Self::segments_per_log(segment_size) + u64::from(self.seg)
    }

    /// The LSN of the segment's first byte.
    pub fn start_lsn(&self, segment_size: u32) -> u64 {
        self.segno(segment_size) * u64::from(segment_size)
    }

    /// The next segment on the same timeline.
    pub fn next(&self, segment_size: u32) -> Self {
        let per_log = Self::segments_per_log(segment_size);
        let n = self.segno(segment_size) + 1;
        Self {
            timeline: self.timeline,
            log: (n / per_log) as u32,
            seg: (n % per_log) as u32,
        }
    }

    /// The segment holding the byte just before `lsn`, as `pg_walfile_name` names it:
    /// for an end position, the last segment that must be read.
    pub fn holding_end(timeline: u32, lsn: u64, segment_size: u32) -> Self {
        let per_log = Self::segments_per_log(segment_size);
        let segno = lsn.saturating_sub(1) / u64::from(segment_size.max(1));
        Self {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// The folder of this segment: `<TTTTTTTTLLLLLLLL>`.
    pub fn folder(&self) -> String {
        format!("{:08X}{:08X}", self.timeline, self.log)
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline, self.log, self.seg)
    }
}

/// Any file PostgreSQL hands to `archive_command` or asks of `restore_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WalFile {
    Segment(SegmentName),
    Partial(SegmentName),
    History(u32),
    BackupHistory { segment: SegmentName, offset: u32 },
}

impl WalFile {
    /// Parses a file name (not a path). `None` if PostgreSQL would never use it.
    pub fn parse(name: &str) -> Option<Self> {
        if let Some(seg) = SegmentName::parse(name) {
            return Some(Self::Segment(seg));
        }
        if let Some(base) = name.strip_suffix(".partial") {
            return SegmentName::parse(base).map(Self::Partial);
        }
        if let Some(tli) = name.strip_suffix(".history") {
            return hex8(tli).map(Self::History);
        }
        if let Some(rest) = name.strip_suffix(".backup") {
            let (seg, off) = rest.split_once('.')?;
            return Some(Self::BackupHistory {
                segment: SegmentName::parse(seg)?,
                offset: hex8(off)?,
            });
        }
        None
    }

    /// Parses a stored key (`wal/.../<name>.zst`) back into the file it holds.
    pub fn from_object_key(key: &str) -> Option<Self> {
        let name = key
            .strip_prefix("wal/")?
            .rsplit('/')
            .next()?
            .strip_suffix(".zst")?;
        let file = Self::parse(name)?;
        (file.object_key() == key).then_some(file)
    }

    pub fn file_name(&self) -> String {
        match self {
            Self::Segment(s) => s.to_string(),
            Self::Partial(s) => format!("{s}.partial"),
            Self::History(tli) => format!("{tli:08X}.history"),
            Self::BackupHistory { segment, offset } => format!("{segment}.{offset:08X}.backup"),
        }
    }

    pub fn object_key(&self) -> String {
        match self {
            Self::Segment(s) | Self::Partial(s) | Self::BackupHistory { segment: s, .. } => {
                format!("wal/{}/{}.zst", s.folder(), self.file_name())
            }
            Self::History(_) => format!("wal/{}.zst", self.file_name()),
        }
    }

    /// Segments and partial segments start with a long page header naming their database.
    pub fn has_page_header(&self) -> bool {
        matches!(self, Self::Segment(_) | Self::Partial(_))
    }

    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            Self::Segment(s) | Self::Partial(s) | Self::BackupHistory { segment: s, .. } => {
                Some(*s)
            }
            Self::History(_) => None,
        }
    }
}

impl fmt::Display for WalFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIXTEEN_MIB: u32 = 16 << 20;

    #[test]
    fn names_map_to_keys_and_back() {
        let cases = [
            (
                "000000010000000A000000FF",
                "wal/000000010000000A/000000010000000A000000FF.zst",
            ),
            (
                "000000020000000000000003.partial",
                "wal/0000000200000000/000000020000000000000003.partial.zst",
            ),
            ("00000002.history", "wal/00000002.history.zst"),
            (
                "000000010000000000000002.00000028.backup",
                "wal/0000000100000000/000000010000000000000002.00000028.backup.zst",
            ),
        ];
        for (name, key) in cases {
            let f = WalFile::parse(name).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.file_name(), name);
            assert_eq!(f.object_key(), key);
            assert_eq!(WalFile::from_object_key(key), Some(f));
        }
    }

    #[test]
    fn rejects_what_postgres_never_uses() {
        for name in [
            "",
            "RECOVERYXLOG",
            "000000010000000a000000ff",
            "00000001000000000000000",
            "0000000100000000000000001",
            "00000001.history.zst",
            "0000001.history",
            "000000010000000000000002.28.backup",
            "../00000001.history",
            "000000010000000000000002.partial.partial",
        ] {
            assert_eq!(WalFile::parse(name), None, "{name:?}");
        }
        assert_eq!(
            WalFile::from_object_key("wal/0000000100000001/000000010000000000000002.zst"),
            None
        );
        assert_eq!(
            WalFile::from_object_key("backups/x/part-00001.tar.zst"),
            None
        );
    }

    #[test]
    fn segment_arithmetic() {
        let s = SegmentName::parse("0000000100000000000000FF").unwrap();
        let n = s.next(SIXTEEN_MIB);
        assert_eq!(n.to_string(), "000000010000000100000000");
        assert_eq!(n.start_lsn(SIXTEEN_MIB), 0x1_0000_0000);
        assert_eq!(s.start_lsn(SIXTEEN_MIB), 0xFF00_0000);
        // 64 MiB segments: 64 per log id
        let big = SegmentName::parse("00000001000000020000003F").unwrap();
        assert_eq!(big.next(64 << 20).to_string(), "000000010000000300000000");
        assert_eq!(big.start_lsn(64 << 20), 0x2_FC00_0000);
        assert_eq!(
            SegmentName::holding_end(1, 0x200_0000, SIXTEEN_MIB).to_string(),
            "000000010000000000000001"
        );
        assert_eq!(
            SegmentName::holding_end(2, 0x200_0001, SIXTEEN_MIB).to_string(),
            "000000020000000000000002"
        );
        assert_eq!(
            SegmentName::holding_end(1, 0x1_0000_0028, SIXTEEN_MIB).to_string(),
            "000000010000000100000000"
        );
    }
}
