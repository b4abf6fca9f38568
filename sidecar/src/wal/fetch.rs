//! `wal-fetch`: restore one file PostgreSQL asks of `restore_command`.
//!
//! The content is verified against its checksum before it reaches `<dest>`,
//! which is written atomically (temporary file, then rename). "Not found" is
//! reported only when storage says the object does not exist; every other
//! failure is retried and then reported as an error (safety invariant 4).
//!
//! A segment must be the one its name promises: its page header is checked
//! against the name (position, timeline, segment size, database) and its
//! length against the segment size, before it reaches PostgreSQL, which would
//! otherwise read a misplaced segment as the end of WAL. An absent file is
//! reported as absent only when it lies past the end of the archive; a hole
//! (see [`super::holes`]) is an error, after a short wait for an upload that
//! may still be in flight.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;

use super::header::{PageHeader, LONG_HEADER_LEN};
use super::{holes, WalError, WalFile};
use crate::object::unseal;
use crate::repo::{self, RepoIdentity};
use crate::retry::RetryPolicy;
use crate::storage::Storage;

/// How long a request for a missing segment waits when later segments exist:
/// the daemon uploads in parallel, so N+2 may be stored a moment before N+1.
pub const DEFAULT_HOLE_GRACE: Duration = Duration::from_secs(10);
const HOLE_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    pub retry: RetryPolicy,
    /// `Some(grace)`: an absent file is checked for being a hole, and a hole
    /// is waited on for `grace` before it fails. `None` (prefetch, which is
    /// only a guess): "absent" is reported as is.
    pub hole_grace: Option<Duration>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            hole_grace: Some(DEFAULT_HOLE_GRACE),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    pub file: WalFile,
    pub content_len: u64,
}

/// Restores `name` from the archive into `dest`, retrying transient errors.
pub async fn fetch(
    storage: &dyn Storage,
    name: &str,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, WalError> {
    let file = WalFile::parse(name).ok_or_else(|| WalError::InvalidName {
        name: name.to_string(),
    })?;
    let span = tracing::info_span!("wal_fetch", file = %file);
    async {
        let started = Instant::now();
        let fetched = match fetch_retried(storage, file, dest, opts).await {
            Err(e) if e.is_not_found() => match opts.hole_grace {
                Some(grace) => absent(storage, file, dest, opts, grace, e).await?,
                None => return Err(e),
            },
            other => other?,
        };
        tracing::info!(
            bytes = fetched.content_len,
            ms = started.elapsed().as_millis() as u64,
            "restored"
        );
        Ok(fetched)
    }
    .instrument(span)
    .await
}

async fn fetch_retried(
    storage: &dyn Storage,
    file: WalFile,
    dest: &Path,
    opts: &FetchOptions,
) -> Result<Fetched, WalError> {
    opts.retry
        .run("wal-fetch", WalError::is_transient, || {
            fetch_once(storage, file, dest)
        })
        .await
}

/// `file` is not stored: "absent" if it lies past the end of the archive;
/// otherwise a hole, waited on for `grace` (an upload may be in flight).
async fn absent(
    storage: &dyn Storage,
    file: WalFile,
    dest: &Path,
    opts: &FetchOptions,
    grace: Duration,
    not_found: WalError,
) -> Result<Fetched, WalError> {
    let identity = repo::require(storage).await?;
    let around = opts
        .retry
        .run(
            "looking around a missing WAL file",
            WalError::is_transient,
            || holes::surroundings(storage, file),
        )
        .await?;
    let Some(reason) = holes::judge(file, &around, identity.wal_segment_size) else {
        return Err(not_found);
    };
    tracing::warn!(%reason, grace_ms = grace.as_millis() as u64, "missing from the middle of the archive; waiting for an upload in flight");
    let deadline = Instant::now() + grace;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WalError::Hole {
                name: file.file_name(),
                url: storage.url(),
                reason,
                waited: grace.as_secs_f64(),
            });
        }
        tokio::time::sleep(left.min(HOLE_POLL)).await;
        match fetch_retried(storage, file, dest, opts).await {
            Err(e) if e.is_not_found() => continue,
            other => return other,
        }
    }
}

/// Checks that restored bytes are the file their name promises.
async fn check_content(
    file: WalFile,
    object: &str,
    path: &Path,
    content_len: u64,
    identity: &RepoIdentity,
) -> Result<(), WalError> {
    let wrong = |reason: String| WalError::WrongContent {
        object: object.to_string(),
        name: file.file_name(),
        reason,
    };
    let Some(seg) = file.segment().filter(|_| file.has_page_header()) else {
        return Ok(());
    };
    let size = identity.wal_segment_size;
    if matches!(file, WalFile::Segment(_)) && content_len != u64::from(size) {
        return Err(wrong(format!(
            "it holds {content_len} bytes, but a segment of this archive is {size} bytes"
        )));
    }
    let mut buf = Vec::with_capacity(LONG_HEADER_LEN);
    let f = tokio::fs::File::open(path)
        .await
        .map_err(|source| WalError::Local {
            op: "open",
            path: path.display().to_string(),
            source,
        })?;
    f.take(LONG_HEADER_LEN as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|source| WalError::Local {
            op: "read",
            path: path.display().to_string(),
            source,
        })?;
    let header = PageHeader::parse(&buf).map_err(wrong)?;
    check_header(seg, &header, identity).map_err(wrong)
}

/// Whether a segment's long page header fits its name and archive. Pure.
/// The header's timeline may be an ancestor's: a new timeline's first
/// segment starts with its parent's pages, copied up to the switch point.
pub fn check_header(
    seg: super::SegmentName,
    header: &PageHeader,
    identity: &RepoIdentity,
) -> Result<(), String> {
    let size = identity.wal_segment_size;
    if header.segment_size != size {
        return Err(format!(
            "its header says segments are {} bytes, but this archive's are {size}",
            header.segment_size
        ));
    }
    let expected = seg.start_lsn(size);
    if header.page_addr != expected {
        return Err(format!(
            "its header says it starts at LSN {:X}/{:08X}, but the name means {:X}/{:08X}: \
             it is the content of another segment",
            header.page_addr >> 32,
            header.page_addr & 0xFFFF_FFFF,
            expected >> 32,
            expected & 0xFFFF_FFFF
        ));
    }
    if header.timeline > seg.timeline {
        return Err(format!(
            "its header names timeline {}, later than the name's timeline {}",
            header.timeline, seg.timeline
        ));
    }
    if header.system_identifier.to_string() != identity.system_identifier {
        return Err(format!(
            "it belongs to the database with system identifier {}, but this archive is database {}",
            header.system_identifier, identity.system_identifier
        ));
    }
    Ok(())
}

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.walden-tmp-{}", std::process::id()))
}

async fn fetch_once(
    storage: &dyn Storage,
    file: WalFile,
    dest: &Path,
) -> Result<Fetched, WalError> {
    // A missing walden.json means a wrong URL, not an absent segment: never report "not found" then.
    let identity = repo::require(storage).await?;
    let key = file.object_key();
    let object = format!("{}/{key}", storage.url());
    let download = match storage.get(&key).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => {
            return Err(WalError::NotFound {
                name: file.file_name(),
                url: storage.url(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let tmp = temp_path(dest);
    let local = |op, source| WalError::Local {
        op,
        path: tmp.display().to_string(),
        source,
    };
    let result = async {
        // Unbuffered: content arrives in large chunks, and the file's own
        // write-behind already overlaps writing with decompression.
        let mut out = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| local("create", e))?;
        let seal = unseal(&object, download, &mut out).await?;
        out.shutdown().await.map_err(|e| local("write", e))?;
        check_content(file, &object, &tmp, seal.content_len, &identity).await?;
        tokio::fs::rename(&tmp, dest)
            .await
            .map_err(|source| WalError::Local {
                op: "rename into place",
                path: dest.display().to_string(),
                source,
            })?;
        Ok(Fetched {
            file,
            content_len: seal.content_len,
        })
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}
