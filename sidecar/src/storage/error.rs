use std::error::Error as StdError;
use std::fmt;

type BoxError = Box<dyn StdError + Send + Sync>;

/// How a storage failure should be treated by callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The object definitively does not exist.
    NotFound,
    /// Worth retrying: network failures, timeouts, throttling, server errors.
    Transient,
    /// Retrying will not help: bad credentials, access denied, bad configuration.
    Permanent,
    /// A write was attempted through read-only storage.
    ReadOnly,
}

/// A storage failure that names the operation, the object and the cause.
#[derive(Debug, thiserror::Error)]
pub struct StorageError {
    pub kind: ErrorKind,
    pub op: &'static str,
    /// Full location of the object (`s3://bucket/prefix/key`), or empty.
    pub object: String,
    /// Shown in the message itself, not as a `source`: reports print the
    /// chain of sources too, which would repeat it.
    pub cause: BoxError,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() {
            write!(f, "{}: {}", self.op, self.cause)
        } else {
            write!(f, "{} {}: {}", self.op, self.object, self.cause)
        }
    }
}

impl StorageError {
    pub fn new(
        kind: ErrorKind,
        op: &'static str,
        object: impl Into<String>,
        cause: impl Into<BoxError>,
    ) -> Self {
        Self {
            kind,
            op,
            object: object.into(),
            cause: cause.into(),
        }
    }

    pub fn not_found(op: &'static str, object: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, op, object, "object not found")
    }

    pub fn config(message: String) -> Self {
        Self::new(ErrorKind::Permanent, "configure storage", "", message)
    }

    pub fn read_only(op: &'static str, url: &str, key: &str) -> Self {
        Self::new(
            ErrorKind::ReadOnly,
            op,
            format!("{url}/{key}"),
            "storage is read-only here (WALDEN_READ_ONLY): a fork or follower never writes to its source archive",
        )
    }

    /// Classifies a filesystem error: a missing file is NotFound, a bad path
    /// is permanent, and the rest (permissions, a full disk, I/O errors) is
    /// transient, because an operator can fix it while we retry.
    pub fn io(op: &'static str, object: impl Into<String>, err: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match err.kind() {
            K::NotFound => ErrorKind::NotFound,
            K::InvalidInput | K::InvalidData | K::Unsupported => ErrorKind::Permanent,
            _ => ErrorKind::Transient,
        };
        Self::new(kind, op, object, err)
    }

    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}
