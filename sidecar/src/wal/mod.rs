//! WAL archiving: `wal-push` (PostgreSQL's `archive_command`) and `wal-fetch`
//! (its `restore_command`).

pub mod fetch;
pub mod header;
pub mod name;
pub mod push;

use std::io;

pub use fetch::{fetch, FetchOptions, Fetched};
pub use name::{SegmentName, WalFile};
pub use push::{push, PushOptions, PushResult, Pushed};

use crate::object::UnsealError;
use crate::repo::RepoError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("{name:?} is not a WAL file name PostgreSQL uses (a 24-hex-digit segment, .partial, .history or .backup file)")]
    InvalidName { name: String },
    #[error("refusing to archive {path}: {reason}")]
    NotASegment { path: String, reason: String },
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
