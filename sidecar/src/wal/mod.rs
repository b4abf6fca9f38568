//! WAL archiving: `wal-push` (PostgreSQL's `archive_command`) and `wal-fetch`
//! (its `restore_command`).

pub mod fetch;
pub mod files;
pub mod header;
pub mod holes;
#[cfg(test)]
mod invariants;
pub mod name;
pub mod push;

use std::io;

pub use fetch::{fetch, FetchOptions, Fetched, DEFAULT_HOLE_GRACE};
pub use name::{SegmentName, WalFile};
pub use push::{push, PushOptions, PushResult, Pushed};

use crate::object::UnsealError;
use crate::repo::RepoError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{} is not a WAL file name PostgreSQL uses (a 24-hex-digit segment, .partial, .history or .backup file)", crate::restore::settings::echo(.name))]
    InvalidName { name: String },
    #[error("refusing to archive {path}: {reason}")]
    NotASegment { path: String, reason: String },
    #[error("refusing to archive {path}: {reason}; nothing was stored")]
    Malformed { path: String, reason: String },
    #[error(
        "refusing to archive {path}: its header says it starts at LSN {found:X}/{found_lo:08X}, but its name means \
         {expected:X}/{expected_lo:08X}; the file was renamed or recycled",
        found = .found >> 32, found_lo = .found & 0xFFFF_FFFF, expected = .expected >> 32, expected_lo = .expected & 0xFFFF_FFFF
    )]
    WrongPosition {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("{op} {path}: {source}")]
    Local {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Unseal(#[from] UnsealError),
    #[error(
        "refusing to overwrite {object}: the archive holds different content (SHA-256 {stored}, {stored_len} bytes) \
         than {path} (SHA-256 {local}, {local_len} bytes). Two servers may be archiving into one prefix, or the \
         local file is damaged; nothing was changed"
    )]
    Conflict {
        object: String,
        path: String,
        stored: String,
        stored_len: u64,
        local: String,
        local_len: u64,
    },
    #[error("refusing to overwrite {object}: it exists but is not a Walden object (no checksum trailer)")]
    ForeignObject { object: String },
    #[error("{name} is not in the archive {url}")]
    NotFound { name: String, url: String },
    #[error(
        "{name} is missing from {url}, but {reason}: a hole in the archive (waited {waited:.1}s for an \
         upload in flight). Recovery must not end here; restore the missing file, or restore to a target before it"
    )]
    Hole {
        name: String,
        url: String,
        reason: String,
        waited: f64,
    },
    #[error("{object} is not {name}: {reason}; refusing to hand it to PostgreSQL")]
    WrongContent {
        object: String,
        name: String,
        reason: String,
    },
}

impl WalError {
    /// Worth retrying: the storage or network may recover.
    pub fn is_transient(&self) -> bool {
        match self {
            WalError::Storage(e) => e.is_transient(),
            WalError::Repo(e) => e.is_transient(),
            WalError::Unseal(UnsealError::Read { .. }) => true,
            _ => false,
        }
    }

    /// The file is definitively not in the archive (and nothing else went wrong).
    pub fn is_not_found(&self) -> bool {
        matches!(self, WalError::NotFound { .. })
    }
}
