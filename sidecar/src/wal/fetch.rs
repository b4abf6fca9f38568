//! `wal-fetch`: restore one file PostgreSQL asks of `restore_command`.
//!
//! The content is verified against its checksum before it reaches `<dest>`,
//! which is written atomically (temporary file, then rename). "Not found" is
//! reported only when storage says the object does not exist; every other
//! failure is retried and then reported as an error (safety invariant 4).

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tracing::Instrument;

use super::{WalError, WalFile};
use crate::object::unseal;
use crate::repo;
use crate::retry::RetryPolicy;
use crate::storage::Storage;

#[derive(Debug, Clone, Copy, Default)]
pub struct FetchOptions {
    pub retry: RetryPolicy,
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
        let fetched = opts
            .retry
            .run("wal-fetch", WalError::is_transient, || {
                fetch_once(storage, file, dest)
            })
            .await?;
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
    repo::require(storage).await?;
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
