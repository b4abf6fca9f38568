//! `restore`: a base backup unpacked into an empty directory, with the
//! recovery settings that replay the archive up to the target. The result
//! starts with a plain `pg_ctl start`.
//!
//! Nothing is written before every check has passed (the destination is
//! empty, a backup fits the target, tablespace directories are free). Parts
//! are downloaded and unpacked in parallel and verified against their
//! checksums; `pg_control` is put in place last, so a restore that fails or
//! is killed half-way can never be started. A failed restore removes what it
//! wrote.

pub mod extract;
pub mod marker;
pub mod proof;
pub mod settings;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio_util::io::SyncIoBridge;
use tracing::Instrument;

use self::extract::{Layout, PG_CONTROL, PG_CONTROL_PARTIAL};
use self::marker::{IfRestored, Marker, Plan};
use self::settings::RecoverySettings;
use crate::catalog::{self, BackupManifest, CatalogError, ChooseError, Part, Target};
use crate::object::{unseal, UnsealError};
use crate::repo::{self, RepoError};
use crate::retry::RetryPolicy;
use crate::storage::{Storage, StorageError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path} is not empty: restore only into an empty or new directory, so nothing is overwritten")]
    DestNotEmpty { path: String },
    #[error("{path} {reason}")]
    Refused { path: String, reason: String },
    #[error("tablespace {oid} would be restored into {path}, which is not empty; map it elsewhere with --tablespace-mapping {original}=NEWDIR")]
    TablespaceNotEmpty {
        oid: u32,
        path: String,
        original: String,
    },
    #[error(
        "the target time {target} is after the end of the archive: its newest segment, {segment}, was \
         stored at {stored}, so recovery could never reach the target. Wait until the WAL of that time is \
         archived (pg_switch_wal() on the source forces it), or restore without a target"
    )]
    AfterArchive {
        target: String,
        segment: String,
        stored: String,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Choose(#[from] ChooseError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Unseal(#[from] UnsealError),
    #[error("{object}: {reason}")]
    Corrupt { object: String, reason: String },
    #[error("{path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl RestoreError {
    fn is_transient(&self) -> bool {
        match self {
            RestoreError::Storage(e) => e.is_transient(),
            RestoreError::Catalog(e) => e.is_transient(),
            RestoreError::Repo(e) => e.is_transient(),
            RestoreError::Unseal(UnsealError::Read { .. }) => true,
            _ => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dest: PathBuf,
    /// A backup id, or `LATEST`/`None` for the newest that fits the target.
    pub backup: Option<String>,
    pub recovery: RecoverySettings,
    /// Original tablespace location → where to restore it.
    pub tablespace_mapping: Vec<(String, String)>,
    pub parallelism: usize,
    pub retry: RetryPolicy,
    /// A non-empty destination: refuse, or recognise an earlier restore.
    pub if_restored: IfRestored,
}

/// What `restore` did. One value per restore, so the variants' size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Outcome {
    Restored(Restored),
    /// The directory already holds this restore, finished (`--if-restored
    /// skip`); `adopted` when it had no marker yet and got one.
    AlreadyRestored {
        marker: Marker,
        adopted: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub backup: BackupManifest,
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub cleared: Cleared,
}

fn local(path: &Path) -> impl Fn(std::io::Error) -> RestoreError + '_ {
    move |source| RestoreError::Local {
        path: path.display().to_string(),
        source,
    }
}

/// Whether a directory is absent or empty (an error if it is a file).
fn is_free(dir: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(local(dir)(e)),
    }
}

/// Who this restore is, as the marker records it.
fn identity(storage_url: &str, opts: &RestoreOptions) -> marker::Identity {
    marker::Identity {
        source: storage_url.to_string(),
        target: opts.recovery.target.to_string(),
        inclusive: opts.recovery.inclusive,
        timeline: opts.recovery.timeline.clone(),
        backup: opts.backup.clone().unwrap_or_else(|| "LATEST".into()),
        standby: opts.recovery.standby,
    }
}

pub async fn restore(
    storage: Arc<dyn Storage>,
    opts: &RestoreOptions,
) -> Result<Outcome, RestoreError> {
    let started = Instant::now();
    let dest = &opts.dest;
    let wanted = identity(&storage.url(), opts);
    match marker::plan(&marker::inspect(dest)?, &wanted, opts.if_restored) {
        Plan::Restore => {}
        Plan::Redo(half) => {
            tracing::warn!(dest = %dest.display(), target = %half.identity.target,
                "a restore into this directory was interrupted: removing what it wrote and restoring again");
            let layout = Layout {
                dest: dest.clone(),
                tablespaces: half
                    .tablespaces
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (i as u32, p.clone()))
                    .collect(),
            };
            cleanup(&layout, true);
        }
        Plan::Skip(marker) => {
            return Ok(Outcome::AlreadyRestored {
                marker,
                adopted: false,
            })
        }
        Plan::Adopt => {
            let marker = Marker {
                version: 1,
                state: marker::State::Complete,
                identity: wanted,
                restored_backup: None,
                tablespaces: vec![],
            };
            marker::write(dest, &marker)?;
            return Ok(Outcome::AlreadyRestored {
                marker,
                adopted: true,
            });
        }
        Plan::Refuse(_) if opts.if_restored == IfRestored::Fail => {
            return Err(RestoreError::DestNotEmpty {
                path: dest.display().to_string(),
            });
        }
        Plan::Refuse(reason) => {
            return Err(RestoreError::Refused {
                path: dest.display().to_string(),
                reason,
            })
        }
    }
    if !is_free(dest)? {
        return Err(RestoreError::DestNotEmpty {
            path: dest.display().to_string(),
        });
    }
    // A mistyped URL must say so, not look like an archive without backups.
    repo::require(storage.as_ref()).await?;
    let backups = opts
        .retry
        .run("listing backups", CatalogError::is_transient, || {
            catalog::list_backups(storage.as_ref())
        })
        .await?;
    if let (Target::Time(t), false) = (&opts.recovery.target, opts.recovery.standby) {
        let last = catalog::last_archived_segment(storage.as_ref()).await?;
        if let Some((segment, Some(stored))) = last {
            if *t > stored {
                return Err(RestoreError::AfterArchive {
                    target: t.to_rfc3339(),
                    segment,
                    stored: stored.to_rfc3339(),
                });
            }
        }
    }
    let chosen = catalog::choose_backup(
        &backups,
        opts.backup.as_deref(),
        &opts.recovery.target,
        &storage.url(),
    )?
    .clone();

    let mapping: HashMap<&str, &str> = opts
        .tablespace_mapping
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut tablespaces = HashMap::new();
    for ts in &chosen.tablespaces {
        let path = PathBuf::from(
            mapping
                .get(ts.location.as_str())
                .copied()
                .unwrap_or(&ts.location),
        );
        if !is_free(&path)? {
            return Err(RestoreError::TablespaceNotEmpty {
                oid: ts.oid,
                path: path.display().to_string(),
                original: ts.location.clone(),
            });
        }
        tablespaces.insert(ts.oid, path);
    }
    let layout = Layout {
        dest: dest.clone(),
        tablespaces,
    };
    let span = tracing::info_span!("restore", backup = %chosen.id, target = %opts.recovery.target);
    let existed = dest.exists();
    let mut marker = Marker {
        version: 1,
        state: marker::State::InProgress,
        identity: wanted,
        restored_backup: Some(chosen.id.clone()),
        tablespaces: layout.tablespaces.values().cloned().collect(),
    };
    let result = async {
        std::fs::create_dir_all(dest).map_err(local(dest))?;
        marker::write(dest, &marker)?;
        let totals = unpack(storage, &chosen, &layout, opts).await?;
        marker.state = marker::State::Complete;
        marker::write(dest, &marker)?;
        Ok(totals)
    }
    .instrument(span)
    .await;
    match result {
        Ok((files, bytes, cleared)) => Ok(Outcome::Restored(Restored {
            backup: chosen,
            files,
            bytes,
            cleared,
            seconds: started.elapsed().as_secs_f64(),
        })),
        Err(e) => {
            cleanup(&layout, existed);
            Err(e)
        }
    }
}

/// Removes what a failed restore wrote.
fn cleanup(layout: &Layout, dest_existed: bool) {
    let clear = |dir: &Path, keep_dir: bool| {
        if keep_dir {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for e in entries.flatten() {
                    let p = e.path();
                    let _ = if p.is_dir() && !p.is_symlink() {
                        std::fs::remove_dir_all(&p)
                    } else {
                        std::fs::remove_file(&p)
                    };
                }
            }
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    clear(&layout.dest, dest_existed);
    for dir in layout.tablespaces.values() {
        clear(dir, true);
    }
    tracing::warn!(dest = %layout.dest.display(), "restore failed: removed what it had written");
}

async fn unpack(
    storage: Arc<dyn Storage>,
    backup: &BackupManifest,
    layout: &Layout,
    opts: &RestoreOptions,
) -> Result<(u64, u64, Cleared), RestoreError> {
    let dest = &layout.dest;
    std::fs::create_dir_all(dest).map_err(local(dest))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700)).map_err(local(dest))?;
    for dir in layout.tablespaces.values() {
        std::fs::create_dir_all(dir).map_err(local(dir))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(local(dir))?;
    }
    tracing::info!(
        parts = backup.parts.len(),
        bytes = backup.logical_size,
        "restoring"
    );
    // After a failure no new part starts, and every part already started is
    // waited for: its unpacking thread must be done before the caller cleans up.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let results: Vec<Result<extract::Extracted, RestoreError>> =
        futures::stream::iter(backup.parts.iter())
            .map(|part| {
                let storage = storage.clone();
                let layout = layout.clone();
                let id = backup.id.clone();
                let failed = &failed;
                async move {
                    if failed.load(std::sync::atomic::Ordering::SeqCst) {
                        return Ok(None);
                    }
                    let res = opts
                        .retry
                        .run("restoring a part", RestoreError::is_transient, || {
                            restore_part(storage.clone(), &id, part, layout.clone())
                        })
                        .await;
                    if res.is_err() {
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    res.map(Some)
                }
            })
            .buffer_unordered(opts.parallelism.max(1))
            .filter_map(|r| async move { r.transpose() })
            .collect()
            .await;
    let totals = results.into_iter().collect::<Result<Vec<_>, _>>()?;

    let cleared = finish(backup, layout, &opts.recovery)?;
    Ok((
        totals.iter().map(|t| t.files).sum(),
        totals.iter().map(|t| t.bytes).sum(),
        cleared,
    ))
}

async fn restore_part(
    storage: Arc<dyn Storage>,
    id: &str,
    part: &Part,
    layout: Layout,
) -> Result<extract::Extracted, RestoreError> {
    let key = format!("{}{}", BackupManifest::prefix(id), part.name);
    let object = format!("{}/{key}", storage.url());
    let download = storage.get(&key).await?;
    if download.size != part.stored_size {
        return Err(RestoreError::Corrupt {
            object,
            reason: format!(
                "it is {} bytes, but {} were stored",
                download.size, part.stored_size
            ),
        });
    }
    let (writer, reader) = tokio::io::duplex(1 << 20);
    let bridge = SyncIoBridge::new(reader);
    let extracting = tokio::task::spawn_blocking(move || extract::extract(bridge, &layout));
    let unsealing = async {
        let mut writer = writer;
        unseal(&object, download, &mut writer).await
    };
    let (sealed, extracted) = tokio::join!(unsealing, extracting);
    let extracted =
        extracted.map_err(|e| RestoreError::Internal(format!("extraction task failed: {e}")))?;
    // The root cause first: bad bytes from storage make the unpacking fail too.
    let seal = match (sealed, extracted) {
        (Err(e @ (UnsealError::Corrupt { .. } | UnsealError::Read { .. })), _) => {
            return Err(e.into())
        }
        (_, Err(e)) => {
            return Err(RestoreError::Local {
                path: format!("unpacking {object}"),
                source: e,
            })
        }
        (Err(e), _) => return Err(e.into()),
        (Ok(seal), Ok(done)) => (seal, done),
    };
    if seal.0.sha256_hex() != part.sha256 {
        return Err(RestoreError::Corrupt {
            object,
            reason: "its content differs from what backup.json recorded".into(),
        });
    }
    tracing::debug!(part = %part.name, files = seal.1.files, "part restored");
    Ok(seal.1)
}

/// Writes what makes the directory a startable, recovering server.
fn finish(
    backup: &BackupManifest,
    layout: &Layout,
    recovery: &RecoverySettings,
) -> Result<Cleared, RestoreError> {
    let dest = &layout.dest;
    let write = |name: &str, content: &str| {
        let path = dest.join(name);
        std::fs::write(&path, content).map_err(local(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(local(&path))
    };
    write("backup_label", &backup.backup_label)?;
    if !layout.tablespaces.is_empty() {
        let links = dest.join("pg_tblspc");
        std::fs::create_dir_all(&links).map_err(local(&links))?;
        for (oid, dir) in &layout.tablespaces {
            let link = links.join(oid.to_string());
            std::os::unix::fs::symlink(dir, &link).map_err(local(&link))?;
        }
    }
    let status = dest.join("pg_wal/archive_status");
    std::fs::create_dir_all(&status).map_err(local(&status))?;
    let conf = dest.join("postgresql.auto.conf");
    let existing = match std::fs::read_to_string(&conf) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(local(&conf)(e)),
    };
    let auto = settings::rewrite_auto_conf(
        &existing,
        recovery,
        &format!(
            "Added by walden restore: backup {} (LSN {} .. {}), target {}",
            backup.id, backup.start_lsn, backup.stop_lsn, recovery.target
        ),
    );
    write("postgresql.auto.conf", &auto.text)?;
    let mut cleared = Cleared {
        removed: auto.removed,
        ..Cleared::default()
    };
    let main_conf = dest.join("postgresql.conf");
    if let Ok(text) = std::fs::read_to_string(&main_conf) {
        cleared.overridden = settings::overridden_in_conf(&text);
    }
    // The backup's own signal files are not this restore's decision.
    for stray in ["recovery.signal", "standby.signal"] {
        let path = dest.join(stray);
        if stray != recovery.signal_file() && path.exists() {
            std::fs::remove_file(&path).map_err(local(&path))?;
            cleared.removed.push(stray.to_string());
        }
    }
    write(recovery.signal_file(), "")?;
    let partial = dest.join(PG_CONTROL_PARTIAL);
    if !partial.exists() {
        return Err(RestoreError::Corrupt {
            object: backup.id.clone(),
            reason: "the backup holds no global/pg_control".into(),
        });
    }
    std::fs::rename(&partial, dest.join(PG_CONTROL)).map_err(local(&partial))?;
    for line in &cleared.removed {
        tracing::warn!(removed = %line, "the backup carried a recovery setting of its own; removed it");
    }
    Ok(cleared)
}

/// What a restore took out of the backup's configuration so that only its
/// own recovery settings apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Lines removed from `postgresql.auto.conf`, and stray signal files removed.
    pub removed: Vec<String>,
    /// Recovery lines of `postgresql.conf`, overridden by `postgresql.auto.conf`.
    pub overridden: Vec<String>,
}

/// The default restore_command: this binary, with the storage settings that
/// are not secrets (credentials come from the server's environment).
pub fn default_restore_command(
    bin: &Path,
    storage_url: &str,
    s3_endpoint: Option<&str>,
    path_style: bool,
    key_file: Option<&Path>,
) -> String {
    use settings::shell_quote;
    let mut cmd = format!("WALDEN_STORAGE={}", shell_quote(storage_url));
    // The path, not the key: the server must be able to read that file.
    if let Some(k) = key_file {
        cmd.push_str(&format!(
            " WALDEN_ENCRYPTION_KEY_FILE={}",
            shell_quote(&k.display().to_string())
        ));
    }
    if let Some(e) = s3_endpoint.filter(|e| !e.is_empty()) {
        cmd.push_str(&format!(" WALDEN_S3_ENDPOINT={}", shell_quote(e)));
    }
    if path_style {
        cmd.push_str(" WALDEN_S3_PATH_STYLE=true");
    }
    cmd.push_str(&format!(
        " {} wal-fetch %f %p",
        shell_quote(&bin.display().to_string())
    ));
    cmd
}

/// Target from the command line's mutually exclusive options.
pub fn target_from(
    time: Option<&str>,
    lsn: Option<&str>,
    name: Option<&str>,
) -> Result<Target, String> {
    match (time, lsn, name) {
        (None, None, None) => Ok(Target::EndOfArchive),
        (Some(t), None, None) => settings::parse_time(t).map(Target::Time),
        (None, Some(l), None) => l
            .parse()
            .map(Target::Lsn)
            .map_err(|e| format!("target LSN: {e}")),
        (None, None, Some(n)) => settings::check_name(n).map(|()| Target::Name(n.to_string())),
        _ => Err("give at most one of --target-time, --target-lsn, --target-name".into()),
    }
}
