//! Is a file the archive does not hold past its end, or a hole?
//!
//! PostgreSQL ends recovery when `restore_command` says "absent", so that
//! answer is only right when the file truly lies past what the archive holds
//! for its timeline. A segment is a hole when the archive holds a later
//! segment of the same timeline, or a later timeline's history says this
//! timeline ran past the whole segment. A history file is a hole when the
//! archive holds WAL of that timeline and WAL or history of an earlier one
//! (a fork's new prefix legitimately starts with WAL of its new timeline and
//! no history file). History files of timelines without WAL answer "absent":
//! PostgreSQL probes for them to find the newest timeline.

use std::collections::{BTreeMap, BTreeSet};

use crate::lsn::Lsn;
use crate::object::unseal;
use crate::storage::Storage;
use crate::timeline::{parse_history, Ancestor};

use super::{SegmentName, WalError, WalFile};

/// What the archive holds around a missing file: enough to judge it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surroundings {
    /// Segments of the missing segment's timeline after it (the first few suffice).
    pub later_on_timeline: Vec<SegmentName>,
    /// Timelines with at least one WAL folder.
    pub timelines_with_wal: BTreeSet<u32>,
    /// History files present, parsed, by timeline (those that were read).
    pub histories: BTreeMap<u32, Vec<Ancestor>>,
}

/// Why an absent file is a hole; `None` when it is past the end.
pub fn judge(file: WalFile, around: &Surroundings, segment_size: u32) -> Option<String> {
    match file {
        WalFile::Segment(seg) => {
            if let Some(later) = around.later_on_timeline.first() {
                return Some(format!(
                    "the archive holds the later segment {later} of the same timeline"
                ));
            }
            let next_start = Lsn(seg.next(segment_size).start_lsn(segment_size));
            around.histories.iter().find_map(|(tli, ancestors)| {
                ancestors
                    .iter()
                    .find(|a| a.tli == seg.timeline && a.end >= next_start)
                    .map(|a| {
                        format!(
                            "{tli:08X}.history says timeline {} ran until {}, past this whole segment",
                            seg.timeline, a.end
                        )
                    })
            })
        }
        WalFile::History(tli) => {
            let earlier_wal = around.timelines_with_wal.iter().any(|t| *t < tli);
            let earlier_history = around.histories.keys().any(|t| *t < tli);
            (around.timelines_with_wal.contains(&tli) && (earlier_wal || earlier_history)).then(|| {
                format!(
                    "the archive holds WAL of timeline {tli} and of earlier timelines, so timeline {tli}'s history is missing"
                )
            })
        }
        // Partial and backup-history files are optional: never a hole.
        WalFile::Partial(_) | WalFile::BackupHistory { .. } => None,
    }
}

/// Reads what [`judge`] needs from storage: one folder listing of `wal/`,
/// the missing segment's folder (and the next of its timeline), and the
/// history files of the timelines that have WAL.
pub async fn surroundings(storage: &dyn Storage, file: WalFile) -> Result<Surroundings, WalError> {
    let mut around = Surroundings::default();
    let folders: Vec<(u32, u32)> = storage
        .list_folders("wal/")
        .await?
        .iter()
        .filter_map(|f| {
            (f.len() == 16)
                .then(|| {
                    Some((
                        u32::from_str_radix(&f[..8], 16).ok()?,
                        u32::from_str_radix(&f[8..], 16).ok()?,
                    ))
                })
                .flatten()
        })
        .collect();
    around.timelines_with_wal = folders.iter().map(|(t, _)| *t).collect();
    if let WalFile::Segment(seg) = file {
        let same: Vec<u32> = folders
            .iter()
            .filter(|(t, l)| *t == seg.timeline && *l >= seg.log)
            .map(|(_, l)| *l)
            .collect();
        for log in same {
            let folder = format!("wal/{:08X}{log:08X}/", seg.timeline);
            let mut later: Vec<SegmentName> = storage
                .list(&folder)
                .await?
                .iter()
                .filter_map(|o| match WalFile::from_object_key(&o.key) {
                    Some(WalFile::Segment(s)) if s > seg => Some(s),
                    _ => None,
                })
                .collect();
            later.sort();
            if !later.is_empty() {
                around.later_on_timeline = later;
                break;
            }
        }
    }
    let wanted: BTreeSet<u32> = match file {
        WalFile::Segment(seg) => around
            .timelines_with_wal
            .iter()
            .copied()
            .filter(|t| *t > seg.timeline)
            .collect(),
        WalFile::History(tli) => (2..tli).rev().take(8).collect(),
        _ => BTreeSet::new(),
    };
    for tli in wanted {
        let key = WalFile::History(tli).object_key();
        let download = match storage.get(&key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e.into()),
        };
        let object = format!("{}/{key}", storage.url());
        let mut bytes = Vec::new();
        unseal(&object, download, &mut bytes).await?;
        // An unreadable history is verify's finding; here it only cannot prove a hole.
        if let Ok(ancestors) = parse_history(&String::from_utf8_lossy(&bytes)) {
            around.histories.insert(tli, ancestors);
        }
    }
    Ok(around)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u32 = 16 << 20;

    fn seg(tli: u32, n: u32) -> SegmentName {
        SegmentName {
            timeline: tli,
            log: 0,
            seg: n,
        }
    }

    fn around(later: &[SegmentName], wal: &[u32], histories: &[(u32, &str)]) -> Surroundings {
        Surroundings {
            later_on_timeline: later.to_vec(),
            timelines_with_wal: wal.iter().copied().collect(),
            histories: histories
                .iter()
                .map(|(t, text)| (*t, parse_history(text).unwrap()))
                .collect(),
        }
    }

    #[test]
    fn judges_absent_files() {
        let tl2_at_9 = (2, "1\t0/9000060\tx\n");
        let tl2_at_5_start = (2, "1\t0/5000000\tx\n");
        // (what, file, surroundings, expected hole reason fragment or None)
        let cases: Vec<(&str, WalFile, Surroundings, Option<&str>)> = vec![
            (
                "past the end of the only timeline",
                WalFile::Segment(seg(1, 7)),
                around(&[], &[1], &[]),
                None,
            ),
            (
                "a later segment of the same timeline exists",
                WalFile::Segment(seg(1, 7)),
                around(&[seg(1, 9)], &[1], &[]),
                Some("later segment 000000010000000000000009"),
            ),
            (
                "timeline 2 says timeline 1 ran past it",
                WalFile::Segment(seg(1, 7)),
                around(&[], &[1, 2], &[tl2_at_9]),
                Some("00000002.history says timeline 1 ran until 0/9000060"),
            ),
            (
                "the switch segment of the old timeline may be absent (archived as .partial)",
                WalFile::Segment(seg(1, 9)),
                around(&[], &[1, 2], &[tl2_at_9]),
                None,
            ),
            (
                "a switch exactly at a segment boundary: the segment before it is needed",
                WalFile::Segment(seg(1, 4)),
                around(&[], &[1, 2], &[tl2_at_5_start]),
                Some("ran until 0/5000000"),
            ),
            (
                "timeline probing: a history of a timeline without WAL",
                WalFile::History(3),
                around(&[], &[1, 2], &[tl2_at_9]),
                None,
            ),
            (
                "a history missing while its WAL and an earlier timeline exist",
                WalFile::History(2),
                around(&[], &[1, 2], &[]),
                Some("history is missing"),
            ),
            (
                "a fork's new prefix: WAL of timeline 2 only",
                WalFile::History(2),
                around(&[], &[2], &[]),
                None,
            ),
            (
                "a later fork's prefix: history of timeline 2, WAL of 3, no 3.history",
                WalFile::History(3),
                around(&[], &[3], &[tl2_at_9]),
                Some("history is missing"),
            ),
            (
                "partial files are optional",
                WalFile::Partial(seg(1, 9)),
                around(&[seg(1, 10)], &[1], &[]),
                None,
            ),
        ];
        for (what, file, s, want) in cases {
            let got = judge(file, &s, SIZE);
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(w)) => assert!(g.contains(w), "{what}: {g}"),
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }
}
