//! `wal-push`: archive one file PostgreSQL hands to `archive_command`.
//!
//! Success is reported only once the object is durable (safety invariant 1).
//! An object that already exists is compared with the local file through its
//! checksum trailer: identical is success, different is a loud failure
//! (invariant 2). Segments carry their database's system identifier, which
//! must match the repository's (invariant 3).

use std::path::Path;
use std::time::Instant;

use tokio::io::AsyncReadExt;
use tracing::Instrument;

use super::header::{PageHeader, LONG_HEADER_LEN};
use super::{files, WalError, WalFile};
use crate::object::{seal_of, Seal, SealOptions, Sealer, TRAILER_LEN};
use crate::repo;
use crate::retry::RetryPolicy;
use crate::storage::{Created, Storage};

#[derive(Debug, Clone, Copy, Default)]
pub struct PushOptions {
    pub seal: SealOptions,
    pub retry: RetryPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushResult {
    /// Uploaded now.
    Stored,
    /// The archive already held identical content.
    AlreadyArchived,
}

#[derive(Debug, Clone, Copy)]
pub struct Pushed {
    pub file: WalFile,
    pub result: PushResult,
    pub content_len: u64,
}

fn file_name(path: &Path) -> Result<WalFile, WalError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    WalFile::parse(name).ok_or_else(|| WalError::InvalidName {
        name: path.display().to_string(),
    })
}

/// Archives the file at `path`, retrying transient storage errors.
pub async fn push(
    storage: &dyn Storage,
    path: &Path,
    opts: &PushOptions,
) -> Result<Pushed, WalError> {
    let file = file_name(path)?;
    let span = tracing::info_span!("wal_push", file = %file);
    async {
        let started = Instant::now();
        let pushed = opts
            .retry
            .run("wal-push", WalError::is_transient, || {
                push_once(storage, path, file, opts)
            })
            .await?;
        tracing::info!(
            result = ?pushed.result,
            bytes = pushed.content_len,
            ms = started.elapsed().as_millis() as u64,
            "archived"
        );
        Ok(pushed)
    }
    .instrument(span)
    .await
}

async fn read_header(path: &Path) -> Result<PageHeader, WalError> {
    let local = |op, source| WalError::Local {
        op,
        path: path.display().to_string(),
        source,
    };
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| local("open", e))?;
    let mut buf = Vec::with_capacity(LONG_HEADER_LEN);
    (&mut f)
        .take(LONG_HEADER_LEN as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| local("read", e))?;
    PageHeader::parse(&buf).map_err(|reason| WalError::NotASegment {
        path: path.display().to_string(),
        reason,
    })
}

/// Refuses a history or backup-history file whose content is not one: the
/// archive is write-once, and a stored garbage file would break every restore.
async fn check_small_file(path: &Path, file: WalFile) -> Result<(), WalError> {
    let local = |op, source| WalError::Local {
        op,
        path: path.display().to_string(),
        source,
    };
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| local("open", e))?;
    let mut bytes = Vec::new();
    f.take(files::MAX_HISTORY_BYTES + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| local("read", e))?;
    let checked = if bytes.len() as u64 > files::MAX_HISTORY_BYTES {
        Err(format!(
            "it is larger than {} bytes",
            files::MAX_HISTORY_BYTES
        ))
    } else {
        match file {
            WalFile::History(tli) => files::check_history(tli, &bytes).map(|_| ()),
            WalFile::BackupHistory { segment, offset } => {
                files::check_backup_history(segment, offset, &bytes)
            }
            WalFile::Segment(_) | WalFile::Partial(_) => Ok(()),
        }
    };
    checked.map_err(|reason| WalError::Malformed {
        path: path.display().to_string(),
        reason: format!("it is not a valid {} file: {reason}", kind_of(file)),
    })
}

fn kind_of(file: WalFile) -> &'static str {
    match file {
        WalFile::History(_) => "timeline history",
        WalFile::BackupHistory { .. } => "backup history",
        WalFile::Segment(_) | WalFile::Partial(_) => "WAL segment",
    }
}

async fn local_seal(path: &Path) -> Result<Seal, WalError> {
    let local = |op, source| WalError::Local {
        op,
        path: path.display().to_string(),
        source,
    };
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|e| local("open", e))?;
    seal_of(f).await.map_err(|e| local("read", e))
}

/// Decides what an existing object means for this push.
async fn compare_existing(
    object: &str,
    trailer: &[u8],
    path: &Path,
    file: WalFile,
) -> Result<Pushed, WalError> {
    let stored = Seal::decode(trailer).ok_or_else(|| WalError::ForeignObject {
        object: object.to_string(),
    })?;
    let local = local_seal(path).await?;
    if stored == local {
        return Ok(Pushed {
            file,
            result: PushResult::AlreadyArchived,
            content_len: local.content_len,
        });
    }
    Err(WalError::Conflict {
        object: object.to_string(),
        path: path.display().to_string(),
        stored: stored.sha256_hex(),
        stored_len: stored.content_len,
        local: local.sha256_hex(),
        local_len: local.content_len,
    })
}

async fn push_once(
    storage: &dyn Storage,
    path: &Path,
    file: WalFile,
    opts: &PushOptions,
) -> Result<Pushed, WalError> {
    if file.has_page_header() {
        let header = read_header(path).await?;
        if let Some(seg) = file.segment() {
            let expected = seg.start_lsn(header.segment_size);
            if header.page_addr != expected {
                return Err(WalError::WrongPosition {
                    path: path.display().to_string(),
                    found: header.page_addr,
                    expected,
                });
            }
        }
        if matches!(file, WalFile::Segment(_)) {
            let len = tokio::fs::metadata(path)
                .await
                .map_err(|source| WalError::Local {
                    op: "stat",
                    path: path.display().to_string(),
                    source,
                })?
                .len();
            if len != u64::from(header.segment_size) {
                return Err(WalError::NotASegment {
                    path: path.display().to_string(),
                    reason: format!(
                        "it is {len} bytes, but its header says segments are {} bytes (a truncated or \
                         padded copy; nothing was stored)",
                        header.segment_size
                    ),
                });
            }
        }
        repo::ensure(storage, &header, &path.display().to_string()).await?;
    } else {
        check_small_file(path, file).await?;
        // History and backup-history files name no database; still refuse an unknown format.
        repo::load(storage).await?;
    }

    let key = file.object_key();
    let object = format!("{}/{key}", storage.url());
    // A HEAD, not a ranged GET: the usual answer is "absent", and a bodiless
    // reply never waits on a small error body.
    if storage.head(&key).await?.is_some() {
        let tail = storage.get_tail(&key, TRAILER_LEN as u64).await?;
        return compare_existing(&object, &tail, path, file).await;
    }

    let f = std::fs::File::open(path).map_err(|source| WalError::Local {
        op: "open",
        path: path.display().to_string(),
        source,
    })?;
    let sealer = Sealer::from_file(f, opts.seal);
    let seal = sealer.seal_handle();
    match storage.create(&key, Box::pin(sealer)).await? {
        Created::Created => Ok(Pushed {
            file,
            result: PushResult::Stored,
            content_len: seal.get().map(|s| s.content_len).unwrap_or_default(),
        }),
        // Another writer stored it between our check and our upload.
        Created::AlreadyExists => {
            let tail = storage.get_tail(&key, TRAILER_LEN as u64).await?;
            compare_existing(&object, &tail, path, file).await
        }
    }
}
