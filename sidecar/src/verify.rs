//! `walden verify`: is the archive whole and intact?
//!
//! - every object's checksum: each backup part and WAL file is downloaded,
//!   decompressed and hashed as a stream (fixed buffers, nothing kept), and
//!   compared with its trailer and, for parts, with `backup.json`;
//! - every backup is complete: each part it lists exists with the recorded size;
//! - WAL is continuous from each backup's `start_wal` to the end of the
//!   archive, along every timeline whose history passes through the backup,
//!   choosing for each segment the timeline PostgreSQL would read it from.
//!
//! Problems are collected, not stopped at, so one run names every damaged
//! object and every missing segment.

use std::collections::BTreeSet;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::catalog::{self, BackupManifest, CatalogError};
use crate::lsn::Lsn;
use crate::object::unseal;
use crate::repo::{self, RepoError, RepoIdentity};
use crate::storage::{ObjectInfo, Storage, StorageError};
use crate::timeline::{Histories, HistoryError};
use crate::wal::fetch::check_header;
use crate::wal::files::{self, MAX_HISTORY_BYTES};
use crate::wal::header::{PageHeader, LONG_HEADER_LEN};
use crate::wal::{SegmentName, WalFile};

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Only this backup (and the WAL it needs).
    pub backup: Option<String>,
    /// Check backups (parts and their checksums).
    pub backups: bool,
    /// Check every WAL object's checksum.
    pub wal_checksums: bool,
    /// Objects checked at once.
    pub parallelism: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProblemKind {
    /// The stored bytes do not match their checksum.
    Corrupt,
    /// A part listed in `backup.json` does not exist.
    MissingPart,
    /// A part exists with another size or checksum than `backup.json` records.
    PartMismatch,
    /// Segments are missing between a backup's start and the end of the archive.
    WalGap,
    /// A timeline cannot be followed: its history file or first segment is missing.
    TimelineGap,
    /// The WAL that makes a backup consistent is not archived.
    BackupNotConsistent,
    /// The object could not be read (storage error).
    Unreadable,
    /// A WAL object holds another file than its name says (wrong position,
    /// timeline, size or database).
    WrongContent,
    /// A history or backup history file, or a `backup.json`, that cannot be parsed.
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    pub kind: ProblemKind,
    /// The object or segment concerned.
    pub object: String,
    pub message: String,
}

/// One timeline as the archive shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TimelineInfo {
    pub timeline: u32,
    pub parent: Option<u32>,
    pub switchpoint: Option<Lsn>,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: usize,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub ok: bool,
    pub backups_checked: usize,
    pub parts_checked: usize,
    pub wal_objects_checked: usize,
    pub bytes_checked: u64,
    pub timelines: Vec<TimelineInfo>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("no backup {id:?} in {url}; available: {available}")]
    UnknownBackup {
        id: String,
        url: String,
        available: String,
    },
}

/// Keeps the first `limit` bytes written to it and drops the rest.
struct Head {
    bytes: Vec<u8>,
    limit: usize,
}

impl tokio::io::AsyncWrite for Head {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let room = me.limit.saturating_sub(me.bytes.len()).min(buf.len());
        me.bytes.extend_from_slice(&buf[..room]);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// One object streamed through its checksum.
struct Checked {
    content_len: u64,
    sha256: String,
    stored: u64,
    /// The first bytes of the content, as many as asked for.
    head: Vec<u8>,
}

/// Streams one object through the checksum check, keeping its first `keep` bytes.
async fn check_object(storage: &dyn Storage, key: &str, keep: usize) -> Result<Checked, Problem> {
    let object = format!("{}/{key}", storage.url());
    let download = storage.get(key).await.map_err(|e| Problem {
        kind: if e.is_not_found() {
            ProblemKind::MissingPart
        } else {
            ProblemKind::Unreadable
        },
        object: key.to_string(),
        message: e.to_string(),
    })?;
    let stored = download.size;
    let mut head = Head {
        bytes: Vec::new(),
        limit: keep,
    };
    match unseal(&object, download, &mut head).await {
        Ok(seal) => Ok(Checked {
            content_len: seal.content_len,
            sha256: seal.sha256_hex(),
            stored,
            head: head.bytes,
        }),
        Err(e) => Err(Problem {
            kind: match e {
                crate::object::UnsealError::Corrupt { .. } => ProblemKind::Corrupt,
                _ => ProblemKind::Unreadable,
            },
            object: key.to_string(),
            message: e.to_string(),
        }),
    }
}

/// How many leading bytes of a WAL object its content check needs.
fn head_needed(file: WalFile) -> usize {
    match file {
        WalFile::Segment(_) | WalFile::Partial(_) => LONG_HEADER_LEN,
        WalFile::History(_) | WalFile::BackupHistory { .. } => MAX_HISTORY_BYTES as usize,
    }
}

/// Whether a WAL object's content is the file its name promises, as
/// `wal-fetch` would check it before handing it to PostgreSQL. Pure.
pub fn check_wal_content(
    file: WalFile,
    content_len: u64,
    head: &[u8],
    identity: &RepoIdentity,
) -> Result<(), (ProblemKind, String)> {
    match file {
        WalFile::Segment(seg) | WalFile::Partial(seg) => {
            let size = identity.wal_segment_size;
            if matches!(file, WalFile::Segment(_)) && content_len != u64::from(size) {
                return Err((
                    ProblemKind::WrongContent,
                    format!("it holds {content_len} bytes, but a segment of this archive is {size} bytes"),
                ));
            }
            let header = PageHeader::parse(head).map_err(|r| (ProblemKind::WrongContent, r))?;
            check_header(seg, &header, identity).map_err(|r| (ProblemKind::WrongContent, r))
        }
        WalFile::History(tli) => files::check_history(tli, head).map(|_| ()).map_err(|r| {
            (
                ProblemKind::Malformed,
                format!("not a valid timeline history file: {r}"),
            )
        }),
        WalFile::BackupHistory { segment, offset } => {
            files::check_backup_history(segment, offset, head).map_err(|r| {
                (
                    ProblemKind::Malformed,
                    format!("not a valid backup history file: {r}"),
                )
            })
        }
    }
}

/// Runs every check the options ask for.
pub async fn verify(storage: &dyn Storage, opts: &VerifyOptions) -> Result<Report, VerifyError> {
    let identity = repo::require(storage).await?;
    let catalog = catalog::scan_backups(storage).await?;
    let damaged = catalog.damaged;
    let all = catalog.backups;
    let backups: Vec<BackupManifest> = match &opts.backup {
        // A damaged one is reported below as a problem, not as unknown.
        Some(id) if damaged.iter().any(|d| &d.id == id) => Vec::new(),
        Some(id) => {
            let b = all
                .iter()
                .find(|b| &b.id == id)
                .ok_or_else(|| VerifyError::UnknownBackup {
                    id: id.clone(),
                    url: storage.url(),
                    available: all
                        .iter()
                        .map(|b| b.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            vec![b.clone()]
        }
        None => all,
    };
    let mut report = Report {
        backups_checked: backups.len(),
        ..Report::default()
    };
    let parallelism = opts.parallelism.max(1);
    for d in damaged
        .iter()
        .filter(|d| opts.backup.as_ref().is_none_or(|id| *id == d.id))
    {
        report.problems.push(Problem {
            kind: ProblemKind::Malformed,
            object: BackupManifest::key(&d.id),
            message: format!(
                "backup {} cannot be used: its backup.json is damaged: {}",
                d.id, d.reason
            ),
        });
    }

    if opts.backups {
        for b in &backups {
            check_backup(storage, b, parallelism, &mut report).await?;
        }
    }

    let wal_objects = storage.list("wal/").await?;
    let (histories, bad_histories) = Histories::load_checked(storage).await?;
    for (object, reason) in bad_histories {
        report.problems.push(Problem {
            kind: ProblemKind::Malformed,
            object,
            message: format!(
                "unusable timeline history file: {reason}; every restore that reads it fails"
            ),
        });
    }
    if opts.wal_checksums {
        let needed = |o: &ObjectInfo| match (&opts.backup, WalFile::from_object_key(&o.key)) {
            (None, Some(_)) => true,
            (Some(_), Some(f)) => match f.segment() {
                Some(s) => backups.iter().any(|b| {
                    SegmentName::parse(&b.start_wal)
                        .is_none_or(|start| s.timeline > start.timeline || s >= start)
                }),
                None => true,
            },
            (_, None) => false,
        };
        let keys: Vec<(String, WalFile)> = wal_objects
            .iter()
            .filter(|o| needed(o))
            .filter_map(|o| Some((o.key.clone(), WalFile::from_object_key(&o.key)?)))
            .collect();
        let identity = &identity;
        let results: Vec<_> = stream::iter(keys.iter())
            .map(|(k, file)| async move {
                let checked = check_object(storage, k, head_needed(*file)).await?;
                check_wal_content(*file, checked.content_len, &checked.head, identity).map_err(
                    |(kind, message)| Problem {
                        kind,
                        object: k.clone(),
                        message: format!("{message}; wal-fetch refuses to hand it to PostgreSQL"),
                    },
                )?;
                Ok::<_, Problem>(checked.stored)
            })
            .buffer_unordered(parallelism)
            .collect()
            .await;
        for r in results {
            report.wal_objects_checked += 1;
            match r {
                Ok(stored) => report.bytes_checked += stored,
                Err(p) => report.problems.push(p),
            }
        }
    }

    let segments: BTreeSet<SegmentName> = wal_objects
        .iter()
        .filter_map(|o| match WalFile::from_object_key(&o.key) {
            Some(WalFile::Segment(s)) => Some(s),
            _ => None,
        })
        .collect();
    report.timelines = timelines(&segments, &histories);
    report.problems.extend(continuity(
        &backups,
        &segments,
        &histories,
        identity.wal_segment_size,
    ));
    report.problems.sort();
    report.problems.dedup();
    report.ok = report.problems.is_empty();
    Ok(report)
}

async fn check_backup(
    storage: &dyn Storage,
    b: &BackupManifest,
    parallelism: usize,
    report: &mut Report,
) -> Result<(), VerifyError> {
    let listed: BTreeSet<String> = storage
        .list(&BackupManifest::prefix(&b.id))
        .await?
        .into_iter()
        .map(|o| o.key)
        .collect();
    let mut present = Vec::new();
    for part in &b.parts {
        let key = format!("{}{}", BackupManifest::prefix(&b.id), part.name);
        if listed.contains(&key) {
            present.push((key, part));
        } else {
            report.problems.push(Problem {
                kind: ProblemKind::MissingPart,
                object: key,
                message: format!(
                    "backup {} lists part {} but it is not in storage",
                    b.id, part.name
                ),
            });
        }
    }
    let results: Vec<_> = stream::iter(present.iter())
        .map(|(key, part)| async move { (key, part, check_object(storage, key, 0).await) })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    for (key, part, r) in results {
        report.parts_checked += 1;
        match r {
            Ok(Checked {
                content_len: len,
                sha256: sha,
                stored,
                ..
            }) => {
                report.bytes_checked += stored;
                // The sealed size (after decryption, for an encrypted archive).
                if stored != part.stored_size {
                    report.problems.push(Problem {
                        kind: ProblemKind::PartMismatch,
                        object: key.clone(),
                        message: format!(
                            "backup {} part {} is {stored} bytes in storage but {} bytes in backup.json",
                            b.id, part.name, part.stored_size
                        ),
                    });
                } else if len != part.content_size || sha != part.sha256 {
                    report.problems.push(Problem {
                        kind: ProblemKind::PartMismatch,
                        object: key.clone(),
                        message: format!(
                            "backup {} part {} holds {len} bytes with SHA-256 {sha}, but backup.json records {} bytes with {}",
                            b.id, part.name, part.content_size, part.sha256
                        ),
                    });
                }
            }
            Err(p) => report.problems.push(p),
        }
    }
    Ok(())
}

/// Each timeline's parent, switch point and segment range.
fn timelines(segments: &BTreeSet<SegmentName>, histories: &Histories) -> Vec<TimelineInfo> {
    let mut tlis: BTreeSet<u32> = segments.iter().map(|s| s.timeline).collect();
    tlis.extend(histories.0.keys());
    tlis.into_iter()
        .map(|t| {
            let on: Vec<&SegmentName> = segments.iter().filter(|s| s.timeline == t).collect();
            let parent = histories.ancestors(t).last();
            TimelineInfo {
                timeline: t,
                parent: parent.map(|a| a.tli),
                switchpoint: parent.map(|a| a.end),
                first_segment: on.first().map(|s| s.to_string()),
                last_segment: on.last().map(|s| s.to_string()),
                segments: on.len(),
            }
        })
        .collect()
}

pub(crate) fn name_of(tli: u32, segno: u64, segment_size: u32) -> SegmentName {
    let per_log = SegmentName::segments_per_log(segment_size);
    SegmentName {
        timeline: tli,
        log: (segno / per_log) as u32,
        seg: (segno % per_log) as u32,
    }
}

/// Which timeline serves each segment along the line of timeline `line`:
/// (timeline, first segment number it serves), oldest first. The segment
/// holding a switch point is read from the new timeline.
pub(crate) fn serving(histories: &Histories, line: u32, segment_size: u32) -> Vec<(u32, u64)> {
    let size = u64::from(segment_size.max(1));
    let mut out = Vec::new();
    let mut begin = 0u64;
    for a in histories.ancestors(line) {
        out.push((a.tli, begin / size));
        begin = a.end.0;
    }
    out.push((line, begin / size));
    out
}

/// The timeline segment number `n` is read from, per [`serving`].
pub(crate) fn tli_for(serving: &[(u32, u64)], n: u64) -> u32 {
    serving
        .iter()
        .rev()
        .find(|(_, first)| *first <= n)
        .or(serving.last())
        .map(|(t, _)| *t)
        .unwrap_or(0)
}

/// WAL continuity from every backup to the end of the archive, on every
/// timeline whose history passes through the backup. Pure.
pub fn continuity(
    backups: &[BackupManifest],
    segments: &BTreeSet<SegmentName>,
    histories: &Histories,
    segment_size: u32,
) -> Vec<Problem> {
    let mut problems = BTreeSet::new();
    let mut tlis: BTreeSet<u32> = segments.iter().map(|s| s.timeline).collect();
    tlis.extend(histories.0.keys());

    // A later timeline without its history file cannot be followed by recovery.
    let lowest_backup_tli = backups.iter().map(|b| b.timeline).min();
    for t in &tlis {
        if *t > 1 && !histories.0.contains_key(t) && lowest_backup_tli.is_some_and(|low| *t > low) {
            let first = segments.iter().find(|s| s.timeline == *t);
            problems.insert(Problem {
                kind: ProblemKind::TimelineGap,
                object: format!("{t:08X}.history"),
                message: format!(
                    "timeline {t} has WAL{} but its history file {t:08X}.history is missing: \
                     recovery cannot follow the archive onto timeline {t}",
                    first.map(|s| format!(" from {s}")).unwrap_or_default()
                ),
            });
        }
    }

    for b in backups {
        let Some(start) = SegmentName::parse(&b.start_wal) else {
            continue;
        };
        let start_no = start.segno(segment_size);
        let stop_no = SegmentName::parse(&b.stop_wal)
            .map(|s| s.segno(segment_size))
            .unwrap_or(start_no);
        let lines: Vec<u32> = tlis
            .iter()
            .copied()
            .filter(|t| *t == b.timeline || histories.on_line(b.timeline, b.start_lsn, *t))
            .collect();
        for line in lines {
            let serving = serving(histories, line, segment_size);
            let tli_for = |n: u64| tli_for(&serving, n);
            let end = segments
                .iter()
                .filter(|s| {
                    let n = s.segno(segment_size);
                    n >= start_no && tli_for(n) == s.timeline
                })
                .map(|s| s.segno(segment_size))
                .max();
            let Some(end) = end else {
                if line == b.timeline {
                    problems.insert(Problem {
                        kind: ProblemKind::BackupNotConsistent,
                        object: b.start_wal.clone(),
                        message: format!(
                            "backup {} starts at {} but no WAL from there on is archived on timeline {}",
                            b.id, b.start_wal, line
                        ),
                    });
                }
                continue;
            };
            let mut n = start_no;
            while n <= end {
                let want = name_of(tli_for(n), n, segment_size);
                if segments.contains(&want) {
                    n += 1;
                    continue;
                }
                let first = n;
                while n <= end && !segments.contains(&name_of(tli_for(n), n, segment_size)) {
                    n += 1;
                }
                let last = name_of(tli_for(n - 1), n - 1, segment_size);
                let switch = serving
                    .iter()
                    .find(|(t, f)| *t != serving[0].0 && (first..n).contains(f));
                let (kind, what) = match switch {
                    Some((t, f)) => (
                        ProblemKind::TimelineGap,
                        format!(
                            "timeline {t} begins in segment {} but it is missing",
                            name_of(*t, *f, segment_size)
                        ),
                    ),
                    None => (ProblemKind::WalGap, "WAL is missing".to_string()),
                };
                problems.insert(Problem {
                    kind,
                    object: want.to_string(),
                    message: format!(
                        "{what}: {} segment(s) {want} .. {last}, needed by backup {} to reach timeline {line}'s \
                         end of archive at {}",
                        n - first,
                        b.id,
                        name_of(tli_for(end), end, segment_size)
                    ),
                });
            }
            if line == b.timeline && end < stop_no {
                problems.insert(Problem {
                    kind: ProblemKind::BackupNotConsistent,
                    object: b.stop_wal.clone(),
                    message: format!(
                        "backup {} needs WAL up to {} to be consistent, but the archive ends at {}",
                        b.id,
                        b.stop_wal,
                        name_of(tli_for(end), end, segment_size)
                    ),
                });
            }
        }
    }
    problems.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sample_manifest;
    use crate::timeline::parse_history;
    use std::collections::BTreeMap;

    const SIZE: u32 = 16 << 20;

    fn seg(tli: u32, n: u64) -> SegmentName {
        name_of(tli, n, SIZE)
    }

    fn backup(id: &str, tli: u32, start: u64, stop: u64) -> BackupManifest {
        let mut b = sample_manifest(id, "2026-01-01T00:00:00Z", stop * u64::from(SIZE) + 0x100);
        b.timeline = tli;
        b.start_lsn = Lsn(start * u64::from(SIZE) + 0x28);
        b.start_wal = seg(tli, start).to_string();
        b.stop_wal = seg(tli, stop).to_string();
        b
    }

    fn segs(ranges: &[(u32, u64, u64)]) -> BTreeSet<SegmentName> {
        ranges
            .iter()
            .flat_map(|(t, a, b)| (*a..=*b).map(move |n| seg(*t, n)))
            .collect()
    }

    fn tl2_at_segment_5() -> Histories {
        Histories(BTreeMap::from([(
            2,
            parse_history(&format!("1\t{}\tx", Lsn(5 * u64::from(SIZE) + 0x60))).unwrap(),
        )]))
    }

    /// (what, backups, segments, histories, expected (kind, object) list)
    type Case = (
        &'static str,
        Vec<BackupManifest>,
        BTreeSet<SegmentName>,
        Histories,
        Vec<(ProblemKind, String)>,
    );

    #[test]
    fn continuity_cases() {
        let h2 = tl2_at_segment_5();
        // (what, backups, segments, histories, expected (kind, object) list)
        let cases: Vec<Case> = vec![
            (
                "healthy, one timeline",
                vec![backup("A", 1, 2, 3)],
                segs(&[(1, 1, 300)]),
                Histories::default(),
                vec![],
            ),
            (
                "missing segment in the middle",
                vec![backup("A", 1, 2, 3)],
                {
                    let mut s = segs(&[(1, 1, 20)]);
                    s.remove(&seg(1, 9));
                    s.remove(&seg(1, 10));
                    s
                },
                Histories::default(),
                vec![(ProblemKind::WalGap, seg(1, 9).to_string())],
            ),
            (
                "gap before the backup does not matter",
                vec![backup("A", 1, 5, 6)],
                segs(&[(1, 1, 2), (1, 5, 20)]),
                Histories::default(),
                vec![],
            ),
            (
                "healthy branch: timeline 2 serves the switch segment",
                vec![backup("A", 1, 2, 3)],
                segs(&[(1, 1, 4), (2, 5, 9)]),
                h2.clone(),
                vec![],
            ),
            (
                "the abandoned branch of timeline 1 continues too",
                vec![backup("A", 1, 2, 3)],
                segs(&[(1, 1, 8), (2, 5, 9)]),
                h2.clone(),
                vec![],
            ),
            (
                "timeline 2's first segment is missing",
                vec![backup("A", 1, 2, 3)],
                segs(&[(1, 1, 5), (2, 6, 9)]),
                h2.clone(),
                vec![(ProblemKind::TimelineGap, seg(2, 5).to_string())],
            ),
            (
                "timeline 2's history file is missing",
                vec![backup("A", 1, 2, 3)],
                segs(&[(1, 1, 4), (2, 5, 9)]),
                Histories::default(),
                vec![(ProblemKind::TimelineGap, "00000002.history".to_string())],
            ),
            (
                "a backup whose stop segment was never archived",
                vec![backup("A", 1, 2, 7)],
                segs(&[(1, 1, 5)]),
                Histories::default(),
                vec![(ProblemKind::BackupNotConsistent, seg(1, 7).to_string())],
            ),
            (
                "a backup on timeline 2 ignores timeline 1 past the switch",
                vec![backup("B", 2, 7, 8)],
                segs(&[(1, 1, 4), (2, 7, 9)]),
                h2.clone(),
                vec![],
            ),
        ];
        for (what, backups, segments, h, want) in cases {
            let got: Vec<(ProblemKind, String)> = continuity(&backups, &segments, &h, SIZE)
                .into_iter()
                .map(|p| (p.kind, p.object))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }
}
