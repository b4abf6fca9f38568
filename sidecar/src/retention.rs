//! Retention: which backups and WAL the policy lets go, and deleting them safely.
//!
//! [`plan`] is pure: it sees the manifests, the object listing, the timeline
//! histories, the policy and the clock, and returns the keys to delete. It
//! upholds safety invariant 5:
//! - a backup is deleted only when no point the policy promises needs it: for
//!   a window `W`, every backup that finished after `now − W` stays, and so
//!   does, on every timeline that can hold points in the window, the newest
//!   backup on that timeline's history that finished at or before `now − W`;
//! - WAL is deleted only below every retained backup: a segment stays when it
//!   is on a retained backup's timeline at or after its `start_wal`, or on any
//!   later timeline; history files always stay.
//!
//! Backups are ordered by their position in the WAL history (system, then
//! timeline, then LSN), never by segment name alone: a server upgrade starts a
//! new system whose numbering restarts, and a promotion starts a timeline that
//! can begin below positions written earlier on its parent.
//!
//! [`execute`] deletes in the order that keeps the archive consistent when
//! interrupted: every doomed `backup.json` first (a backup without it is no
//! longer listed, so nothing can pick a half-deleted backup), then the parts,
//! then the WAL. A re-run finds the leftover parts as abandoned backups older
//! than the newest one and finishes the job.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::backup::lease::is_lease_key;
use crate::catalog::{BackupManifest, MANIFEST_NAME};
use crate::retry::RetryPolicy;
use crate::storage::{Incomplete, ObjectInfo, Storage, StorageError};
use crate::timeline::Histories;
use crate::wal::{SegmentName, WalFile};

/// Objects deleted per request (the S3 DeleteObjects limit).
pub const DELETE_BATCH: usize = 1000;

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The newest N full backups (N ≥ 1) and the WAL they need.
    Full(usize),
    /// Every point in time from `now − window` to now stays restorable.
    Window(chrono::Duration),
    /// Both: whatever either policy keeps stays.
    Both {
        full: usize,
        window: chrono::Duration,
    },
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Full(n) => write!(f, "keep the newest {n} full backups"),
            Policy::Window(w) => write!(f, "keep a recovery window of {}", format_duration(*w)),
            Policy::Both { full, window } => write!(
                f,
                "keep the newest {full} full backups and a recovery window of {}",
                format_duration(*window)
            ),
        }
    }
}

/// Parses a duration such as `7d`, `36h`, `1d12h`, `90m`, `45s`, `2w`: the
/// grammar the CRDs accept too ([`walden_contract::duration`]).
pub use walden_contract::duration::parse as parse_duration;

pub fn format_duration(d: chrono::Duration) -> String {
    let s = d.num_seconds();
    match s {
        _ if s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ if s % 3_600 == 0 => format!("{}h", s / 3_600),
        _ if s % 60 == 0 => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}

/// Why a backup stays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Kept {
    pub id: String,
    pub reason: String,
}

/// What retention will delete and keep; `delete` is in execution order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub policy: String,
    pub now: DateTime<Utc>,
    /// Complete backups kept, oldest first, each with its reason.
    pub kept_backups: Vec<Kept>,
    /// Complete backups deleted, oldest first.
    pub deleted_backups: Vec<String>,
    /// Backup folders without `backup.json` where nothing was stored within
    /// the grace period: a killed backup or an interrupted retention; deleted.
    pub abandoned_backups: Vec<String>,
    /// Backup folders without `backup.json` that may still be being written
    /// (something stored within the grace period, such as the lease a running
    /// backup renews): kept.
    pub in_progress_backups: Vec<String>,
    /// Backups whose `backup.json` is damaged: kept untouched, for a person to look at.
    pub damaged_backups: Vec<String>,
    /// Per timeline, the first WAL segment kept (everything on later timelines stays).
    pub wal_kept_from: BTreeMap<String, String>,
    pub deleted_wal_objects: usize,
    pub deleted_bytes: u64,
    /// Every key to delete: manifests, then backup parts, then WAL.
    pub delete: Vec<String>,
    /// Leftovers of interrupted writes (temporary files, multipart uploads)
    /// older than the grace period: removed after the deletions.
    pub stale_temporaries: Vec<Incomplete>,
}

/// What the planner needs; everything is data, so it can be tested as a table.
pub struct PlanInput<'a> {
    /// Complete backups (those with a `backup.json`).
    pub backups: &'a [BackupManifest],
    /// Every object under `backups/` and `wal/`.
    pub objects: &'a [ObjectInfo],
    /// Leftovers of interrupted writes.
    pub incomplete: &'a [Incomplete],
    pub histories: &'a Histories,
    pub policy: Policy,
    pub now: DateTime<Utc>,
    /// A folder without `backup.json` is abandoned only once nothing in it
    /// was stored for this long (a running backup renews its lease far more often).
    pub grace: chrono::Duration,
}

/// How long a backup folder without `backup.json` stays untouched by default
/// (`WALDEN_RETENTION_GRACE`): twenty lease renewals.
pub const DEFAULT_GRACE: &str = "10m";

/// The latest `now − d` that exists (a huge duration reaches back to the earliest time).
fn before(now: DateTime<Utc>, d: chrono::Duration) -> DateTime<Utc> {
    now.checked_sub_signed(d)
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A backup's place in the archive's history; larger is newer.
type Position = (usize, u32, u64, DateTime<Utc>, String);

/// Orders backups by system ("era", oldest first by first finish time), then
/// timeline, then LSN: a position in the WAL history rather than a name.
fn positions(backups: &[BackupManifest]) -> BTreeMap<String, Position> {
    let mut first_stop: BTreeMap<&str, DateTime<Utc>> = BTreeMap::new();
    for b in backups {
        let e = first_stop
            .entry(&b.system_identifier)
            .or_insert(b.stop_time);
        *e = (*e).min(b.stop_time);
    }
    let mut eras: Vec<(DateTime<Utc>, &str)> = first_stop.iter().map(|(s, t)| (*t, *s)).collect();
    eras.sort();
    let rank = |sys: &str| eras.iter().position(|(_, s)| *s == sys).unwrap_or(0);
    backups
        .iter()
        .map(|b| {
            (
                b.id.clone(),
                (
                    rank(&b.system_identifier),
                    b.timeline,
                    b.stop_lsn.0,
                    b.stop_time,
                    b.id.clone(),
                ),
            )
        })
        .collect()
}

/// `backups/<id>/...` → `<id>`.
fn backup_dir(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("backups/")?;
    let (id, name) = rest.split_once('/')?;
    (!id.is_empty() && !name.is_empty()).then_some(id)
}

/// Decides what to delete. Pure: no I/O, no clock.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let PlanInput {
        backups,
        objects,
        incomplete,
        histories,
        policy,
        now,
        grace,
    } = *input;
    let pos = positions(backups);
    let mut ordered: Vec<&BackupManifest> = backups.iter().collect();
    ordered.sort_by(|a, b| pos[&a.id].cmp(&pos[&b.id]));

    let mut keep: BTreeMap<String, String> = BTreeMap::new();
    if let Some(newest) = ordered.last() {
        keep.insert(newest.id.clone(), "the newest backup".into());
    }
    let (full, window) = match policy {
        Policy::Full(n) => (Some(n), None),
        Policy::Window(w) => (None, Some(w)),
        Policy::Both { full, window } => (Some(full), Some(window)),
    };
    if let Some(n) = full {
        for b in ordered.iter().rev().take(n.max(1)) {
            keep.entry(b.id.clone())
                .or_insert_with(|| format!("one of the newest {}", n.max(1)));
        }
    }
    if let Some(w) = window {
        let cutoff = before(now, w);
        for b in ordered.iter().filter(|b| b.stop_time > cutoff) {
            keep.entry(b.id.clone())
                .or_insert_with(|| "finished inside the window".into());
        }
        for tli in window_timelines(&ordered, objects, cutoff) {
            let anchor = ordered
                .iter()
                .rev()
                .find(|b| b.stop_time <= cutoff && histories.on_line(b.timeline, b.stop_lsn, tli));
            if let Some(b) = anchor {
                keep.entry(b.id.clone()).or_insert_with(|| {
                    format!(
                        "the newest backup that reaches the start of the window ({}) on timeline {tli}",
                        cutoff.to_rfc3339()
                    )
                });
            }
        }
    }

    let complete: BTreeSet<&str> = backups.iter().map(|b| b.id.as_str()).collect();
    let doomed: Vec<&BackupManifest> = ordered
        .iter()
        .copied()
        .filter(|b| !keep.contains_key(&b.id))
        .collect();
    let doomed_ids: BTreeSet<&str> = doomed.iter().map(|b| b.id.as_str()).collect();

    // Folders without a manifest: abandoned once nothing in them is recent.
    let newest = ordered.last();
    let stale_before = before(now, grace);
    let mut orphans: BTreeMap<&str, Vec<&ObjectInfo>> = BTreeMap::new();
    for o in objects {
        if let Some(id) = backup_dir(&o.key) {
            if !complete.contains(id) {
                orphans.entry(id).or_default().push(o);
            }
        }
    }
    let mut abandoned = Vec::new();
    let mut in_progress = Vec::new();
    for (id, objs) in &orphans {
        let stale = objs
            .iter()
            .all(|o| o.modified.is_some_and(|m| m < stale_before));
        // Without a lease the folder is no running backup's: what an
        // interrupted retention (or an older walden) left, once a newer backup exists.
        let leased = objs.iter().any(|o| is_lease_key(&o.key));
        let superseded = !leased
            && newest.is_some_and(|n| {
                *id < n.id.as_str()
                    && objs
                        .iter()
                        .all(|o| o.modified.is_some_and(|m| m < n.stop_time))
            });
        if stale || superseded {
            abandoned.push(id.to_string());
        } else {
            in_progress.push(id.to_string());
        }
    }

    // WAL floors: per timeline, the earliest start of a retained backup on it.
    let retained: Vec<&BackupManifest> = ordered
        .iter()
        .copied()
        .filter(|b| keep.contains_key(&b.id))
        .collect();
    let mut floors: BTreeMap<u32, SegmentName> = BTreeMap::new();
    let mut lowest_tli = u32::MAX;
    for b in &retained {
        lowest_tli = lowest_tli.min(b.timeline);
        // A manifest whose start_wal does not parse protects everything on its timeline.
        let start = SegmentName::parse(&b.start_wal).unwrap_or(SegmentName {
            timeline: b.timeline,
            log: 0,
            seg: 0,
        });
        let f = floors.entry(b.timeline).or_insert(start);
        *f = (*f).min(start);
    }
    let wal_needed = |s: &SegmentName| {
        s.timeline > lowest_tli || floors.get(&s.timeline).is_some_and(|f| s >= f)
    };

    let mut manifests = Vec::new();
    let mut parts = Vec::new();
    let mut wal = Vec::new();
    let mut bytes = 0u64;
    for o in objects {
        if let Some(id) = backup_dir(&o.key) {
            if doomed_ids.contains(id) {
                if o.key.ends_with(&format!("/{MANIFEST_NAME}")) {
                    manifests.push(o.key.clone());
                } else {
                    parts.push(o.key.clone());
                }
                bytes += o.size;
            } else if abandoned.iter().any(|a| a == id) {
                parts.push(o.key.clone());
                bytes += o.size;
            }
            continue;
        }
        // Without a retained backup nothing proves which WAL is unneeded.
        if retained.is_empty() {
            continue;
        }
        let Some(file) = WalFile::from_object_key(&o.key) else {
            continue;
        };
        let Some(seg) = file.segment() else {
            continue; // history files always stay
        };
        if !wal_needed(&seg) {
            wal.push(o.key.clone());
            bytes += o.size;
        }
    }
    let deleted_wal_objects = wal.len();
    let mut delete = manifests;
    delete.extend(parts);
    delete.extend(wal);

    Plan {
        policy: policy.to_string(),
        now,
        kept_backups: retained
            .iter()
            .map(|b| Kept {
                id: b.id.clone(),
                reason: keep[&b.id].clone(),
            })
            .collect(),
        deleted_backups: doomed.iter().map(|b| b.id.clone()).collect(),
        abandoned_backups: abandoned,
        in_progress_backups: in_progress,
        damaged_backups: Vec::new(),
        wal_kept_from: floors
            .iter()
            .map(|(t, s)| (format!("{t:08X}"), s.to_string()))
            .collect(),
        deleted_wal_objects,
        deleted_bytes: bytes,
        delete,
        // A write that started before the grace period is over: its process
        // is gone. Only in this archive's own folders: below the prefix there
        // may be another archive (the one started after pg_upgrade), whose
        // writes are not this one's to remove.
        stale_temporaries: incomplete
            .iter()
            .filter(|i| i.key.starts_with("wal/") || i.key.starts_with("backups/"))
            .filter(|i| i.started.is_some_and(|t| t < stale_before))
            .cloned()
            .collect(),
    }
}

/// Timelines that can hold a point of the window: the newest backup's, the
/// newest segment's, the one live at the cutoff (whose state is the point at
/// the cutoff), any with a backup finishing inside the window, and any with
/// WAL stored at or after the cutoff (a commit is archived after it happens,
/// so a timeline whose WAL was all stored earlier has no commit in the
/// window). Unknown storage times count as inside.
fn window_timelines(
    ordered: &[&BackupManifest],
    objects: &[ObjectInfo],
    cutoff: DateTime<Utc>,
) -> BTreeSet<u32> {
    let mut out = BTreeSet::new();
    if let Some(n) = ordered.last() {
        out.insert(n.timeline);
    }
    out.extend(
        ordered
            .iter()
            .filter(|b| b.stop_time > cutoff)
            .map(|b| b.timeline),
    );
    let mut newest: Option<(Option<DateTime<Utc>>, u32)> = None;
    // The newest segment or history file stored by the cutoff: its timeline was live then.
    let mut live: Option<(DateTime<Utc>, u32)> = None;
    for o in objects {
        let tli = match WalFile::from_object_key(&o.key) {
            Some(WalFile::Segment(s)) => {
                if o.modified.is_none_or(|m| m >= cutoff) {
                    out.insert(s.timeline);
                }
                if newest.is_none_or(|(m, _)| o.modified > m) {
                    newest = Some((o.modified, s.timeline));
                }
                s.timeline
            }
            Some(WalFile::History(t)) => t,
            _ => continue,
        };
        if let Some(m) = o.modified.filter(|m| *m <= cutoff) {
            if live.is_none_or(|(lm, lt)| (m, tli) > (lm, lt)) {
                live = Some((m, tli));
            }
        }
    }
    out.extend(newest.map(|(_, t)| t));
    out.extend(live.map(|(_, t)| t));
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RetainError {
    #[error(transparent)]
    Catalog(#[from] crate::catalog::CatalogError),
    #[error(transparent)]
    History(#[from] crate::timeline::HistoryError),
    #[error("listing {what} in {url} failed: {source}")]
    List {
        what: &'static str,
        url: String,
        source: StorageError,
    },
    #[error(
        "deleting {first} and {more} more object(s) failed after {done} of {total} deletions: {source}; \
         the archive is consistent, run retain again to finish"
    )]
    Delete {
        first: String,
        more: usize,
        done: usize,
        total: usize,
        source: StorageError,
    },
}

/// Reads what the planner needs from storage (one paginated listing of
/// `backups/` and of `wal/`, the manifests and history files) and plans.
pub async fn plan_for(
    storage: &dyn Storage,
    policy: Policy,
    now: DateTime<Utc>,
    grace: chrono::Duration,
) -> Result<Plan, RetainError> {
    let catalog = crate::catalog::scan_backups(storage).await?;
    let backups = catalog.backups;
    let list = |what: &'static str| async move {
        storage
            .list(what)
            .await
            .map_err(|source| RetainError::List {
                what,
                url: storage.url(),
                source,
            })
    };
    let mut objects = list("backups/").await?;
    // A damaged backup's folder is not abandoned: nobody can tell what it
    // holds, so retention leaves it alone.
    let damaged: BTreeSet<&str> = catalog.damaged.iter().map(|d| d.id.as_str()).collect();
    objects.retain(|o| backup_dir(&o.key).is_none_or(|id| !damaged.contains(id)));
    objects.extend(list("wal/").await?);
    let incomplete = match storage.list_incomplete().await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list leftovers of interrupted writes (not supported here?); not removing any");
            Vec::new()
        }
    };
    let histories = Histories::load(storage).await?;
    let mut planned = plan(&PlanInput {
        backups: &backups,
        objects: &objects,
        incomplete: &incomplete,
        histories: &histories,
        policy,
        now,
        grace,
    });
    planned.damaged_backups = catalog.damaged.iter().map(|d| d.id.clone()).collect();
    Ok(planned)
}

/// Deletes the plan's keys in order, in batches, retrying transient errors.
/// Returns how many keys were deleted.
pub async fn execute(
    storage: &dyn Storage,
    plan: &Plan,
    retry: &RetryPolicy,
) -> Result<usize, RetainError> {
    let total = plan.delete.len();
    let mut done = 0;
    for batch in plan.delete.chunks(DELETE_BATCH) {
        retry
            .run("delete", StorageError::is_transient, || {
                storage.delete(batch)
            })
            .await
            .map_err(|source| RetainError::Delete {
                first: batch[0].clone(),
                more: batch.len() - 1,
                done,
                total,
                source,
            })?;
        done += batch.len();
        tracing::info!(deleted = done, of = total, "retention progress");
    }
    for item in &plan.stale_temporaries {
        match storage.remove_incomplete(item).await {
            Ok(()) => {
                done += 1;
                tracing::info!(key = %item.key, "removed the leftover of an interrupted write");
            }
            Err(e) => {
                tracing::warn!(key = %item.key, error = %e, "cannot remove the leftover of an interrupted write; the next run tries again")
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::sample_manifest;
    use crate::lsn::Lsn;
    use crate::timeline::{parse_history, Histories};

    const SEG: u64 = 16 << 20;

    fn ts(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    /// A backup on `tli` covering segments `start..=stop` (16 MiB segments), finished at `stop_time`.
    fn backup(id: &str, tli: u32, start: u64, stop: u64, stop_time: &str) -> BackupManifest {
        let mut b = sample_manifest(id, stop_time, stop * SEG + 0x100);
        b.timeline = tli;
        b.start_lsn = Lsn(start * SEG + 0x28);
        b.start_wal = seg(tli, start).to_string();
        b.stop_wal = seg(tli, stop).to_string();
        b
    }

    fn seg(tli: u32, n: u64) -> SegmentName {
        SegmentName {
            timeline: tli,
            log: (n / 256) as u32,
            seg: (n % 256) as u32,
        }
    }

    fn obj(key: String, modified: &str) -> ObjectInfo {
        ObjectInfo {
            key,
            size: 10,
            modified: Some(ts(modified)),
        }
    }

    /// Objects for backups (manifest + 2 parts) and WAL segments `tli:from..=to`.
    fn objects(
        backups: &[BackupManifest],
        wal: &[(u32, u64, u64)],
        modified: &str,
    ) -> Vec<ObjectInfo> {
        let mut out = Vec::new();
        for b in backups {
            for name in ["backup.json", "part-00001.tar.zst", "part-00002.tar.zst"] {
                out.push(obj(format!("backups/{}/{name}", b.id), modified));
            }
        }
        for (tli, from, to) in wal {
            for n in *from..=*to {
                out.push(obj(WalFile::Segment(seg(*tli, n)).object_key(), modified));
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn ids(v: &[Kept]) -> Vec<&str> {
        v.iter().map(|k| k.id.as_str()).collect()
    }

    fn wal_left(objects: &[ObjectInfo], p: &Plan) -> Vec<String> {
        objects
            .iter()
            .filter(|o| o.key.starts_with("wal/") && !p.delete.contains(&o.key))
            .filter_map(|o| WalFile::from_object_key(&o.key).map(|f| f.file_name()))
            .collect()
    }

    fn run(
        backups: &[BackupManifest],
        objects: &[ObjectInfo],
        histories: &Histories,
        policy: Policy,
        now: &str,
    ) -> Plan {
        plan(&PlanInput {
            backups,
            objects,
            incomplete: &[],
            histories,
            policy,
            now: ts(now),
            grace: chrono::Duration::minutes(10),
        })
    }

    fn three_daily() -> Vec<BackupManifest> {
        vec![
            backup("A", 1, 2, 3, "2026-01-01T00:00:00Z"),
            backup("B", 1, 10, 11, "2026-01-02T00:00:00Z"),
            backup("C", 1, 20, 21, "2026-01-03T00:00:00Z"),
        ]
    }

    #[test]
    fn count_and_window_policies_on_one_timeline() {
        let backups = three_daily();
        let objs = objects(&backups, &[(1, 1, 30)], "2026-01-03T12:00:00Z");
        let h = Histories::default();
        let hours = |n| Policy::Window(chrono::Duration::hours(n));
        // (policy, kept backups, first WAL segment kept)
        let cases: Vec<(Policy, Vec<&str>, u64)> = vec![
            (Policy::Full(1), vec!["C"], 20),
            (Policy::Full(2), vec!["B", "C"], 10),
            (Policy::Full(3), vec!["A", "B", "C"], 2),
            (Policy::Full(9), vec!["A", "B", "C"], 2),
            (Policy::Full(0), vec!["C"], 20),
            // now = Jan 3 12:00; window 12h: cutoff Jan 3 00:00 = C's stop: C reaches it.
            (hours(12), vec!["C"], 20),
            // 13h: cutoff Jan 2 23:00: B is the newest finished before it.
            (hours(13), vec!["B", "C"], 10),
            (hours(36), vec!["B", "C"], 10),
            (hours(37), vec!["A", "B", "C"], 2),
            (hours(1000), vec!["A", "B", "C"], 2),
            // Both: the union of what each keeps.
            (
                Policy::Both {
                    full: 1,
                    window: chrono::Duration::hours(13),
                },
                vec!["B", "C"],
                10,
            ),
            (
                Policy::Both {
                    full: 3,
                    window: chrono::Duration::hours(12),
                },
                vec!["A", "B", "C"],
                2,
            ),
        ];
        for (policy, kept, first_wal) in cases {
            let p = run(&backups, &objs, &h, policy, "2026-01-03T12:00:00Z");
            assert_eq!(ids(&p.kept_backups), kept, "{policy}");
            let left = wal_left(&objs, &p);
            assert_eq!(
                left.first().cloned(),
                Some(seg(1, first_wal).to_string()),
                "{policy}"
            );
            assert_eq!(
                left.len() as u64,
                30 - first_wal + 1,
                "{policy}: no gap above the floor"
            );
            // Manifests come first, then parts, then WAL.
            let deleted: Vec<&str> = p.delete.iter().map(String::as_str).collect();
            let first_part = deleted.iter().position(|k| k.contains("part-"));
            let last_manifest = deleted.iter().rposition(|k| k.ends_with("backup.json"));
            let first_wal_key = deleted.iter().position(|k| k.starts_with("wal/"));
            if let (Some(m), Some(pt)) = (last_manifest, first_part) {
                assert!(m < pt, "{policy}: a part is deleted before a manifest");
            }
            if let (Some(pt), Some(w)) = (first_part, first_wal_key) {
                assert!(pt < w, "{policy}: WAL deleted before parts");
            }
            assert_eq!(
                p.deleted_backups.len() * 3 + (first_wal as usize - 1),
                p.delete.len(),
                "{policy}"
            );
        }
    }

    #[test]
    fn no_backups_means_nothing_is_deleted() {
        let objs = objects(&[], &[(1, 1, 50)], "2026-01-01T00:00:00Z");
        let p = run(
            &[],
            &objs,
            &Histories::default(),
            Policy::Full(1),
            "2026-02-01T00:00:00Z",
        );
        assert!(p.delete.is_empty(), "{:?}", p.delete);
    }

    #[test]
    fn history_files_and_unknown_keys_always_stay() {
        let backups = three_daily();
        let mut objs = objects(&backups, &[(1, 1, 30)], "2026-01-03T12:00:00Z");
        objs.push(obj(
            "wal/00000002.history.zst".into(),
            "2026-01-01T00:00:00Z",
        ));
        objs.push(obj(
            "wal/0000000100000000/junk".into(),
            "2026-01-01T00:00:00Z",
        ));
        let p = run(
            &backups,
            &objs,
            &Histories::default(),
            Policy::Full(1),
            "2026-01-04T00:00:00Z",
        );
        assert!(!p
            .delete
            .iter()
            .any(|k| k.contains("history") || k.ends_with("junk")));
    }

    #[test]
    fn folders_without_a_manifest_go_only_once_nothing_in_them_is_recent() {
        let backups = three_daily();
        let mut objs = objects(&backups, &[(1, 1, 30)], "2026-01-01T00:00:00Z");
        // A backup running now, newer than C: its lease was renewed a minute ago.
        objs.push(obj(
            "backups/D/part-00001.tar.zst".into(),
            "2026-01-03T12:00:00Z",
        ));
        objs.push(obj(
            "backups/D/lease-000120.json".into(),
            "2026-01-03T12:59:00Z",
        ));
        // A backup that started before C and is still running (a CLI backup
        // overlapping the daemon's): older id, parts older than C's end, fresh lease.
        objs.push(obj(
            "backups/BC/part-00001.tar.zst".into(),
            "2026-01-02T12:00:00Z",
        ));
        objs.push(obj(
            "backups/BC/lease-000004.json".into(),
            "2026-01-03T12:55:00Z",
        ));
        // A backup killed between A and B (or an interrupted retention).
        objs.push(obj(
            "backups/AB/part-00001.tar.zst".into(),
            "2026-01-01T12:00:00Z",
        ));
        objs.push(obj(
            "backups/AB/part-00002.tar.zst".into(),
            "2026-01-01T12:00:00Z",
        ));
        // A backup killed after C, its lease lapsed long ago: a leak, removed too.
        objs.push(obj(
            "backups/E/lease-000002.json".into(),
            "2026-01-03T12:40:00Z",
        ));
        // Parts with no storage time: cannot prove they are old, so kept.
        objs.push(ObjectInfo {
            key: "backups/AC/part-00001.tar.zst".into(),
            size: 1,
            modified: None,
        });
        objs.sort_by(|a, b| a.key.cmp(&b.key));
        let p = run(
            &backups,
            &objs,
            &Histories::default(),
            Policy::Full(3),
            "2026-01-03T13:00:00Z",
        );
        assert_eq!(p.abandoned_backups, ["AB", "E"]);
        assert_eq!(p.in_progress_backups, ["AC", "BC", "D"]);
        assert_eq!(
            p.delete,
            [
                "backups/AB/part-00001.tar.zst",
                "backups/AB/part-00002.tar.zst",
                "backups/E/lease-000002.json",
                // below A's start_wal: no backup needs it
                "wal/0000000100000000/000000010000000000000001.zst"
            ]
        );
        // The grace period decides: with a longer one, E is still given time.
        let p = plan(&PlanInput {
            backups: &backups,
            objects: &objs,
            incomplete: &[],
            histories: &Histories::default(),
            policy: Policy::Full(3),
            now: ts("2026-01-03T13:00:00Z"),
            grace: chrono::Duration::hours(1),
        });
        assert_eq!(p.in_progress_backups, ["AC", "BC", "D", "E"]);
        // A folder without a lease, older than the newest backup (an interrupted
        // retention) goes whatever the grace period; one with a lease never does.
        let p = plan(&PlanInput {
            grace: chrono::Duration::days(30),
            ..PlanInput {
                backups: &backups,
                objects: &objs,
                incomplete: &[],
                histories: &Histories::default(),
                policy: Policy::Full(3),
                now: ts("2026-01-03T13:00:00Z"),
                grace: chrono::Duration::zero(),
            }
        });
        assert_eq!(p.abandoned_backups, ["AB"]);
        assert_eq!(p.in_progress_backups, ["AC", "BC", "D", "E"]);
        // Without any complete backup: a fresh folder stays, a stale one goes, no WAL goes.
        let only = vec![
            obj(
                "backups/X/part-00001.tar.zst".into(),
                "2026-01-01T00:00:00Z",
            ),
            obj("backups/Y/lease-000000.json".into(), "2026-01-03T12:58:00Z"),
            obj(
                WalFile::Segment(seg(1, 1)).object_key(),
                "2026-01-01T00:00:00Z",
            ),
        ];
        let p = run(
            &[],
            &only,
            &Histories::default(),
            Policy::Full(1),
            "2026-01-03T13:00:00Z",
        );
        assert_eq!(p.delete, ["backups/X/part-00001.tar.zst"]);
        assert_eq!(p.in_progress_backups, ["Y"]);
    }

    /// `execute` deletes batch by batch in the plan's order (manifests, then
    /// parts, then WAL): a batch that keeps failing stops the run with every
    /// later key still stored and says how far it got; a transient failure
    /// is retried; a re-run of the rest finishes.
    #[tokio::test]
    async fn execute_deletes_in_order_and_stops_at_a_failing_batch() {
        use crate::storage::memory::MemoryStorage;
        let storage = MemoryStorage::default();
        let mut keys = vec!["backups/A/backup.json".to_string()];
        keys.extend((0..DELETE_BATCH + 10).map(|i| format!("backups/A/part-{i:05}.tar.zst")));
        keys.extend((1..=5).map(|n| format!("wal/0000000100000000/{}.zst", seg(1, n))));
        for k in &keys {
            storage
                .create(k, Box::pin(std::io::Cursor::new(b"x".to_vec())))
                .await
                .unwrap();
        }
        let plan = Plan {
            policy: "full 1".into(),
            now: ts("2026-01-03T13:00:00Z"),
            kept_backups: Vec::new(),
            deleted_backups: vec!["A".into()],
            abandoned_backups: Vec::new(),
            in_progress_backups: Vec::new(),
            damaged_backups: Vec::new(),
            wal_kept_from: BTreeMap::new(),
            deleted_wal_objects: 5,
            deleted_bytes: 0,
            delete: keys.clone(),
            stale_temporaries: Vec::new(),
        };
        let retry = RetryPolicy {
            retries: 2,
            base_delay: std::time::Duration::from_millis(1),
            max_delay: std::time::Duration::from_millis(1),
        };
        // The first batch (the manifest and parts) goes; the second keeps failing.
        storage.fail_deletes_after(1, 3);
        let err = execute(&storage, &plan, &retry).await.unwrap_err();
        let RetainError::Delete {
            done,
            total,
            ref first,
            ..
        } = err
        else {
            panic!("{err}");
        };
        assert_eq!((done, total), (DELETE_BATCH, keys.len()));
        assert_eq!(first, &keys[DELETE_BATCH]);
        assert!(err.to_string().contains("run retain again"), "{err}");
        assert_eq!(
            storage.keys(),
            keys[DELETE_BATCH..].to_vec(),
            "deleted out of order"
        );
        assert!(
            storage.object("backups/A/backup.json").is_none(),
            "the manifest went first"
        );
        // One transient failure is retried; the re-run of the rest finishes.
        storage.fail_deletes_after(0, 1);
        let rest = Plan {
            delete: keys[DELETE_BATCH..].to_vec(),
            ..plan
        };
        assert_eq!(
            execute(&storage, &rest, &retry).await.unwrap(),
            keys.len() - DELETE_BATCH
        );
        assert!(storage.keys().is_empty());
    }

    #[test]
    fn only_this_archives_leftovers_older_than_the_grace_period_are_removed() {
        let backups = three_daily();
        let objs = objects(&backups, &[(1, 1, 30)], "2026-01-03T12:00:00Z");
        let left = |key: &str, started: Option<&str>| Incomplete {
            key: key.into(),
            handle: key.into(),
            started: started.map(ts),
        };
        let incomplete = [
            left("wal/x/.walden-tmp-a", Some("2026-01-03T12:00:00Z")),
            left("wal/x/.walden-tmp-b", Some("2026-01-03T12:55:00Z")),
            left("backups/D/part-00001.tar.zst", None),
            left("pg18-222/wal/x/.walden-tmp-c", Some("2026-01-03T12:00:00Z")),
            left(
                "pg18-222/backups/E/part-00001.tar.zst",
                Some("2026-01-03T12:00:00Z"),
            ),
        ];
        let p = plan(&PlanInput {
            backups: &backups,
            objects: &objs,
            incomplete: &incomplete,
            histories: &Histories::default(),
            policy: Policy::Full(3),
            now: ts("2026-01-03T13:00:00Z"),
            grace: chrono::Duration::minutes(10),
        });
        assert_eq!(p.stale_temporaries, [incomplete[0].clone()]);
    }

    #[test]
    fn a_huge_window_keeps_everything_instead_of_overflowing() {
        let backups = three_daily();
        let objs = objects(&backups, &[(1, 1, 30)], "2026-01-03T12:00:00Z");
        let window = parse_duration("999999999d").unwrap();
        let p = run(
            &backups,
            &objs,
            &Histories::default(),
            Policy::Window(window),
            "2026-01-03T12:00:00Z",
        );
        assert_eq!(ids(&p.kept_backups), ["A", "B", "C"]);
        assert_eq!(wal_left(&objs, &p).len(), 29);
    }

    /// Timeline 2 branched from timeline 1 at segment 15 (a restore to an
    /// earlier point, then promotion), below positions timeline 1 had reached.
    fn branched() -> (Vec<BackupManifest>, Vec<ObjectInfo>, Histories) {
        let backups = vec![
            backup("T1a", 1, 2, 3, "2026-01-01T00:00:00Z"),
            backup("T1b", 1, 10, 11, "2026-01-02T00:00:00Z"),
            backup("T1c", 1, 20, 21, "2026-01-03T00:00:00Z"),
            // On timeline 2, at lower LSNs than T1c, but newer.
            backup("T2a", 2, 16, 17, "2026-01-04T00:00:00Z"),
        ];
        let mut objs = objects(&backups, &[(1, 1, 25)], "2026-01-03T06:00:00Z");
        objs.extend(objects(&[], &[(2, 15, 19)], "2026-01-04T06:00:00Z"));
        objs.push(obj(
            "wal/00000002.history.zst".into(),
            "2026-01-03T12:00:00Z",
        ));
        objs.sort_by(|a, b| a.key.cmp(&b.key));
        let h = Histories(BTreeMap::from([(
            2,
            parse_history(&format!("1\t{}\tno recovery target", Lsn(15 * SEG + 0x60))).unwrap(),
        )]));
        (backups, objs, h)
    }

    #[test]
    fn a_new_timeline_does_not_make_new_backups_look_old() {
        let (backups, objs, h) = branched();
        let p = run(&backups, &objs, &h, Policy::Full(1), "2026-01-05T00:00:00Z");
        assert_eq!(
            ids(&p.kept_backups),
            ["T2a"],
            "the timeline-2 backup is the newest"
        );
        let left = wal_left(&objs, &p);
        assert_eq!(left.first().map(String::as_str), Some("00000002.history"));
        assert_eq!(left[1], seg(2, 16).to_string());
        assert_eq!(
            left.len(),
            1 + 4,
            "timeline 2 from its start_wal, all of timeline 1 gone"
        );

        let p = run(&backups, &objs, &h, Policy::Full(2), "2026-01-05T00:00:00Z");
        assert_eq!(ids(&p.kept_backups), ["T1c", "T2a"]);
        // T1c needs timeline 1 from segment 20 on and everything on the later timeline.
        let left = wal_left(&objs, &p);
        assert!(left.contains(&seg(1, 20).to_string()));
        assert!(!left.contains(&seg(1, 19).to_string()));
        assert!(
            left.contains(&seg(2, 15).to_string()),
            "later timelines stay whole"
        );
    }

    #[test]
    fn window_anchors_follow_the_history_of_each_live_timeline() {
        let (backups, objs, h) = branched();
        // Cutoff Jan 3 18:00: timeline 2 is live; the newest backup before the cutoff on
        // its history must end before the switch (segment 15): T1b, not T1c (T1c is on the
        // abandoned branch of timeline 1, which had no WAL stored after the cutoff).
        let p = run(
            &backups,
            &objs,
            &h,
            Policy::Window(chrono::Duration::hours(30)),
            "2026-01-05T00:00:00Z",
        );
        assert_eq!(ids(&p.kept_backups), ["T1b", "T2a"]);
        assert_eq!(
            p.wal_kept_from.get("00000001").map(String::as_str),
            Some(seg(1, 10).to_string().as_str())
        );
        // Timeline 1 still had WAL stored after the cutoff: its points in the window need T1c.
        let mut objs = objs;
        objs.push(obj(
            WalFile::Segment(seg(1, 26)).object_key(),
            "2026-01-04T01:00:00Z",
        ));
        let p = run(
            &backups,
            &objs,
            &h,
            Policy::Window(chrono::Duration::hours(30)),
            "2026-01-05T00:00:00Z",
        );
        assert_eq!(ids(&p.kept_backups), ["T1b", "T1c", "T2a"]);
    }

    #[test]
    fn an_upgrade_restarting_the_numbering_does_not_make_new_backups_look_old() {
        // The old system reached timeline 3 and high LSNs; the upgraded one starts over
        // on timeline 1 at low LSNs, with another system identifier.
        let mut old = vec![
            backup("O1", 3, 500, 501, "2026-01-01T00:00:00Z"),
            backup("O2", 3, 600, 601, "2026-01-02T00:00:00Z"),
        ];
        for b in &mut old {
            b.system_identifier = "111".into();
        }
        let mut new = vec![
            backup("N1", 1, 2, 3, "2026-01-03T00:00:00Z"),
            backup("N2", 1, 8, 9, "2026-01-04T00:00:00Z"),
        ];
        for b in &mut new {
            b.system_identifier = "222".into();
            b.pg_version_num = 160004;
        }
        let backups: Vec<BackupManifest> = old.iter().chain(&new).cloned().collect();
        let mut objs = objects(&old, &[(3, 500, 610)], "2026-01-02T06:00:00Z");
        objs.extend(objects(&new, &[(1, 1, 12)], "2026-01-04T06:00:00Z"));
        objs.sort_by(|a, b| a.key.cmp(&b.key));
        let h = Histories::default();
        let p = run(&backups, &objs, &h, Policy::Full(2), "2026-01-05T00:00:00Z");
        assert_eq!(ids(&p.kept_backups), ["N1", "N2"]);
        assert_eq!(p.deleted_backups, ["O1", "O2"]);
        let p = run(&backups, &objs, &h, Policy::Full(3), "2026-01-05T00:00:00Z");
        assert_eq!(ids(&p.kept_backups), ["O2", "N1", "N2"]);
        // A window reaching back to Jan 2 12:00 needs O2 (the newest before it), not O1.
        let p = run(
            &backups,
            &objs,
            &h,
            Policy::Window(chrono::Duration::hours(60)),
            "2026-01-05T00:00:00Z",
        );
        assert_eq!(ids(&p.kept_backups), ["O2", "N1", "N2"]);
        assert_eq!(p.deleted_backups, ["O1"]);
    }

    #[test]
    fn many_wal_objects_are_all_planned_for_deletion() {
        let backups = vec![
            backup("A", 1, 1, 2, "2026-01-01T00:00:00Z"),
            backup("B", 1, 3000, 3001, "2026-01-02T00:00:00Z"),
        ];
        let objs = objects(&backups, &[(1, 1, 3005)], "2026-01-02T00:00:00Z");
        let p = run(
            &backups,
            &objs,
            &Histories::default(),
            Policy::Full(1),
            "2026-01-03T00:00:00Z",
        );
        assert_eq!(p.deleted_wal_objects, 2999);
        assert_eq!(wal_left(&objs, &p).len(), 6);
    }

    /// The grammar's own table is in `walden_contract::duration`.
    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1d12h").unwrap().num_seconds(), 36 * 3_600);
        assert!(parse_duration("1.5d").is_err());
        assert_eq!(format_duration(chrono::Duration::hours(48)), "2d");
    }
}
