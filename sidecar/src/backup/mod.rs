//! `backup-push`: a hot base backup of a running server, the way WAL-E and
//! WAL-G take them: `pg_backup_start` over a libpq connection, PGDATA read
//! from disk and streamed as tar parts through zstd to storage in parallel,
//! `pg_backup_stop`, then `backup.json` written last, only once every part is
//! stored and the WAL that makes the backup consistent is in the archive.

pub mod lease;
pub mod parts;
pub mod walk;

use std::collections::HashMap;
use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::catalog::{BackupManifest, CatalogError, Compression, Part, MANIFEST_NAME};
use crate::lsn::Lsn;
use crate::object::SealOptions;
use crate::pg::{self, PgError};
use crate::repo::{self, RepoError, RepoIdentity};
use crate::storage::{Created, ObjectInfo, Storage, StorageError};
use crate::wal::{SegmentName, WalFile};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{path}: {source}")]
    Local { path: String, source: io::Error },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl BackupError {
    /// The tar side stopped because the upload had already failed.
    pub fn is_upload_aborted(&self) -> bool {
        matches!(self, BackupError::Local { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The id to claim; by default the start time (with a suffix when taken).
    pub id: Option<String>,
    /// The data directory on disk; by default the server's `data_directory`.
    pub pgdata: Option<PathBuf>,
    /// A libpq connection string; by default the `PG*` environment.
    pub conninfo: Option<String>,
    pub part_size: u64,
    pub parallelism: usize,
    pub seal: SealOptions,
    /// How long to wait for the backup's last WAL segment to reach the archive;
    /// `None` skips the check (WAL archived elsewhere).
    pub wal_wait: Option<Duration>,
}

/// The latest checkpoint location recorded in `global/pg_control` (its
/// fifth field, at the same offset in every supported PostgreSQL version).
fn control_checkpoint(pgdata: &Path) -> io::Result<u64> {
    let bytes = std::fs::read(pgdata.join("global/pg_control"))?;
    let field: [u8; 8] = bytes
        .get(32..40)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| io::Error::other("pg_control is too short"))?;
    Ok(u64::from_le_bytes(field))
}

/// Whether the directory's checkpoint is the server's: a copy of the data
/// directory (same system identifier) stops at an older checkpoint than the
/// one `pg_backup_start` has just made.
pub fn same_checkpoint(on_disk: &[u64], server: Lsn) -> bool {
    on_disk.contains(&server.0)
}

/// After `pg_backup_start` (which checkpoints), refuses a directory whose
/// `pg_control` does not hold the server's latest checkpoint: it is not the
/// live data directory, and a backup of it could not be restored.
async fn check_live_directory(
    client: &tokio_postgres::Client,
    pgdata: &Path,
) -> Result<(), BackupError> {
    let local = |source: io::Error| BackupError::Local {
        path: pgdata.join("global/pg_control").display().to_string(),
        source,
    };
    // Read before and after asking: a checkpoint in between changes one of them.
    let before = control_checkpoint(pgdata).map_err(local)?;
    let server: String = client
        .query_one(
            "SELECT checkpoint_lsn::text FROM pg_control_checkpoint()",
            &[],
        )
        .await
        .map_err(|source| PgError::Query {
            what: "pg_control_checkpoint",
            source,
        })?
        .get(0);
    let server: Lsn = server.parse().map_err(|detail| PgError::Unexpected {
        what: "pg_control_checkpoint",
        detail,
    })?;
    let after = control_checkpoint(pgdata).map_err(local)?;
    if same_checkpoint(&[before, after], server) {
        return Ok(());
    }
    Err(BackupError::Invalid(format!(
        "{} is not the data directory of the server connected to: its pg_control records checkpoint {}, \
         the server's latest is {server} (a stale copy of the same database?); give --pgdata the live data directory",
        pgdata.display(),
        Lsn(after)
    )))
}

/// Parses `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` and
/// `START TIMELINE: 1` out of a backup label.
pub fn parse_label(label: &str) -> Option<(Lsn, String, u32)> {
    let mut lsn = None;
    let mut file = None;
    let mut timeline = None;
    for line in label.lines() {
        if let Some(rest) = line.strip_prefix("START WAL LOCATION: ") {
            let (l, f) = rest.split_once(" (file ")?;
            lsn = l.trim().parse().ok();
            file = Some(f.trim_end_matches(')').to_string());
        } else if let Some(t) = line.strip_prefix("START TIMELINE: ") {
            timeline = t.trim().parse().ok();
        }
    }
    Some((lsn?, file?, timeline?))
}

/// Whether `id` can name a backup: a storage key part (letters, digits,
/// `.`, `_`, `-`; 1 to 64 characters, not starting with `.` or `-`) that is
/// not the `LATEST` keyword of `restore --backup`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    let ok_start = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if id.len() > 64 || !ok_chars || !ok_start {
        return Err(format!(
            "backup id {:?} is not valid: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            id.chars().take(80).collect::<String>()
        ));
    }
    if id.eq_ignore_ascii_case("latest") {
        return Err(
            "backup id LATEST is reserved (restore --backup LATEST means the newest)".into(),
        );
    }
    Ok(())
}

/// Claims a backup id: an empty folder whose first lease this process
/// created (write-once, so two backups starting at once never share a folder).
/// A `wanted` id is claimed as it is, or refused when taken.
async fn claim_id(
    storage: &dyn Storage,
    start: DateTime<Utc>,
    wanted: Option<&str>,
) -> Result<String, BackupError> {
    if let Some(id) = wanted {
        check_id(id).map_err(BackupError::Invalid)?;
        if storage.list(&BackupManifest::prefix(id)).await?.is_empty()
            && lease::create(storage, id, 0).await? == Created::Created
        {
            return Ok(id.to_string());
        }
        return Err(BackupError::Conflict(format!(
            "backup id {id} is already taken in {}",
            storage.url()
        )));
    }
    let base = start.format("%Y%m%dT%H%M%SZ").to_string();
    for n in 1..100 {
        let id = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        if storage.list(&BackupManifest::prefix(&id)).await?.is_empty()
            && lease::create(storage, &id, 0).await? == Created::Created
        {
            return Ok(id);
        }
    }
    Err(BackupError::Conflict(format!(
        "too many backups started at {base}"
    )))
}

/// Takes a base backup; returns its manifest once `backup.json` is stored.
pub async fn push(
    storage: Arc<dyn Storage>,
    opts: &BackupOptions,
) -> Result<BackupManifest, BackupError> {
    let started = Instant::now();
    let cfg = pg::config(opts.conninfo.as_deref())?;
    let client = pg::connect(&cfg).await?;
    let info = pg::server_info(&client).await?;
    let pgdata = opts
        .pgdata
        .clone()
        .unwrap_or_else(|| PathBuf::from(&info.data_directory));
    // To be sure the directory read is the data directory of the server backed up.
    match crate::pg::control_system_identifier(&pgdata) {
        Ok(id) if id == info.system_identifier => {}
        Ok(id) => {
            return Err(BackupError::Invalid(format!(
                "{} holds the data of database {id}, but the server connected to is database {}: \
                 give --pgdata the data directory of that server",
                pgdata.display(),
                info.system_identifier
            )))
        }
        Err(e) => {
            return Err(BackupError::Invalid(format!(
                "cannot read {}/global/pg_control ({e}): backup-push must run where the server's data directory \
                 is mounted; give it with --pgdata or PGDATA",
                pgdata.display()
            )))
        }
    }

    let identity = RepoIdentity::new(
        info.system_identifier,
        Some(info.version_num / 10000),
        info.segment_size,
    );
    repo::ensure_identity(
        storage.as_ref(),
        identity,
        &format!(
            "a base backup of the database with system identifier {}",
            info.system_identifier
        ),
    )
    .await?;

    let modern = info.version_num >= 150000;
    let now = Utc::now();
    let id = claim_id(storage.as_ref(), now, opts.id.as_deref()).await?;
    let span = tracing::info_span!("backup_push", id = %id);
    let (stop_lease, lease_stopped) = watch::channel(false);
    let renewing = tokio::spawn(lease::renew_until(
        storage.clone(),
        id.clone(),
        lease_stopped,
    ));
    let taken = take(
        &storage, &client, &info, &pgdata, &id, opts, modern, started,
    )
    .instrument(span.clone())
    .await;
    let _ = stop_lease.send(true);
    let last_lease = renewing.await.unwrap_or_else(|_| lease::lease_key(&id, 0));
    match taken {
        Ok(manifest) => {
            if let Err(e) = storage.delete(&[last_lease]).await {
                tracing::warn!(parent: &span, error = %e, "backup complete, but its lease could not be deleted (harmless)");
            }
            Ok(manifest)
        }
        Err(e) => {
            discard(storage.as_ref(), &id).instrument(span).await;
            Err(e)
        }
    }
}

/// Deletes what a failed backup stored: everything in its folder, which it
/// claimed for itself (the manifest first, so nothing lists a half-deleted backup).
async fn discard(storage: &dyn Storage, id: &str) {
    let mut keys: Vec<String> = match storage.list(&BackupManifest::prefix(id)).await {
        Ok(objects) => objects.into_iter().map(|o| o.key).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the failed backup's objects; retention removes them later");
            return;
        }
    };
    keys.sort_by_key(|k| !k.ends_with(&format!("/{MANIFEST_NAME}")));
    match storage.delete(&keys).await {
        Ok(()) => tracing::info!(objects = keys.len(), "deleted the failed backup's objects"),
        Err(e) => {
            tracing::warn!(error = %e, "could not delete the failed backup's objects; retention removes them later")
        }
    }
}

/// Parts the manifest lists that storage does not hold with their recorded size.
async fn missing_parts(
    storage: &dyn Storage,
    id: &str,
    parts: &[Part],
) -> Result<Vec<String>, BackupError> {
    let stored: HashMap<String, ObjectInfo> = storage
        .list(&BackupManifest::prefix(id))
        .await?
        .into_iter()
        .map(|o| (o.key.clone(), o))
        .collect();
    let mut missing = Vec::new();
    for p in parts {
        let held = match stored.get(&format!("{}{}", BackupManifest::prefix(id), p.name)) {
            Some(object) => storage.written_size(object).await? == p.stored_size,
            None => false,
        };
        if !held {
            missing.push(p.name.clone());
        }
    }
    Ok(missing)
}

fn parts_gone(storage: &dyn Storage, id: &str, missing: &[String]) -> BackupError {
    BackupError::Invalid(format!(
        "backup {id}: {} of its parts ({}) are no longer in {} with their recorded size (deleted while the backup ran?); \
         the backup is not listed",
        missing.len(),
        missing.join(", "),
        storage.url()
    ))
}

/// The backup itself, between claiming the id and releasing the lease.
#[allow(clippy::too_many_arguments)]
async fn take(
    storage: &Arc<dyn Storage>,
    client: &tokio_postgres::Client,
    info: &pg::ServerInfo,
    pgdata: &Path,
    id: &str,
    opts: &BackupOptions,
    modern: bool,
    started: Instant,
) -> Result<BackupManifest, BackupError> {
    let start_sql = if modern {
        "SELECT pg_backup_start($1, true)::text, clock_timestamp()"
    } else {
        "SELECT pg_start_backup($1, true, false)::text, clock_timestamp()"
    };
    let label = format!("walden {id}");
    let row = client
        .query_one(start_sql, &[&label])
        .await
        .map_err(|source| PgError::Query {
            what: "pg_backup_start",
            source,
        })?;
    let start_time: DateTime<Utc> = row.get(1);
    check_live_directory(client, pgdata).await?;
    tracing::info!(pgdata = %pgdata.display(), "backup started");

    let (tx, rx) = mpsc::channel(1024);
    let root = pgdata.to_path_buf();
    let walker = tokio::task::spawn_blocking(move || walk::walk(&root, tx));
    let part_opts = parts::PartOptions {
        part_size: opts.part_size,
        parallelism: opts.parallelism,
        seal: opts.seal,
    };
    let uploaded = parts::upload(storage.clone(), BackupManifest::prefix(id), rx, part_opts).await;
    let walked = walker
        .await
        .map_err(|e| BackupError::Internal(format!("walker failed: {e}")))?;
    let (parts, totals) = uploaded?;
    let tablespaces = walked.map_err(|source| BackupError::Local {
        path: pgdata.display().to_string(),
        source,
    })?;

    let stop_sql = if modern {
        "SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_backup_stop(false)"
    } else {
        "SELECT lsn::text, labelfile, spcmapfile, clock_timestamp() FROM pg_stop_backup(false, false)"
    };
    let row = client
        .query_one(stop_sql, &[])
        .await
        .map_err(|source| PgError::Query {
            what: "pg_backup_stop",
            source,
        })?;
    let stop_lsn: String = row.get(0);
    let backup_label: String = row.get(1);
    let tablespace_map: Option<String> = row.get(2);
    let stop_time: DateTime<Utc> = row.get(3);
    let unexpected = |detail: String| PgError::Unexpected {
        what: "pg_backup_stop",
        detail,
    };
    let stop_lsn: Lsn = stop_lsn.parse().map_err(unexpected)?;
    let (start_lsn, start_wal, timeline) = parse_label(&backup_label)
        .ok_or_else(|| unexpected(format!("a backup label without a start: {backup_label:?}")))?;
    let stop_wal = SegmentName::holding_end(timeline, stop_lsn.0, info.segment_size).to_string();

    match opts.wal_wait {
        Some(wait) => wait_for_wal(storage.as_ref(), &stop_wal, wait).await?,
        None => {
            tracing::warn!(segment = %stop_wal, "not checking that the backup's WAL is archived here (--no-archive-check)")
        }
    }

    let stored_size = parts.iter().map(|p| p.stored_size).sum();
    let manifest = BackupManifest {
        format: repo::FORMAT,
        id: id.to_string(),
        label,
        system_identifier: info.system_identifier.to_string(),
        pg_version_num: info.version_num,
        timeline,
        start_lsn,
        stop_lsn,
        start_wal,
        stop_wal,
        start_time,
        stop_time,
        backup_label,
        tablespace_map: tablespace_map.filter(|m| !m.is_empty()),
        tablespaces,
        parts,
        file_count: totals.files,
        logical_size: totals.logical,
        stored_size,
        compression: Compression {
            algorithm: "zstd".into(),
            level: opts.seal.level,
        },
        encryption: repo::require(storage.as_ref())
            .await?
            .encryption_key_fingerprint,
        created_by: format!("walden {}", env!("CARGO_PKG_VERSION")),
    };
    // A backup is listed iff backup.json exists: never write it for parts that are gone.
    let missing = missing_parts(storage.as_ref(), id, &manifest.parts).await?;
    if !missing.is_empty() {
        return Err(parts_gone(storage.as_ref(), id, &missing));
    }
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| BackupError::Internal(e.to_string()))?;
    match storage
        .create(&BackupManifest::key(id), Box::pin(Cursor::new(json)))
        .await?
    {
        Created::Created => {}
        Created::AlreadyExists => {
            return Err(BackupError::Conflict(format!(
                "{}/{} already exists",
                storage.url(),
                BackupManifest::key(id)
            )))
        }
    }
    // And once more after: a deletion racing the check must not leave a listed, broken backup.
    let missing = missing_parts(storage.as_ref(), id, &manifest.parts).await?;
    if !missing.is_empty() {
        return Err(parts_gone(storage.as_ref(), id, &missing));
    }
    tracing::info!(
        files = manifest.file_count,
        bytes = manifest.logical_size,
        stored = manifest.stored_size,
        parts = manifest.parts.len(),
        seconds = started.elapsed().as_secs_f64(),
        "backup complete"
    );
    Ok(manifest)
}

/// Waits until the segment that completes the backup is archived: without it
/// the backup cannot be restored, so it is not listed.
async fn wait_for_wal(
    storage: &dyn Storage,
    segment: &str,
    wait: Duration,
) -> Result<(), BackupError> {
    let key = WalFile::parse(segment)
        .map(|f| f.object_key())
        .ok_or_else(|| BackupError::Internal(format!("bad segment name {segment}")))?;
    let deadline = Instant::now() + wait;
    loop {
        if storage.head(&key).await?.is_some() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(BackupError::Invalid(format!(
                "WAL segment {segment}, which this backup needs to be consistent, did not reach {} within {}s: \
                 is archive_command = 'walden wal-push %p' set up with this storage? The backup is not listed",
                storage.url(),
                wait.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_ids_table() {
        for ok in [
            "20261203T030000Z",
            "20261203T030000Z-2",
            "before-migration",
            "v1.2_3",
        ] {
            assert_eq!(check_id(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "not valid"),
            ("a/b", "not valid"),
            ("../x", "not valid"),
            ("-x", "not valid"),
            (".x", "not valid"),
            ("a b", "not valid"),
            ("latest", "reserved"),
            ("LATEST", "reserved"),
        ] {
            let e = check_id(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert!(check_id(&"x".repeat(65)).is_err());
        assert!(check_id(&"x".repeat(64)).is_ok());
    }

    #[test]
    fn parses_backup_labels() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
                     CHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\n\
                     START TIME: 2026-11-24 01:00:00 UTC\nLABEL: walden x\nSTART TIMELINE: 3\n";
        assert_eq!(
            parse_label(label),
            Some((Lsn(0x200_0028), "000000010000000000000002".into(), 3))
        );
        assert_eq!(parse_label("garbage"), None);
    }

    /// Two backups starting in the same second get two folders: the claim
    /// (the first lease) is write-once, and a folder holding anything is skipped.
    #[tokio::test]
    async fn each_backup_claims_a_folder_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let storage = crate::storage::FileStorage::new(dir.path().to_path_buf());
        let t: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        // A folder left by a killed backup without a lease (an older walden).
        storage
            .create(
                "backups/20260101T000000Z-3/part-00001.tar.zst",
                Box::pin(Cursor::new(b"x".to_vec())),
            )
            .await
            .unwrap();
        let (a, b) = tokio::join!(claim_id(&storage, t, None), claim_id(&storage, t, None));
        let mut ids = vec![a.unwrap(), b.unwrap()];
        ids.sort();
        assert_eq!(ids, ["20260101T000000Z", "20260101T000000Z-2"]);
        let c = claim_id(&storage, t, None).await.unwrap();
        assert_eq!(c, "20260101T000000Z-4");
        // An id asked for is claimed as it is, once; a taken one is refused.
        assert_eq!(
            claim_id(&storage, t, Some("nightly")).await.unwrap(),
            "nightly"
        );
        let taken = claim_id(&storage, t, Some("nightly")).await.unwrap_err();
        assert!(
            taken.to_string().contains("nightly is already taken"),
            "{taken}"
        );
        let left = claim_id(&storage, t, Some("20260101T000000Z-3"))
            .await
            .unwrap_err();
        assert!(left.to_string().contains("already taken"), "{left}");
        for id in [
            "20260101T000000Z",
            "20260101T000000Z-2",
            "20260101T000000Z-4",
        ] {
            assert!(storage
                .head(&lease::lease_key(id, 0))
                .await
                .unwrap()
                .is_some());
        }
    }

    #[test]
    fn a_directory_is_live_only_with_the_servers_checkpoint() {
        let server = Lsn(0x300_0060);
        assert!(same_checkpoint(&[0x300_0060, 0x300_0060], server));
        // A checkpoint finished between the two reads.
        assert!(same_checkpoint(&[0x200_0060, 0x300_0060], server));
        // A stale copy stops at an older checkpoint.
        assert!(!same_checkpoint(&[0x200_0060, 0x200_0060], server));
    }
}
