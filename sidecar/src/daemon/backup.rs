//! Base backups started through the API, each run as a child process
//! (`walden backup-push` with the daemon's resolved settings, see
//! [`Children`]), so that a backup's memory and any crash stay out of the
//! daemon. One at a time.
//!
//! The last backup and the recovery window are read from the archive in
//! process (the catalog `backup-list` also reads), at start, after each
//! backup and every few minutes.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use walden_contract::api::{LastBackup, RecoveryWindow};

use crate::catalog::{self, BackupManifest};
use crate::storage::Storage;

use super::lock;
use super::metrics::{Metrics, ResultLabel};

/// Finished jobs remembered for `GET /v1/backups/{id}`.
const KEEP_JOBS: usize = 64;
/// Bytes of a failed backup's stderr kept as its error.
const ERROR_TAIL: usize = 2048;
const LIST_REFRESH: Duration = Duration::from_secs(300);
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// A backup job's state, as `GET /v1/backups/{id}` reports it.
pub use walden_contract::api::BackupState as JobState;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: String,
    pub state: JobState,
    pub error: Option<String>,
    pub start_time: DateTime<Utc>,
    pub stop_time: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct Jobs {
    map: HashMap<String, Job>,
    order: VecDeque<String>,
    running: Option<String>,
}

/// What `backup-list --json` says, as the status needs it.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub last_backup: Option<LastBackup>,
    pub window: Option<RecoveryWindow>,
    /// Where the oldest backup starts (timeline, start LSN): where continuity is checked from.
    pub oldest_start: Option<super::continuity::Start>,
}

/// What the daemon's children (`backup-push`, `backup-list`, `retain`) are
/// told: the daemon's resolved settings, not just the environment it
/// inherited, so that a daemon configured by flags runs them the same way.
#[derive(Debug, Clone, Default)]
pub struct Children {
    /// Variables set (`Some`) or removed (`None`) in every child.
    pub env: Vec<(&'static str, Option<String>)>,
    /// `walden retain` arguments after each successful backup; `None`: no policy.
    pub retain: Option<Vec<String>>,
}

impl Children {
    fn apply(&self, cmd: &mut tokio::process::Command) {
        for (name, value) in &self.env {
            match value {
                Some(v) => cmd.env(name, v),
                None => cmd.env_remove(name),
            };
        }
    }

    fn walden(&self, args: &[&str]) -> std::io::Result<tokio::process::Command> {
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
        self.apply(&mut cmd);
        Ok(cmd)
    }
}

pub struct Backups {
    /// A shell command replacing `walden backup-push` (tests, custom tooling).
    command: Option<String>,
    children: Children,
    /// The archive the catalog is read from.
    storage: Arc<dyn Storage>,
    jobs: Mutex<Jobs>,
    catalog: Mutex<Catalog>,
    metrics: Metrics,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a base backup is already running")]
    Running(String),
    #[error("cannot start the base backup ({command}): {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
}

impl Backups {
    pub fn new(
        command: Option<String>,
        children: Children,
        storage: Arc<dyn Storage>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            command,
            children,
            storage,
            jobs: Mutex::new(Jobs::default()),
            catalog: Mutex::new(Catalog::default()),
            metrics,
        })
    }

    pub fn get(&self, id: &str) -> Option<Job> {
        lock(&self.jobs).map.get(id).cloned()
    }

    pub fn running(&self) -> Option<Job> {
        let jobs = lock(&self.jobs);
        jobs.running
            .as_ref()
            .and_then(|id| jobs.map.get(id))
            .cloned()
    }

    pub fn catalog(&self) -> Catalog {
        lock(&self.catalog).clone()
    }

    fn command(&self, id: &str) -> Result<(tokio::process::Command, String), std::io::Error> {
        let mut cmd;
        let describe;
        if let Some(shell) = &self.command {
            cmd = tokio::process::Command::new("/bin/sh");
            cmd.arg("-c").arg(shell);
            describe = shell.clone();
        } else {
            let exe = std::env::current_exe()?;
            cmd = tokio::process::Command::new(&exe);
            cmd.arg("backup-push");
            describe = format!("{} backup-push", exe.display());
        }
        self.children.apply(&mut cmd);
        cmd.env("WALDEN_BACKUP_ID", id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        Ok((cmd, describe))
    }

    /// Starts a backup unless one is running.
    pub fn start(self: &Arc<Self>) -> Result<Job, StartError> {
        let mut jobs = lock(&self.jobs);
        if let Some(id) = &jobs.running {
            return Err(StartError::Running(id.clone()));
        }
        let now = Utc::now();
        let base = now.format("%Y%m%dT%H%M%SZ").to_string();
        let mut id = base.clone();
        let mut n = 1;
        while jobs.map.contains_key(&id) {
            id = format!("{base}-{n}");
            n += 1;
        }
        let spawn = |id: &str| -> Result<tokio::process::Child, StartError> {
            let (mut cmd, describe) = self.command(id).map_err(|source| StartError::Spawn {
                command: "walden backup-push".into(),
                source,
            })?;
            cmd.spawn().map_err(|source| StartError::Spawn {
                command: describe,
                source,
            })
        };
        let child = spawn(&id)?;
        let job = Job {
            id: id.clone(),
            state: JobState::Running,
            error: None,
            start_time: now,
            stop_time: None,
        };
        jobs.map.insert(id.clone(), job.clone());
        jobs.order.push_back(id.clone());
        jobs.running = Some(id.clone());
        while jobs.order.len() > KEEP_JOBS {
            if let Some(old) = jobs.order.pop_front() {
                jobs.map.remove(&old);
            }
        }
        drop(jobs);
        self.metrics.backup_running.set(1);
        tracing::info!(backup = %id, "base backup started");
        let me = self.clone();
        tokio::spawn(async move { me.supervise(id, child).await });
        Ok(job)
    }

    async fn supervise(self: Arc<Self>, id: String, mut child: tokio::process::Child) {
        let started = Instant::now();
        let mut stderr = Vec::new();
        if let Some(mut pipe) = child.stderr.take() {
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        stderr.extend_from_slice(&buf[..n]);
                        if stderr.len() > 4 * ERROR_TAIL {
                            stderr.drain(..stderr.len() - ERROR_TAIL);
                        }
                    }
                }
            }
        }
        let status = child.wait().await;
        let error = match status {
            Ok(s) if s.success() => None,
            Ok(s) => {
                let tail =
                    String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(ERROR_TAIL)..])
                        .trim()
                        .to_string();
                Some(format!("backup-push exited with {s}: {tail}"))
            }
            Err(e) => Some(format!("waiting for backup-push: {e}")),
        };
        let result = if error.is_none() {
            "succeeded"
        } else {
            "failed"
        };
        let secs = started.elapsed().as_secs_f64();
        self.metrics
            .backups
            .get_or_create(&ResultLabel { result })
            .inc();
        self.metrics
            .backup_duration
            .get_or_create(&ResultLabel { result })
            .observe(secs);
        self.metrics.backup_running.set(0);
        let now = Utc::now();
        if error.is_none() {
            self.metrics
                .backup_last_success_time
                .set(now.timestamp_millis() as f64 / 1000.0);
            tracing::info!(backup = %id, seconds = secs, "base backup succeeded");
        } else {
            tracing::error!(backup = %id, seconds = secs, error = ?error, "base backup failed");
        }
        // The catalog first, so that whoever sees the job finished also sees its backup in the status.
        self.refresh_catalog().await;
        {
            let mut jobs = lock(&self.jobs);
            if let Some(job) = jobs.map.get_mut(&id) {
                job.state = if error.is_none() {
                    JobState::Succeeded
                } else {
                    JobState::Failed
                };
                job.error = error;
                job.stop_time = Some(now);
            }
            jobs.running = None;
        }
        // Retention changes the catalog: read it again afterwards.
        if result == "succeeded" {
            self.apply_retention().await;
            self.refresh_catalog().await;
        }
    }

    /// Re-reads the catalog from the archive; on failure the status reports
    /// no last backup and no window rather than stale ones.
    pub async fn refresh_catalog(&self) {
        let catalog = match read_catalog(self.storage.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the catalog; reporting no backups");
                Catalog::default()
            }
        };
        *lock(&self.catalog) = catalog;
    }

    /// After a successful backup, applies the retention policy the daemon was
    /// given (`--retention-full` / `--retention-window` or their variables)
    /// in a child process, like the backup. A failure is logged and leaves
    /// the archive consistent; the next backup tries again.
    async fn apply_retention(&self) {
        let Some(args) = &self.children.retain else {
            return;
        };
        let mut argv = vec!["retain", "--json"];
        argv.extend(args.iter().map(String::as_str));
        let out = match self.children.walden(&argv) {
            Ok(mut cmd) => cmd.output().await,
            Err(e) => Err(e),
        };
        match out {
            Ok(o) if o.status.success() => {
                let plan: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
                tracing::info!(
                    deleted_objects = %plan["deleted"],
                    deleted_backups = %plan["deletedBackups"],
                    "retention applied"
                );
            }
            Ok(o) => tracing::error!(
                status = %o.status,
                error = %String::from_utf8_lossy(&o.stderr).trim(),
                "retention failed; the next backup retries it"
            ),
            Err(e) => tracing::error!(error = %e, "retention could not start"),
        }
    }

    /// Refreshes the catalog now and then, for the life of the daemon.
    pub async fn refresh_forever(self: Arc<Self>) {
        loop {
            self.refresh_catalog().await;
            tokio::time::sleep(LIST_REFRESH).await;
        }
    }
}

async fn read_catalog(storage: &dyn Storage) -> Result<Catalog, String> {
    let read = async {
        let scanned = catalog::scan_backups(storage)
            .await
            .map_err(|e| e.to_string())?;
        let window = catalog::recovery_window(storage, &scanned.backups)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(summarize(&scanned.backups, window))
    };
    tokio::time::timeout(LIST_TIMEOUT, read)
        .await
        .map_err(|_| format!("reading the catalog took over {LIST_TIMEOUT:?}"))?
}

/// What the status needs of the catalog: the newest backup, the window, and
/// where the oldest backup starts.
fn summarize(backups: &[BackupManifest], window: Option<catalog::RecoveryWindow>) -> Catalog {
    let last_backup = backups
        .iter()
        .max_by_key(|b| b.stop_time)
        .map(|b| LastBackup {
            id: b.id.clone(),
            start_time: b.start_time,
            stop_time: b.stop_time,
            start_lsn: b.start_lsn.to_string(),
            stop_lsn: b.stop_lsn.to_string(),
        });
    let oldest_start = backups
        .iter()
        .min_by_key(|b| b.stop_time)
        .map(|b| (b.timeline, b.start_lsn));
    Catalog {
        last_backup,
        window: window.map(|w| RecoveryWindow {
            first_point: w.first_point,
            first_lsn: w.first_lsn.to_string(),
            last_archived_wal: w.last_archived_wal,
        }),
        oldest_start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_takes_the_newest_backup_and_the_window() {
        let mut older =
            crate::catalog::sample_manifest("20260101T000000Z", "2026-01-01T00:01:00Z", 0x200_0100);
        older.start_lsn = crate::lsn::Lsn(0x200_0028);
        let mut newer =
            crate::catalog::sample_manifest("20260102T000000Z", "2026-01-02T00:01:00Z", 0x500_0100);
        newer.start_lsn = crate::lsn::Lsn(0x500_0028);
        let window = crate::catalog::RecoveryWindow {
            first_point: older.stop_time,
            first_lsn: older.stop_lsn,
            last_archived_wal: Some("000000010000000000000009".into()),
            last_archived_time: Some("2026-01-03T00:00:00Z".parse().unwrap()),
        };
        let c = summarize(&[newer, older], Some(window));
        let b = serde_json::to_value(c.last_backup.unwrap()).unwrap();
        assert_eq!(b["id"], "20260102T000000Z");
        assert_eq!(b["stopLsn"], "0/5000100");
        assert!(b.get("timeline").is_none());
        assert_eq!(
            c.oldest_start,
            Some((1, crate::lsn::Lsn(0x200_0028))),
            "the oldest backup's start"
        );
        let w = serde_json::to_value(c.window.unwrap()).unwrap();
        assert_eq!(w["lastArchivedWal"], "000000010000000000000009");
        let empty = summarize(&[], None);
        assert!(empty.last_backup.is_none() && empty.window.is_none());
        assert!(empty.oldest_start.is_none());
    }
}
