//! The archive's continuity as `GET /v1/status` reports it: how far WAL is
//! stored without a gap from the oldest retained backup's start segment
//! along the current timeline, and the first segment missing below the
//! archive's end.
//!
//! Kept current in the background, never per status call: the daemon
//! remembers the last segment known contiguous and re-lists only the `wal/`
//! folders of the current line from there, after each batch of archived
//! segments and every few seconds. A full re-check from the start runs now
//! and then, so that an object deleted behind that mark is found too.
//! A missing segment PostgreSQL still has marked `.ready` is on its way, not
//! a hole: parallel uploads store later segments first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::lsn::Lsn;
use crate::object::unseal;
use crate::repo::{self, RepoError};
use crate::storage::{Storage, StorageError};
use crate::timeline::{parse_history, Ancestor, Histories};
use crate::verify::{name_of, serving, tli_for};
use crate::wal::{SegmentName, WalFile};

use super::archiver::Archiver;
use super::backup::Backups;
use super::lock;

/// How often the loop looks whether something was archived.
const POLL: Duration = Duration::from_secs(1);
/// Refresh at least this often even when nothing was archived.
const REFRESH: Duration = Duration::from_secs(30);

/// `continuity` in `/v1/status`, and its first missing file.
pub use walden_contract::api::{ArchiveHole as Hole, Continuity as Report};

#[derive(Debug, thiserror::Error)]
pub enum ContinuityError {
    #[error("checking the archive's continuity: {0}")]
    Storage(#[from] StorageError),
    #[error("checking the archive's continuity: {0}")]
    Repo(#[from] RepoError),
    #[error("checking the archive's continuity: {object}: {reason}")]
    History { object: String, reason: String },
}

/// Where the oldest retained backup starts: its timeline and start LSN.
pub type Start = (u32, Lsn);

/// What one scan of the listed segments found. Pure data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    /// The last segment number present without a gap from the start.
    pub through: Option<u64>,
    /// The first segment missing below the end of the line, not pending.
    pub hole: Option<SegmentName>,
}

/// Walks segment numbers from `from` (the start, or one past what is known
/// contiguous) up to the newest segment of the line in `segments`: the first
/// one absent is a hole unless `pending` says PostgreSQL is still archiving
/// it (then the scan stops there without a hole). Pure.
pub fn scan(
    start: u64,
    known_through: Option<u64>,
    serving: &[(u32, u64)],
    segments: &BTreeSet<SegmentName>,
    segment_size: u32,
    pending: &dyn Fn(&SegmentName) -> bool,
) -> Scan {
    let from = known_through.map_or(start, |t| t + 1);
    let end = segments
        .iter()
        .map(|s| (s, s.segno(segment_size)))
        .filter(|(s, n)| *n >= from && tli_for(serving, *n) == s.timeline)
        .map(|(_, n)| n)
        .max();
    let mut n = from;
    let mut hole = None;
    if let Some(end) = end {
        while n <= end {
            let want = name_of(tli_for(serving, n), n, segment_size);
            if segments.contains(&want) {
                n += 1;
                continue;
            }
            if !pending(&want) {
                hole = Some(want);
            }
            break;
        }
    }
    Scan {
        through: (n > start).then(|| n - 1).or(known_through),
        hole,
    }
}

/// How much of what was known contiguous stays known when the line or the
/// start changes: up to the first segment another timeline serves now, and
/// nothing when the start moved before the old one or past what was known. Pure.
pub fn still_known(
    old: (u64, &[(u32, u64)]),
    new: (u64, &[(u32, u64)]),
    through: Option<u64>,
) -> Option<u64> {
    let (old_start, old_serving) = old;
    let (new_start, new_serving) = new;
    let through = through?;
    if new_start < old_start || new_start > through {
        return None;
    }
    let mut breaks: BTreeSet<u64> = old_serving.iter().map(|(_, f)| *f).collect();
    breaks.extend(new_serving.iter().map(|(_, f)| *f));
    breaks.insert(new_start);
    let differs = breaks
        .into_iter()
        .filter(|b| *b <= through)
        .find(|b| tli_for(old_serving, *b) != tli_for(new_serving, *b));
    match differs {
        Some(d) if d <= new_start => None,
        Some(d) => Some(d - 1),
        None => Some(through),
    }
}

/// The `wal/` folders (`TTTTTTTTLLLLLLLL`) that can hold segments of the line
/// at or after segment number `from`, sorted. Pure.
pub fn folders_to_list(
    folders: &[(u32, u32)],
    serving: &[(u32, u64)],
    from: u64,
    segment_size: u32,
) -> Vec<String> {
    let per_log = SegmentName::segments_per_log(segment_size);
    let on_line: BTreeSet<u32> = serving.iter().map(|(t, _)| *t).collect();
    let mut out: Vec<String> = folders
        .iter()
        .filter(|(t, log)| on_line.contains(t) && u64::from(*log) >= from / per_log)
        .map(|(t, log)| format!("{t:08X}{log:08X}"))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn parse_folder(f: &str) -> Option<(u32, u32)> {
    (f.len() == 16).then_some(())?;
    Some((
        u32::from_str_radix(&f[..8], 16).ok()?,
        u32::from_str_radix(&f[8..], 16).ok()?,
    ))
}

#[derive(Debug, Clone)]
struct Known {
    start: u64,
    serving: Vec<(u32, u64)>,
    through: Option<u64>,
}

#[derive(Default)]
struct State {
    known: Option<Known>,
    report: Option<Report>,
    /// History files are never rewritten: each is read once.
    histories: BTreeMap<u32, Vec<Ancestor>>,
}

/// The tracker: its last report and what it knows to be contiguous.
pub struct Continuity {
    storage: Arc<dyn Storage>,
    /// Where PostgreSQL marks files `.ready` (pending ones are no hole).
    pg_wal: Option<PathBuf>,
    /// A full re-check from the oldest backup's start this often.
    recheck: Duration,
    state: Mutex<State>,
}

impl Continuity {
    pub fn new(storage: Arc<dyn Storage>, pg_wal: Option<PathBuf>, recheck: Duration) -> Arc<Self> {
        Arc::new(Self {
            storage,
            pg_wal,
            recheck,
            state: Mutex::new(State::default()),
        })
    }

    /// The last report; `None` before the first check or without a backup.
    pub fn report(&self) -> Option<Report> {
        lock(&self.state).report.clone()
    }

    fn pending(&self, file: &str) -> bool {
        self.pg_wal.as_ref().is_some_and(|d| {
            d.join("archive_status")
                .join(format!("{file}.ready"))
                .exists()
        })
    }

    async fn history(&self, tli: u32) -> Result<Option<Vec<Ancestor>>, ContinuityError> {
        if let Some(h) = lock(&self.state).histories.get(&tli) {
            return Ok(Some(h.clone()));
        }
        let key = WalFile::History(tli).object_key();
        let download = match self.storage.get(&key).await {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let object = format!("{}/{key}", self.storage.url());
        let mut bytes = Vec::new();
        unseal(&object, download, &mut bytes)
            .await
            .map_err(|e| ContinuityError::History {
                object: object.clone(),
                reason: e.to_string(),
            })?;
        let ancestors = parse_history(&String::from_utf8_lossy(&bytes))
            .map_err(|reason| ContinuityError::History { object, reason })?;
        lock(&self.state).histories.insert(tli, ancestors.clone());
        Ok(Some(ancestors))
    }

    /// Brings the report up to date from `start` (the oldest backup's), or
    /// from scratch when `full`.
    pub async fn refresh(&self, start: Option<Start>, full: bool) -> Result<(), ContinuityError> {
        let Some((start_tli, start_lsn)) = start else {
            let mut st = lock(&self.state);
            st.known = None;
            st.report = None;
            return Ok(());
        };
        let Some(identity) = repo::load(self.storage.as_ref()).await? else {
            return Ok(());
        };
        let size = identity.wal_segment_size;
        let start_no = start_lsn.0 / u64::from(size.max(1));
        let folders: Vec<(u32, u32)> = self
            .storage
            .list_folders("wal/")
            .await?
            .iter()
            .filter_map(|f| parse_folder(f))
            .collect();
        let line = folders
            .iter()
            .map(|(t, _)| *t)
            .max()
            .unwrap_or(start_tli)
            .max(start_tli);
        let ancestors = if line > 1 {
            self.history(line).await?
        } else {
            Some(Vec::new())
        };
        let history_name = WalFile::History(line).file_name();
        let missing_history =
            ancestors.is_none() && line > start_tli && !self.pending(&history_name);
        let histories = Histories(BTreeMap::from([(line, ancestors.unwrap_or_default())]));
        let serving = serving(&histories, line, size);
        let known = lock(&self.state).known.clone();
        let through = match known {
            Some(k) if !full => still_known((k.start, &k.serving), (start_no, &serving), k.through),
            _ => None,
        };
        let from = through.map_or(start_no, |t| t + 1);
        let mut segments = BTreeSet::new();
        for folder in folders_to_list(&folders, &serving, from, size) {
            for o in self.storage.list(&format!("wal/{folder}/")).await? {
                if let Some(WalFile::Segment(s)) = WalFile::from_object_key(&o.key) {
                    segments.insert(s);
                }
            }
        }
        let found = scan(start_no, through, &serving, &segments, size, &|s| {
            self.pending(&s.to_string())
        });
        let checked_through = found
            .through
            .map(|n| name_of(tli_for(&serving, n), n, size).to_string());
        let hole = if missing_history {
            Some(history_name)
        } else {
            found.hole.map(|s| s.to_string())
        };
        let report = Report {
            first_hole: hole.map(|missing| Hole {
                missing,
                after: checked_through.clone(),
            }),
            checked_through,
        };
        let mut st = lock(&self.state);
        if st.report.as_ref().and_then(|r| r.first_hole.as_ref()) != report.first_hole.as_ref() {
            match &report.first_hole {
                Some(h) => tracing::warn!(
                    missing = %h.missing,
                    after = h.after.as_deref().unwrap_or("-"),
                    "the archive has a hole: recovery cannot pass the missing file"
                ),
                None => {
                    tracing::info!(checked_through = ?report.checked_through, "the archive is continuous")
                }
            }
        }
        st.known = Some(Known {
            start: start_no,
            serving,
            through: found.through,
        });
        st.report = Some(report);
        Ok(())
    }

    /// Keeps the report current for the life of the daemon: after archived
    /// segments, when the oldest backup changes, and every [`REFRESH`].
    pub async fn run_forever(self: Arc<Self>, backups: Arc<Backups>, archiver: Arc<Archiver>) {
        let mut last: Option<(u64, Option<Start>, Instant)> = None;
        let mut last_full: Option<Instant> = None;
        loop {
            let count = archiver.status().archived_count;
            let start = backups.catalog().oldest_start;
            let due = last
                .as_ref()
                .is_none_or(|(c, s, at)| *c != count || *s != start || at.elapsed() >= REFRESH);
            if due {
                let full = last_full.is_none_or(|t| t.elapsed() >= self.recheck);
                match self.refresh(start, full).await {
                    Ok(()) => {
                        if full {
                            last_full = Some(Instant::now());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "continuity not refreshed; keeping the last report")
                    }
                }
                last = Some((count, start, Instant::now()));
            }
            tokio::time::sleep(POLL.min(self.recheck)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u32 = 16 << 20;

    fn seg(tli: u32, n: u64) -> SegmentName {
        name_of(tli, n, SIZE)
    }

    fn segs(ranges: &[(u32, u64, u64)]) -> BTreeSet<SegmentName> {
        ranges
            .iter()
            .flat_map(|(t, a, b)| (*a..=*b).map(move |n| seg(*t, n)))
            .collect()
    }

    fn without(mut s: BTreeSet<SegmentName>, gone: &[SegmentName]) -> BTreeSet<SegmentName> {
        for g in gone {
            s.remove(g);
        }
        s
    }

    #[test]
    fn scans_for_the_first_hole() {
        let one = [(1u32, 0u64)];
        // Timeline 2 begins in segment 5 (its switch segment is read from timeline 2).
        let two = [(1u32, 0u64), (2, 5)];
        let none: &dyn Fn(&SegmentName) -> bool = &|_| false;
        let seg7_pending: &dyn Fn(&SegmentName) -> bool = &|s| *s == seg(1, 7);
        // (what, start, known, serving, segments, pending, want through, want hole)
        type Case<'a> = (
            &'a str,
            u64,
            Option<u64>,
            &'a [(u32, u64)],
            BTreeSet<SegmentName>,
            &'a dyn Fn(&SegmentName) -> bool,
            Option<u64>,
            Option<SegmentName>,
        );
        let cases: Vec<Case> = vec![
            (
                "healthy",
                2,
                None,
                &one,
                segs(&[(1, 1, 9)]),
                none,
                Some(9),
                None,
            ),
            (
                "a segment missing in the middle",
                2,
                None,
                &one,
                without(segs(&[(1, 1, 9)]), &[seg(1, 6)]),
                none,
                Some(5),
                Some(seg(1, 6)),
            ),
            (
                "several missing: the first is named",
                2,
                None,
                &one,
                without(segs(&[(1, 1, 9)]), &[seg(1, 4), seg(1, 5), seg(1, 8)]),
                none,
                Some(3),
                Some(seg(1, 4)),
            ),
            (
                "the start segment itself is missing",
                2,
                None,
                &one,
                without(segs(&[(1, 1, 9)]), &[seg(1, 2)]),
                none,
                None,
                Some(seg(1, 2)),
            ),
            (
                "a gap before the start does not matter",
                5,
                None,
                &one,
                without(segs(&[(1, 1, 9)]), &[seg(1, 3)]),
                none,
                Some(9),
                None,
            ),
            (
                "still .ready in pg_wal: pending, not a hole",
                2,
                None,
                &one,
                without(segs(&[(1, 1, 9)]), &[seg(1, 7)]),
                seg7_pending,
                Some(6),
                None,
            ),
            (
                "known through 6: continues from 7",
                2,
                Some(6),
                &one,
                segs(&[(1, 7, 12)]),
                none,
                Some(12),
                None,
            ),
            (
                "known through 6, nothing new listed",
                2,
                Some(6),
                &one,
                BTreeSet::new(),
                none,
                Some(6),
                None,
            ),
            (
                "nothing archived from the start on",
                2,
                None,
                &one,
                segs(&[(1, 0, 1)]),
                none,
                None,
                None,
            ),
            (
                "across a timeline switch",
                2,
                None,
                &two,
                segs(&[(1, 1, 4), (2, 5, 9)]),
                none,
                Some(9),
                None,
            ),
            (
                "the abandoned branch of timeline 1 does not count",
                2,
                None,
                &two,
                segs(&[(1, 1, 8), (2, 6, 9)]),
                none,
                Some(4),
                Some(seg(2, 5)),
            ),
            (
                "the end is timeline 2's newest segment",
                2,
                None,
                &two,
                without(segs(&[(1, 1, 4), (2, 5, 9)]), &[seg(1, 3)]),
                none,
                Some(2),
                Some(seg(1, 3)),
            ),
        ];
        for (what, start, known, serving, segments, pending, through, hole) in cases {
            let got = scan(start, known, serving, &segments, SIZE, pending);
            assert_eq!(got, Scan { through, hole }, "{what}");
        }
    }

    #[test]
    fn keeps_what_is_still_known_when_the_start_or_line_changes() {
        let one: &[(u32, u64)] = &[(1, 0)];
        let two_at_5: &[(u32, u64)] = &[(1, 0), (2, 5)];
        let two_at_20: &[(u32, u64)] = &[(1, 0), (2, 20)];
        // (what, old (start, serving), new, through, want)
        type Case<'a> = (
            &'a str,
            (u64, &'a [(u32, u64)]),
            (u64, &'a [(u32, u64)]),
            Option<u64>,
            Option<u64>,
        );
        let cases: Vec<Case> = vec![
            ("nothing changed", (2, one), (2, one), Some(9), Some(9)),
            ("nothing known", (2, one), (2, one), None, None),
            (
                "retention moved the start forward",
                (2, one),
                (6, one),
                Some(9),
                Some(9),
            ),
            (
                "the start moved past what was known",
                (2, one),
                (12, one),
                Some(9),
                None,
            ),
            ("the start moved back", (4, one), (2, one), Some(9), None),
            (
                "a new timeline after what was known",
                (2, one),
                (2, two_at_20),
                Some(9),
                Some(9),
            ),
            (
                "a new timeline branching inside what was known",
                (2, one),
                (2, two_at_5),
                Some(9),
                Some(4),
            ),
            (
                "a branch at the start itself",
                (5, one),
                (5, two_at_5),
                Some(9),
                None,
            ),
        ];
        for (what, old, new, through, want) in cases {
            assert_eq!(still_known(old, new, through), want, "{what}");
        }
    }

    #[test]
    fn lists_only_the_folders_from_the_known_mark_on_the_line() {
        let folders = [(1, 0), (1, 1), (1, 2), (2, 1), (2, 2), (3, 2)];
        let two: &[(u32, u64)] = &[(1, 0), (2, 300)];
        // (what, serving, from, want)
        type Case<'a> = (&'a str, &'a [(u32, u64)], u64, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "from the start",
                &[(1, 0)],
                0,
                vec!["0000000100000000", "0000000100000001", "0000000100000002"],
            ),
            (
                "from segment 0x150: log 1 on",
                &[(1, 0)],
                0x150,
                vec!["0000000100000001", "0000000100000002"],
            ),
            (
                "timeline 3 is not on the line of 2",
                two,
                0x250,
                vec!["0000000100000002", "0000000200000002"],
            ),
        ];
        for (what, serving, from, want) in cases {
            assert_eq!(
                folders_to_list(&folders, serving, from, SIZE),
                want,
                "{what}"
            );
        }
    }

    /// An empty file:// repository of the database `system_identifier`.
    async fn file_repository(system_identifier: &str) -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(crate::storage::FileStorage::new(dir.path().to_path_buf()));
        let id = serde_json::json!({
            "format": 1, "system_identifier": system_identifier, "pg_version": 15,
            "wal_segment_size": SIZE, "created_at": "2026-01-01T00:00:00Z", "created_by": "test"
        });
        storage
            .create(
                "walden.json",
                Box::pin(std::io::Cursor::new(serde_json::to_vec(&id).unwrap())),
            )
            .await
            .unwrap();
        (dir, storage)
    }

    /// Against real files: a hole is found, a later refresh lists only the
    /// folders from the mark on, and a filled hole is no longer reported.
    #[tokio::test]
    async fn refresh_reports_a_hole_and_its_repair() {
        let (_dir, storage) = file_repository("7").await;
        let put = |n: u64| {
            let s = storage.clone();
            async move {
                s.create(
                    &WalFile::Segment(seg(1, n)).object_key(),
                    Box::pin(std::io::Cursor::new(vec![0u8])),
                )
                .await
                .unwrap();
            }
        };
        for n in [2, 3, 5, 6] {
            put(n).await;
        }
        let tracker = Continuity::new(storage.clone(), None, Duration::from_secs(600));
        let start = Some((1, Lsn(2 * u64::from(SIZE) + 0x28)));
        assert_eq!(tracker.report(), None);
        tracker.refresh(start, true).await.unwrap();
        let want_hole = Report {
            checked_through: Some(seg(1, 3).to_string()),
            first_hole: Some(Hole {
                missing: seg(1, 4).to_string(),
                after: Some(seg(1, 3).to_string()),
            }),
        };
        assert_eq!(tracker.report(), Some(want_hole));
        put(4).await;
        tracker.refresh(start, false).await.unwrap();
        assert_eq!(
            tracker.report(),
            Some(Report {
                checked_through: Some(seg(1, 6).to_string()),
                first_hole: None,
            })
        );
        tracker.refresh(None, false).await.unwrap();
        assert_eq!(tracker.report(), None);
    }

    /// After a promotion the line follows the new timeline's history file;
    /// without that file, recovery cannot follow and the hole names it.
    #[tokio::test]
    async fn follows_the_new_timeline_and_names_a_missing_history_file() {
        let (_dir, storage) = file_repository("8").await;
        for s in [seg(1, 2), seg(1, 3), seg(1, 4), seg(2, 5), seg(2, 6)] {
            storage
                .create(
                    &WalFile::Segment(s).object_key(),
                    Box::pin(std::io::Cursor::new(vec![0u8])),
                )
                .await
                .unwrap();
        }
        let tracker = Continuity::new(storage.clone(), None, Duration::from_secs(600));
        let start = Some((1, Lsn(2 * u64::from(SIZE) + 0x28)));
        tracker.refresh(start, true).await.unwrap();
        let report = tracker.report().unwrap();
        assert_eq!(
            report.first_hole.map(|h| h.missing).as_deref(),
            Some("00000002.history"),
            "{:?}",
            tracker.report()
        );
        // Timeline 2 began in segment 5.
        let history = format!(
            "1\t{}\tno recovery target specified\n",
            Lsn(5 * u64::from(SIZE) + 0x60)
        );
        let sealed = crate::object::Sealer::new(
            std::io::Cursor::new(history.into_bytes()),
            crate::object::SealOptions::default(),
        );
        storage
            .create(&WalFile::History(2).object_key(), Box::pin(sealed))
            .await
            .unwrap();
        tracker.refresh(start, false).await.unwrap();
        assert_eq!(
            tracker.report(),
            Some(Report {
                checked_through: Some(seg(2, 6).to_string()),
                first_hole: None,
            })
        );
    }
}
