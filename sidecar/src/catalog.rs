//! The catalog: which base backups exist, what each holds, and how far the
//! archive lets you recover. A backup exists iff its `backup.json` exists; it
//! is written last, after every part is stored.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::lsn::Lsn;
use crate::storage::{Storage, StorageError};
use crate::wal::WalFile;

pub const MANIFEST_NAME: &str = "backup.json";
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// `backup.json`: everything needed to list, restore and retain one base backup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: u32,
    pub id: String,
    pub label: String,
    pub system_identifier: String,
    /// `server_version_num`, e.g. 150018.
    pub pg_version_num: u32,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// First WAL segment the restore needs.
    pub start_wal: String,
    /// Segment holding the end of the backup: recovery must reach it to be consistent.
    pub stop_wal: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub backup_label: String,
    pub tablespace_map: Option<String>,
    pub tablespaces: Vec<Tablespace>,
    pub parts: Vec<Part>,
    pub file_count: u64,
    /// Bytes of PGDATA (and tablespaces) read.
    pub logical_size: u64,
    /// Bytes stored, all parts together.
    pub stored_size: u64,
    pub compression: Compression,
    pub encryption: Option<String>,
    pub created_by: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tablespace {
    pub oid: u32,
    /// Where the tablespace lived on the backed-up server.
    pub location: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub name: String,
    pub stored_size: u64,
    /// Bytes of the uncompressed tar stream.
    pub content_size: u64,
    /// SHA-256 of the uncompressed tar stream (also in the object's trailer).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

impl BackupManifest {
    pub fn prefix(id: &str) -> String {
        format!("backups/{id}/")
    }

    pub fn key(id: &str) -> String {
        format!("backups/{id}/{MANIFEST_NAME}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{object} is not a valid backup manifest: {reason}")]
    Malformed { object: String, reason: String },
}

impl CatalogError {
    pub fn is_transient(&self) -> bool {
        matches!(self, CatalogError::Storage(e) if e.is_transient())
    }
}

/// A `backup.json` that cannot be read as a manifest: only its own backup is
/// affected (it is listed as damaged, never restored, never deleted by retention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DamagedBackup {
    pub id: String,
    pub object: String,
    pub reason: String,
}

/// Every backup folder with a manifest: the readable ones, oldest first, and the damaged.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub backups: Vec<BackupManifest>,
    pub damaged: Vec<DamagedBackup>,
}

/// Every complete backup, oldest first. One listing of `backups/`, then one
/// small read per backup: the cost does not depend on the amount of WAL.
/// A damaged manifest is logged and left out (see [`scan_backups`]).
pub async fn list_backups(storage: &dyn Storage) -> Result<Vec<BackupManifest>, CatalogError> {
    let catalog = scan_backups(storage).await?;
    for d in &catalog.damaged {
        tracing::warn!(backup = %d.id, "{}: damaged manifest, backup skipped: {}", d.object, d.reason);
    }
    Ok(catalog.backups)
}

/// Like [`list_backups`], with the damaged manifests named. Storage errors
/// still fail the whole scan: they say nothing about one backup.
pub async fn scan_backups(storage: &dyn Storage) -> Result<Catalog, CatalogError> {
    let mut out = Catalog::default();
    for obj in storage.list("backups/").await? {
        let Some(dir) = obj.key.strip_suffix(&format!("/{MANIFEST_NAME}")) else {
            continue;
        };
        if dir.contains('/') && dir.matches('/').count() == 1 {
            let id = dir.trim_start_matches("backups/");
            match read_manifest(storage, &obj.key).await {
                Ok(m) if m.id == id => out.backups.push(m),
                Ok(m) => out.damaged.push(DamagedBackup {
                    id: id.to_string(),
                    object: format!("{}/{}", storage.url(), obj.key),
                    reason: format!("it describes backup {:?}, not {id:?}", m.id),
                }),
                Err(CatalogError::Malformed { object, reason }) => {
                    out.damaged.push(DamagedBackup {
                        id: id.to_string(),
                        object,
                        reason,
                    })
                }
                Err(e) => return Err(e),
            }
        }
    }
    out.backups
        .sort_by(|a, b| (a.stop_time, &a.id).cmp(&(b.stop_time, &b.id)));
    Ok(out)
}

pub async fn read_manifest(
    storage: &dyn Storage,
    key: &str,
) -> Result<BackupManifest, CatalogError> {
    let object = format!("{}/{key}", storage.url());
    let download = storage.get(key).await?;
    let mut bytes = Vec::new();
    download
        .body
        .take(MAX_MANIFEST_BYTES)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| StorageError::io("read", object.clone(), e))?;
    serde_json::from_slice(&bytes).map_err(|e| CatalogError::Malformed {
        object,
        reason: e.to_string(),
    })
}

/// The newest archived WAL segment and when it was stored, found from the
/// newest `wal/` folder alone (a delimiter listing, then one folder).
pub async fn last_archived_segment(
    storage: &dyn Storage,
) -> Result<Option<(String, Option<DateTime<Utc>>)>, StorageError> {
    let folders = storage.list_folders("wal/").await?;
    for folder in folders.iter().rev() {
        let objects = storage.list(&format!("wal/{folder}/")).await?;
        let newest = objects
            .iter()
            .filter_map(|o| match WalFile::from_object_key(&o.key) {
                Some(WalFile::Segment(s)) => Some((s, o.modified)),
                _ => None,
            })
            .max_by_key(|(s, _)| *s);
        if let Some((seg, modified)) = newest {
            return Ok(Some((seg.to_string(), modified)));
        }
    }
    Ok(None)
}

/// How far back and forward the archive lets you recover.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryWindow {
    /// The earliest moment a restore can reach: the oldest backup's end.
    pub first_point: DateTime<Utc>,
    pub first_lsn: Lsn,
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
}

pub async fn recovery_window(
    storage: &dyn Storage,
    backups: &[BackupManifest],
) -> Result<Option<RecoveryWindow>, StorageError> {
    let Some(oldest) = backups.first() else {
        return Ok(None);
    };
    let last = last_archived_segment(storage).await?;
    Ok(Some(RecoveryWindow {
        first_point: oldest.stop_time,
        first_lsn: oldest.stop_lsn,
        last_archived_wal: last.as_ref().map(|(n, _)| n.clone()),
        last_archived_time: last.and_then(|(_, t)| t),
    }))
}

/// Where a restore should stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Replay everything archived.
    EndOfArchive,
    Time(DateTime<Utc>),
    Lsn(Lsn),
    /// A restore point made with `pg_create_restore_point`.
    Name(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::EndOfArchive => f.write_str("the end of the archive"),
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("no base backup in {url}: run `walden backup-push` first")]
    NoBackups { url: String },
    #[error("no backup {id:?} in {url}; available: {available}")]
    UnknownBackup {
        id: String,
        url: String,
        available: String,
    },
    #[error("backup {id} finished at {stop} (LSN {stop_lsn}), after the target {target}: it cannot reach it")]
    BackupAfterTarget {
        id: String,
        stop: String,
        stop_lsn: Lsn,
        target: String,
    },
    #[error(
        "no backup can reach {target}: the oldest backup, {oldest}, finished at {oldest_stop} (LSN {oldest_lsn}); \
         the recoverable window starts there"
    )]
    BeforeWindow {
        target: String,
        oldest: String,
        oldest_stop: String,
        oldest_lsn: Lsn,
    },
}

/// Picks the backup a restore starts from: the one asked for, or the newest
/// that finished before the target (backups sorted oldest first). For a
/// restore point, the oldest backup: it is the only one sure to start before it.
pub fn choose_backup<'a>(
    backups: &'a [BackupManifest],
    requested: Option<&str>,
    target: &Target,
    url: &str,
) -> Result<&'a BackupManifest, ChooseError> {
    let oldest = backups.first().ok_or_else(|| ChooseError::NoBackups {
        url: url.to_string(),
    })?;
    let reaches = |b: &BackupManifest| match target {
        Target::Time(t) => b.stop_time <= *t,
        Target::Lsn(l) => b.stop_lsn <= *l,
        Target::EndOfArchive | Target::Name(_) => true,
    };
    match requested.filter(|r| !r.eq_ignore_ascii_case("LATEST")) {
        Some(id) => {
            let b =
                backups
                    .iter()
                    .find(|b| b.id == id)
                    .ok_or_else(|| ChooseError::UnknownBackup {
                        id: id.to_string(),
                        url: url.to_string(),
                        available: backups
                            .iter()
                            .map(|b| b.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
            if !reaches(b) {
                return Err(ChooseError::BackupAfterTarget {
                    id: b.id.clone(),
                    stop: b.stop_time.to_rfc3339(),
                    stop_lsn: b.stop_lsn,
                    target: target.to_string(),
                });
            }
            Ok(b)
        }
        // When a restore point was made is not known without reading the WAL,
        // and the newest backup may start after it: the oldest surely precedes it.
        None if matches!(target, Target::Name(_)) => Ok(oldest),
        None => {
            backups
                .iter()
                .rev()
                .find(|b| reaches(b))
                .ok_or_else(|| ChooseError::BeforeWindow {
                    target: target.to_string(),
                    oldest: oldest.id.clone(),
                    oldest_stop: oldest.stop_time.to_rfc3339(),
                    oldest_lsn: oldest.stop_lsn,
                })
        }
    }
}

#[cfg(test)]
pub(crate) fn sample_manifest(id: &str, stop_time: &str, stop_lsn: u64) -> BackupManifest {
    let stop_time: DateTime<Utc> = stop_time.parse().expect("time");
    BackupManifest {
        format: 1,
        id: id.into(),
        label: format!("walden {id}"),
        system_identifier: "1".into(),
        pg_version_num: 150018,
        timeline: 1,
        start_lsn: Lsn(stop_lsn - 0x100),
        stop_lsn: Lsn(stop_lsn),
        start_wal: "000000010000000000000001".into(),
        stop_wal: "000000010000000000000001".into(),
        start_time: stop_time - chrono::Duration::seconds(10),
        stop_time,
        backup_label: String::new(),
        tablespace_map: None,
        tablespaces: vec![],
        parts: vec![],
        file_count: 0,
        logical_size: 0,
        stored_size: 0,
        compression: Compression {
            algorithm: "zstd".into(),
            level: 1,
        },
        encryption: None,
        created_by: "test".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Target {
        Target::Time(s.parse().unwrap())
    }

    #[test]
    fn chooses_the_newest_backup_that_reaches_the_target() {
        let backups = vec![
            sample_manifest("A", "2026-01-01T10:00:00Z", 0x1000),
            sample_manifest("B", "2026-01-01T12:00:00Z", 0x2000),
            sample_manifest("C", "2026-01-01T14:00:00Z", 0x3000),
        ];
        let cases: Vec<(Option<&str>, Target, Result<&str, &str>)> = vec![
            (None, Target::EndOfArchive, Ok("C")),
            (Some("LATEST"), Target::EndOfArchive, Ok("C")),
            (None, t("2026-01-01T13:00:00Z"), Ok("B")),
            (None, t("2026-01-01T12:00:00Z"), Ok("B")),
            (None, t("2026-01-01T11:59:59Z"), Ok("A")),
            (None, t("2026-01-01T09:00:00Z"), Err("the oldest backup, A")),
            (None, Target::Lsn(Lsn(0x2fff)), Ok("B")),
            (
                None,
                Target::Lsn(Lsn(0xfff)),
                Err("recoverable window starts"),
            ),
            (None, Target::Name("before-upgrade".into()), Ok("A")),
            (
                Some("LATEST"),
                Target::Name("before-upgrade".into()),
                Ok("A"),
            ),
            (Some("B"), Target::Name("before-upgrade".into()), Ok("B")),
            (Some("A"), t("2026-01-01T13:00:00Z"), Ok("A")),
            (
                Some("C"),
                t("2026-01-01T13:00:00Z"),
                Err("after the target"),
            ),
            (Some("C"), Target::Lsn(Lsn(0x2000)), Err("after the target")),
            (Some("Z"), Target::EndOfArchive, Err("available: A, B, C")),
        ];
        for (requested, target, want) in cases {
            let got = choose_backup(&backups, requested, &target, "file:///x")
                .map(|b| b.id.as_str())
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok(id), Ok(w)) => assert_eq!(id, w, "{requested:?} {target}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{requested:?} {target}: {e}"),
                (got, want) => panic!("{requested:?} {target}: got {got:?}, want {want:?}"),
            }
        }
        let err = choose_backup(&[], None, &Target::EndOfArchive, "s3://b/p").unwrap_err();
        assert!(err.to_string().contains("no base backup in s3://b/p"));
    }

    #[tokio::test]
    async fn lists_complete_backups_and_finds_the_last_segment_from_one_folder() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::storage::FileStorage::new(dir.path().to_path_buf());
        let put = |k: &'static str, body: Vec<u8>| {
            let s = s.clone();
            async move {
                s.create(k, Box::pin(std::io::Cursor::new(body)))
                    .await
                    .unwrap();
            }
        };
        let b1 = sample_manifest("20260101T100000Z", "2026-01-01T10:00:00Z", 0x1000);
        let b2 = sample_manifest("20260101T120000Z", "2026-01-01T12:00:00Z", 0x2000);
        put(
            "backups/20260101T120000Z/backup.json",
            serde_json::to_vec(&b2).unwrap(),
        )
        .await;
        put(
            "backups/20260101T100000Z/backup.json",
            serde_json::to_vec(&b1).unwrap(),
        )
        .await;
        // an interrupted backup: parts but no manifest
        put("backups/20260101T130000Z/part-00001.tar.zst", vec![1]).await;
        for k in [
            "wal/0000000100000000/000000010000000000000001.zst",
            "wal/0000000100000000/0000000100000000000000FF.zst",
            "wal/0000000100000001/000000010000000100000003.zst",
            "wal/0000000200000001/000000020000000100000003.00000028.backup.zst",
            "wal/00000002.history.zst",
        ] {
            put(k, vec![0]).await;
        }
        let listed = list_backups(&s).await.unwrap();
        assert_eq!(
            listed.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
            ["20260101T100000Z", "20260101T120000Z"]
        );
        let window = recovery_window(&s, &listed).await.unwrap().unwrap();
        assert_eq!(window.first_lsn, Lsn(0x1000));
        // The timeline-2 folder holds no segment yet: the newest segment is on timeline 1.
        assert_eq!(
            window.last_archived_wal.as_deref(),
            Some("000000010000000100000003")
        );
        assert!(window.last_archived_time.is_some());
    }
}
