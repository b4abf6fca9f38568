//! The repository identity, `walden.json`: which database a prefix belongs to.
//!
//! It is created by the first WAL push and never rewritten. Every later push
//! compares its segment's system identifier with it, so two databases can
//! never share a prefix (safety invariant 3), and every reader checks the
//! format version so that an unknown layout is refused rather than misread.

use std::io::Cursor;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::storage::{Created, Storage, StorageError};
use crate::wal::header::PageHeader;

/// The storage format this build reads and writes.
pub const FORMAT: u32 = 1;
/// Key of the identity document under the prefix.
pub const IDENTITY_KEY: &str = "walden.json";
/// The identity document is tiny; refuse to read more than this.
const MAX_IDENTITY_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoIdentity {
    pub format: u32,
    /// PostgreSQL's database system identifier, as a decimal string
    /// (a u64 does not survive JSON tools that use doubles).
    pub system_identifier: String,
    /// PostgreSQL major version, from the WAL page magic, when known.
    pub pg_version: Option<u32>,
    pub wal_segment_size: u32,
    /// WAL page magic of the first pushed segment, e.g. `0xD110` (absent when
    /// the repository was created by a base backup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_page_magic: Option<String>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_fingerprint: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{url}/{IDENTITY_KEY} is not a valid repository identity: {reason}")]
    Malformed { url: String, reason: String },
    #[error(
        "{url} uses storage format {found}, but this walden understands format {FORMAT} only; \
         use a walden release that supports format {found}"
    )]
    UnsupportedFormat { url: String, found: u32 },
    #[error(
        "refusing {what}: it belongs to the database with system identifier {found}, but {url} \
         holds the archive of database {expected} (see {IDENTITY_KEY}). Two databases must never \
         share a prefix: give this one its own storage prefix"
    )]
    SystemIdMismatch {
        what: String,
        url: String,
        found: String,
        expected: String,
        /// PostgreSQL major versions of the refused server and of the
        /// archive, when known: a newer server is what pg_upgrade leaves.
        found_pg_version: Option<u32>,
        expected_pg_version: Option<u32>,
    },
    #[error("no Walden repository at {url}: {IDENTITY_KEY} does not exist (nothing was ever archived there, or the URL is wrong)")]
    Missing { url: String },
}

impl RepoError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Storage(e) if e.is_transient())
    }
}

impl RepoIdentity {
    pub fn from_header(header: &PageHeader) -> Self {
        Self {
            wal_page_magic: Some(format!("0x{:04X}", header.magic)),
            ..Self::new(
                header.system_identifier,
                header.pg_version(),
                header.segment_size,
            )
        }
    }

    pub fn new(system_identifier: u64, pg_version: Option<u32>, wal_segment_size: u32) -> Self {
        Self {
            format: FORMAT,
            system_identifier: system_identifier.to_string(),
            pg_version,
            wal_segment_size,
            wal_page_magic: None,
            created_at: Utc::now(),
            created_by: format!("walden {}", env!("CARGO_PKG_VERSION")),
            encryption_key_fingerprint: None,
        }
    }
}

/// How long a read `walden.json` is reused within one process. It is written
/// once and never changed, so this only saves requests (one per WAL file in
/// the daemon); the bound keeps a prefix wiped by hand from being trusted for
/// long.
const IDENTITY_TTL: Duration = Duration::from_secs(60);
static IDENTITIES: Mutex<Vec<(String, Instant, RepoIdentity)>> = Mutex::new(Vec::new());

fn cached(url: &str) -> Option<RepoIdentity> {
    let cache = IDENTITIES.lock().ok()?;
    cache
        .iter()
        .find(|(u, at, _)| u == url && at.elapsed() < IDENTITY_TTL)
        .map(|(_, _, id)| id.clone())
}

fn remember(url: &str, id: &RepoIdentity) {
    if let Ok(mut cache) = IDENTITIES.lock() {
        cache.retain(|(u, at, _)| u != url && at.elapsed() < IDENTITY_TTL);
        cache.push((url.to_string(), Instant::now(), id.clone()));
    }
}

/// The refusal a server of database `system_identifier` meets at the
/// archive of `identity`, if it is another database.
pub fn mismatch(
    identity: &RepoIdentity,
    system_identifier: u64,
    pg_version: Option<u32>,
) -> Option<walden_contract::api::IdentityMismatch> {
    let server = system_identifier.to_string();
    (identity.system_identifier != server).then(|| walden_contract::api::IdentityMismatch {
        server_system_identifier: server,
        server_pg_version: pg_version,
        archive_system_identifier: identity.system_identifier.clone(),
        archive_pg_version: identity.pg_version,
    })
}

/// Reads `walden.json`; `None` when the prefix holds no repository yet.
pub async fn load(storage: &dyn Storage) -> Result<Option<RepoIdentity>, RepoError> {
    let url = storage.url();
    if let Some(id) = cached(&url) {
        return Ok(Some(id));
    }
    let download = match storage.get(IDENTITY_KEY).await {
        Ok(d) => d,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut bytes = Vec::new();
    download
        .body
        .take(MAX_IDENTITY_BYTES)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| StorageError::io("read", format!("{url}/{IDENTITY_KEY}"), e))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| RepoError::Malformed {
            url: url.clone(),
            reason: e.to_string(),
        })?;
    let found = value.get("format").and_then(|f| f.as_u64()).unwrap_or(0) as u32;
    if found != FORMAT {
        return Err(RepoError::UnsupportedFormat { url, found });
    }
    let id: RepoIdentity = serde_json::from_value(value).map_err(|e| RepoError::Malformed {
        url: url.clone(),
        reason: e.to_string(),
    })?;
    remember(&url, &id);
    Ok(Some(id))
}

/// Reads `walden.json`, failing when the repository does not exist.
pub async fn require(storage: &dyn Storage) -> Result<RepoIdentity, RepoError> {
    load(storage)
        .await?
        .ok_or_else(|| RepoError::Missing { url: storage.url() })
}

/// Returns the identity, creating it from `header` on the first push, and
/// refuses a segment of another database.
pub async fn ensure(
    storage: &dyn Storage,
    header: &PageHeader,
    what: &str,
) -> Result<RepoIdentity, RepoError> {
    ensure_identity(storage, RepoIdentity::from_header(header), what).await
}

/// Returns the stored identity (creating it from `fresh` if the prefix is new)
/// and refuses `what` unless it belongs to the same database.
pub async fn ensure_identity(
    storage: &dyn Storage,
    fresh: RepoIdentity,
    what: &str,
) -> Result<RepoIdentity, RepoError> {
    let found = fresh.system_identifier.clone();
    let found_pg_version = fresh.pg_version;
    let identity = match load(storage).await? {
        Some(id) => id,
        None => {
            let mut json = serde_json::to_vec_pretty(&fresh).map_err(|e| RepoError::Malformed {
                url: storage.url(),
                reason: e.to_string(),
            })?;
            json.push(b'\n');
            match storage
                .create(IDENTITY_KEY, Box::pin(Cursor::new(json)))
                .await?
            {
                Created::Created => {
                    tracing::info!(storage = %storage.url(), system_identifier = %fresh.system_identifier, "created repository");
                    fresh
                }
                // Another server created it first: its identity is the one that counts.
                Created::AlreadyExists => require(storage).await?,
            }
        }
    };
    if identity.system_identifier != found {
        return Err(RepoError::SystemIdMismatch {
            what: what.to_string(),
            url: storage.url(),
            found,
            expected: identity.system_identifier,
            found_pg_version,
            expected_pg_version: identity.pg_version,
        });
    }
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_database_is_a_mismatch_naming_both() {
        let archive = RepoIdentity::new(111, Some(15), 16 << 20);
        assert_eq!(mismatch(&archive, 111, Some(15)), None);
        assert_eq!(mismatch(&archive, 111, Some(18)), None, "one database");
        let m = mismatch(&archive, 222, Some(18)).expect("another database");
        assert_eq!(
            (
                m.server_system_identifier.as_str(),
                m.server_pg_version,
                m.archive_system_identifier.as_str(),
                m.archive_pg_version
            ),
            ("222", Some(18), "111", Some(15))
        );
        assert_eq!(
            mismatch(&archive, 222, None).and_then(|m| m.server_pg_version),
            None
        );
    }
}
