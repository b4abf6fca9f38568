//! Parallel archiving: a `wal-push` of one file also starts uploads of the
//! next files PostgreSQL has marked `.ready`, so that its later calls find
//! them stored and return at once.
//!
//! A file is answered "archived" only after storage acknowledged it durably;
//! it is then appended to the archive log (fsynced), from which later
//! requests for it are answered at once. Uploads started ahead of
//! PostgreSQL's request are the same `wal::push` it would have run: the same
//! checks (system identifier, position, identical-or-conflict), the same
//! durability. If the daemon dies, nothing half-done is ever reported: the
//! log only holds finished uploads, and PostgreSQL asks again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tracing::Instrument;

use super::lock;
use super::metrics::{AnswerLabel, Metrics};
use super::state::{ArchivedLog, Record, Stamp};
use crate::repo::RepoError;
use crate::storage::Storage;
use crate::wal::{self, PushOptions, WalError, WalFile};
use walden_contract::api::IdentityMismatch;

/// A failed upload is not retried ahead of PostgreSQL's own request for this long.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(5);

type Outcome = Result<(), String>;

/// The archiving facts `GET /v1/status` reports.
#[derive(Debug, Clone, Default)]
pub struct ArchiveStatus {
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub archived_count: u64,
    pub failed_count: u64,
    /// The archive refuses this server as another database (see
    /// [`IdentityMismatch`]); cleared by the next stored file.
    pub identity_mismatch: Option<IdentityMismatch>,
}

#[derive(Default)]
struct Inner {
    in_flight: HashMap<String, watch::Receiver<Option<Outcome>>>,
    cooldown: HashMap<String, Instant>,
    /// The pg_wal directory PostgreSQL's requests came from.
    pg_wal: Option<PathBuf>,
    status: ArchiveStatus,
}

pub struct Archiver {
    storage: Arc<dyn Storage>,
    /// `<PGDATA>/pg_wal` when PGDATA is known: the only directory archived from.
    pg_wal_root: Option<PathBuf>,
    /// The S3 endpoint, which with the storage URL says where the archive is.
    s3_endpoint: Option<String>,
    opts: PushOptions,
    parallelism: usize,
    log: Arc<Mutex<ArchivedLog>>,
    inner: Mutex<Inner>,
    metrics: Metrics,
    stopping: AtomicBool,
    /// Set once an upload succeeded: the repository identity (`walden.json`)
    /// exists, so parallel uploads no longer race to create it.
    stored_once: AtomicBool,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0:?} is not a WAL file name PostgreSQL archives")]
    InvalidName(String),
    #[error("cannot read {path}: {source}")]
    Stat {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Failed(String),
    #[error("the daemon is shutting down; PostgreSQL will retry")]
    ShuttingDown,
    #[error("refusing to archive {path}: {reason}")]
    Outside { path: String, reason: String },
}

/// Whether `path` (as the client sent it) is a file of the pg_wal directory
/// the daemon archives: `allowed` (PGDATA's, or the first one PostgreSQL's
/// requests came from), compared after resolving symlinks. Anything else is
/// refused, so that the socket cannot be used to read other files.
pub fn confine(path: &Path, allowed: Option<&Path>) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err("the path is not absolute".into());
    }
    let parent = path.parent().ok_or("the path has no directory")?;
    if parent.file_name().and_then(|n| n.to_str()) != Some("pg_wal") {
        return Err("it is not in a pg_wal directory".into());
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("it is not a regular file".into());
    }
    let real = std::fs::canonicalize(parent).map_err(|e| e.to_string())?;
    if let Some(allowed) = allowed {
        let allowed_real =
            std::fs::canonicalize(allowed).map_err(|e| format!("{}: {e}", allowed.display()))?;
        if real != allowed_real {
            return Err(format!(
                "only files of {} are archived here",
                allowed.display()
            ));
        }
    }
    Ok(real)
}

async fn stamp(path: &Path) -> Result<Stamp, PushError> {
    tokio::fs::metadata(path)
        .await
        .map(|m| Stamp::of(&m))
        .map_err(|source| PushError::Stat {
            path: path.display().to_string(),
            source,
        })
}

/// PostgreSQL's archiving order: history files first, then oldest first.
fn archive_order(name: &str) -> (u8, &str) {
    (u8::from(!name.ends_with(".history")), name)
}

impl Archiver {
    pub fn new(
        storage: Arc<dyn Storage>,
        pg_wal_root: Option<PathBuf>,
        s3_endpoint: Option<String>,
        opts: PushOptions,
        parallelism: usize,
        log: ArchivedLog,
        metrics: Metrics,
    ) -> Arc<Self> {
        let stored_once = AtomicBool::new(!log.is_empty());
        let mut status = ArchiveStatus::default();
        if let Some(r) = log.newest_segment() {
            status.last_archived_wal = Some(r.name.clone());
            status.last_archived_time = Some(r.archived_at);
            metrics.set_last_archived(&r.name, r.archived_at);
        }
        Arc::new(Self {
            storage,
            pg_wal_root,
            s3_endpoint,
            opts,
            parallelism: parallelism.max(1),
            log: Arc::new(Mutex::new(log)),
            inner: Mutex::new(Inner {
                status,
                ..Inner::default()
            }),
            metrics,
            stopping: AtomicBool::new(false),
            stored_once,
        })
    }

    pub fn status(&self) -> ArchiveStatus {
        lock(&self.inner).status.clone()
    }

    /// The pg_wal directory archived from (learned from requests), if any.
    pub fn pg_wal(&self) -> Option<PathBuf> {
        lock(&self.inner).pg_wal.clone()
    }

    pub fn in_flight(&self) -> usize {
        lock(&self.inner).in_flight.len()
    }

    /// Handles PostgreSQL's `wal-push <path>`: returns once `path` is durably archived.
    pub async fn push(self: &Arc<Self>, path: PathBuf) -> Result<(), PushError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| WalFile::parse(n).is_some())
            .ok_or_else(|| PushError::InvalidName(path.display().to_string()))?
            .to_string();
        let allowed = self.pg_wal_root.clone().or_else(|| self.pg_wal());
        let dir = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || confine(&path, allowed.as_deref()))
                .await
                .map_err(|e| PushError::Failed(e.to_string()))?
        }
        .map_err(|reason| PushError::Outside {
            path: path.display().to_string(),
            reason,
        })?;
        let path = dir.join(&name);
        let pg_wal = Some(dir.clone());
        lock(&self.inner).pg_wal.get_or_insert(dir);
        let current = stamp(&path).await?;
        if lock(&self.log).remembers(&name, &current) {
            self.answer("remembered");
            tracing::debug!(file = %name, "already archived (remembered)");
            if let Some(dir) = pg_wal {
                self.fill(&dir).await;
            }
            return Ok(());
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(PushError::ShuttingDown);
        }
        let rx = self.start(path, name.clone(), current);
        if let Some(dir) = pg_wal {
            self.fill(&dir).await;
        }
        let result = wait(rx).await;
        self.answer(if result.is_ok() { "uploaded" } else { "failed" });
        result.map_err(PushError::Failed)
    }

    fn answer(&self, answer: &'static str) {
        self.metrics
            .wal_push_answers
            .get_or_create(&AnswerLabel { answer })
            .inc();
    }

    /// Starts uploading `name` unless an upload of it is already running.
    fn start(
        self: &Arc<Self>,
        path: PathBuf,
        name: String,
        before: Stamp,
    ) -> watch::Receiver<Option<Outcome>> {
        let mut inner = lock(&self.inner);
        if let Some(rx) = inner.in_flight.get(&name) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        inner.in_flight.insert(name.clone(), rx.clone());
        self.metrics
            .wal_uploads_in_flight
            .set(inner.in_flight.len() as i64);
        drop(inner);
        let me = self.clone();
        // A root span: uploads started by `fill` from inside another upload
        // would otherwise nest one level deeper each, without bound.
        let span = tracing::info_span!(parent: None, "archive", file = %name);
        tokio::spawn(
            async move {
                let outcome = me.store(&path, before).await;
                if outcome.is_ok() {
                    me.stored_once.store(true, Ordering::SeqCst);
                    // Durable in storage: the waiting client may hear so now. The
                    // name stays in flight until it is remembered, so no second
                    // upload of it starts meanwhile.
                    let _ = tx.send(Some(Ok(())));
                    if let Err(e) = me.remember(&name, before).await {
                        tracing::warn!(error = %e, "archived but not remembered; a later request pushes it again");
                    }
                }
                me.finish(&name, &outcome);
                if let Err(e) = &outcome {
                    let _ = tx.send(Some(Err(e.clone())));
                } else if let Some(dir) = path.parent() {
                    me.fill(dir).await;
                }
            }
            .instrument(span),
        );
        rx
    }

    /// Books an upload's outcome; the in-flight entry goes before waiters hear of it.
    fn finish(&self, name: &str, outcome: &Outcome) {
        let mut inner = lock(&self.inner);
        inner.in_flight.remove(name);
        self.metrics
            .wal_uploads_in_flight
            .set(inner.in_flight.len() as i64);
        let now = Utc::now();
        match outcome {
            Ok(()) => {
                inner.cooldown.remove(name);
                inner.status.archived_count += 1;
                self.metrics.wal_archived.inc();
                let is_segment = name.len() == 24;
                let newer = inner
                    .status
                    .last_archived_wal
                    .as_deref()
                    .is_none_or(|last| last <= name);
                if is_segment && newer {
                    inner.status.last_archived_wal = Some(name.to_string());
                    inner.status.last_archived_time = Some(now);
                    self.metrics.set_last_archived(name, now);
                }
            }
            Err(e) => {
                inner.cooldown.insert(name.to_string(), Instant::now());
                inner.status.failed_count += 1;
                inner.status.last_failed_wal = Some(name.to_string());
                inner.status.last_failed_time = Some(now);
                inner.status.last_error = Some(e.clone());
                self.metrics.wal_archive_failures.inc();
                tracing::error!(error = %e, "archiving failed; PostgreSQL will retry");
            }
        }
    }

    /// Uploads one file; `Ok` means durable in storage, with exactly the
    /// content the file had when the request was taken.
    async fn store(&self, path: &Path, before: Stamp) -> Outcome {
        let pushed = wal::push(self.storage.as_ref(), path, &self.opts).await;
        self.note_identity(pushed.as_ref().err());
        pushed.map_err(|e| format!("{e:#}"))?;
        let after = stamp(path).await.map_err(|e| e.to_string())?;
        if after != before {
            return Err(format!(
                "{} changed while it was being archived; PostgreSQL will retry",
                path.display()
            ));
        }
        Ok(())
    }

    /// Whether the archive refuses this server as another database, known
    /// before any push or backup meets it: the server's identity (PGDATA's
    /// `pg_control` and `PG_VERSION`) against `walden.json`. A refusal a push
    /// met stands first.
    pub async fn identity_mismatch(&self) -> Option<IdentityMismatch> {
        if let Some(m) = self.status().identity_mismatch {
            return Some(m);
        }
        let pgdata = self.pg_wal_root.as_ref()?.parent()?.to_path_buf();
        let identity = match crate::repo::load(self.storage.as_ref()).await {
            Ok(id) => id?,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the repository identity for status");
                return None;
            }
        };
        let server = tokio::task::spawn_blocking(move || {
            let id = crate::pg::control_system_identifier(&pgdata)?;
            Ok::<_, std::io::Error>((id, crate::pg::data_dir_version(&pgdata).ok()))
        })
        .await
        .ok()?;
        match server {
            Ok((id, version)) => crate::repo::mismatch(&identity, id, version),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the server's pg_control for status");
                None
            }
        }
    }

    /// Keeps a refusal of this server as another database in typed form: the
    /// operator reads it to start a new archive after pg_upgrade. A stored
    /// file clears it; other errors say nothing about identity.
    fn note_identity(&self, error: Option<&WalError>) {
        let mismatch = match error {
            Some(WalError::Repo(RepoError::SystemIdMismatch {
                found,
                expected,
                found_pg_version,
                expected_pg_version,
                ..
            })) => Some(IdentityMismatch {
                server_system_identifier: found.clone(),
                server_pg_version: *found_pg_version,
                archive_system_identifier: expected.clone(),
                archive_pg_version: *expected_pg_version,
            }),
            Some(_) => return,
            None => None,
        };
        lock(&self.inner).status.identity_mismatch = mismatch;
    }

    /// Appends a stored file to the archive log (fsynced) so that later
    /// requests for it are answered at once, also after a daemon restart.
    async fn remember(&self, name: &str, stamp: Stamp) -> Result<(), String> {
        let log = self.log.clone();
        let identity = crate::repo::require(self.storage.as_ref())
            .await
            .map_err(|e| format!("reading the repository identity: {e}"))?;
        let record = Record {
            name: name.to_string(),
            stamp,
            archived_at: Utc::now(),
            repository: Some(super::state::repository(
                &self.storage.url(),
                self.s3_endpoint.as_deref(),
                &identity.system_identifier,
            )),
        };
        tokio::task::spawn_blocking(move || lock(&log).record(record))
            .await
            .map_err(|e| format!("recording {name} in the archive log: {e}"))?
            .map_err(|e| format!("recording {name} in the archive log: {e}"))
    }

    /// Starts uploads of `.ready` files in `pg_wal` up to the parallelism.
    async fn fill(self: &Arc<Self>, pg_wal: &Path) {
        if self.stopping.load(Ordering::SeqCst) || !self.stored_once.load(Ordering::SeqCst) {
            return;
        }
        let ready = match ready_files(pg_wal).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(dir = %pg_wal.display(), error = %e, "cannot list archive_status");
                return;
            }
        };
        self.metrics.wal_ready_files.set(ready.len() as i64);
        for name in ready {
            {
                let mut inner = lock(&self.inner);
                if inner.in_flight.len() >= self.parallelism {
                    return;
                }
                if inner.in_flight.contains_key(&name) {
                    continue;
                }
                if let Some(at) = inner.cooldown.get(&name) {
                    if at.elapsed() < FAILURE_COOLDOWN {
                        continue;
                    }
                    inner.cooldown.remove(&name);
                }
            }
            let path = pg_wal.join(&name);
            let Ok(current) = stamp(&path).await else {
                continue;
            };
            if lock(&self.log).remembers(&name, &current) {
                continue;
            }
            self.start(path, name, current);
        }
    }

    /// Number of `.ready` files in the learned (or given) pg_wal, for status.
    pub async fn ready_count(&self, pg_wal: Option<PathBuf>) -> Option<u64> {
        let dir = pg_wal.or_else(|| self.pg_wal())?;
        let n = ready_files(&dir).await.ok()?.len();
        self.metrics.wal_ready_files.set(n as i64);
        Some(n as u64)
    }

    /// Since when the oldest segment still waiting for archiving has been
    /// complete (the mtime of its `.ready` file, which PostgreSQL writes when
    /// it finishes the segment); `None` when nothing waits. Unlike the age of
    /// the last archived segment, this does not grow on an idle database.
    pub async fn oldest_ready_since(&self, pg_wal: Option<PathBuf>) -> Option<DateTime<Utc>> {
        let dir = pg_wal.or_else(|| self.pg_wal())?;
        oldest_ready(&dir).await
    }

    /// Stops starting uploads and waits up to `timeout` for running ones.
    /// Unfinished uploads are abandoned: they were never reported, and
    /// PostgreSQL asks again after the restart.
    pub async fn shutdown(&self, timeout: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        let started = Instant::now();
        loop {
            let n = self.in_flight();
            if n == 0 {
                return;
            }
            if started.elapsed() >= timeout {
                tracing::warn!(
                    uploads = n,
                    "abandoning unfinished uploads at shutdown; PostgreSQL will retry them"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => v
            .clone()
            .unwrap_or_else(|| Err("upload ended without a result".into())),
        Err(_) => Err("the upload task stopped without a result".into()),
    }
}

/// Names of files PostgreSQL marked ready for archiving, in its archiving order.
async fn ready_files(pg_wal: &Path) -> std::io::Result<Vec<String>> {
    let mut dir = tokio::fs::read_dir(pg_wal.join("archive_status")).await?;
    let mut names = Vec::new();
    while let Some(entry) = dir.next_entry().await? {
        if let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".ready"))
        {
            if WalFile::parse(name).is_some() {
                names.push(name.to_string());
            }
        }
    }
    names.sort_by(|a, b| archive_order(a).cmp(&archive_order(b)));
    Ok(names)
}

/// The earliest `.ready` mtime among the segments waiting in `pg_wal`.
async fn oldest_ready(pg_wal: &Path) -> Option<DateTime<Utc>> {
    let names = ready_files(pg_wal).await.ok()?;
    let mut oldest: Option<DateTime<Utc>> = None;
    for name in names {
        let path = pg_wal.join("archive_status").join(format!("{name}.ready"));
        // A file archived meanwhile is gone: it no longer waits.
        let Ok(meta) = tokio::fs::metadata(&path).await else {
            continue;
        };
        let Ok(modified) = meta.modified() else {
            continue;
        };
        let t = DateTime::<Utc>::from(modified);
        oldest = Some(oldest.map_or(t, |o| o.min(t)));
    }
    oldest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oldest_ready_is_the_earliest_waiting_segment_and_none_when_nothing_waits() {
        let tmp = tempfile::tempdir().unwrap();
        let pg_wal = tmp.path().join("pg_wal");
        let status = pg_wal.join("archive_status");
        std::fs::create_dir_all(&status).unwrap();
        assert_eq!(oldest_ready(&pg_wal).await, None);
        let base = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000);
        for (name, age) in [
            ("000000010000000000000003.ready", 10),
            ("000000010000000000000004.ready", 300),
            ("000000010000000000000002.done", 9000),
            ("not-a-segment.ready", 9000),
        ] {
            let f = std::fs::File::create(status.join(name)).unwrap();
            f.set_modified(base - Duration::from_secs(age)).unwrap();
        }
        assert_eq!(
            oldest_ready(&pg_wal).await,
            Some(DateTime::<Utc>::from(base - Duration::from_secs(300)))
        );
        for name in [
            "000000010000000000000003.ready",
            "000000010000000000000004.ready",
        ] {
            std::fs::remove_file(status.join(name)).unwrap();
        }
        assert_eq!(oldest_ready(&pg_wal).await, None);
    }

    #[test]
    fn only_files_of_the_archived_pg_wal_are_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let pg_wal = root.join("data/pg_wal");
        let other = root.join("other/pg_wal");
        let elsewhere = root.join("etc");
        for d in [&pg_wal, &other, &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        let seg = "000000010000000000000001";
        for d in [&pg_wal, &other, &elsewhere] {
            std::fs::write(d.join(seg), b"x").unwrap();
        }
        std::os::unix::fs::symlink(elsewhere.join(seg), pg_wal.join("000000010000000000000002"))
            .unwrap();
        std::os::unix::fs::symlink(&pg_wal, root.join("walink")).unwrap();
        std::fs::create_dir_all(root.join("walink2")).unwrap();
        std::os::unix::fs::symlink(&pg_wal, root.join("walink2/pg_wal")).unwrap();
        // (path, allowed pg_wal, accepted?)
        let cases: Vec<(PathBuf, Option<&Path>, bool)> = vec![
            (pg_wal.join(seg), Some(&pg_wal), true),
            (pg_wal.join(seg), None, true),
            (root.join("walink2/pg_wal").join(seg), Some(&pg_wal), true),
            (other.join(seg), Some(&pg_wal), false),
            (elsewhere.join(seg), None, false),
            (
                pg_wal.join("000000010000000000000002"),
                Some(&pg_wal),
                false,
            ),
            (
                pg_wal.join("000000010000000000000003"),
                Some(&pg_wal),
                false,
            ),
            (PathBuf::from("pg_wal").join(seg), None, false),
            (
                pg_wal.join("..").join("pg_wal").join(seg),
                Some(&pg_wal),
                true,
            ),
        ];
        for (path, allowed, ok) in cases {
            let got = confine(&path, allowed);
            assert_eq!(
                got.is_ok(),
                ok,
                "{} (allowed {allowed:?}): {got:?}",
                path.display()
            );
            if let Ok(dir) = got {
                assert_eq!(dir, pg_wal);
            }
        }
    }
}
