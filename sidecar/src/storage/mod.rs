//! Object storage behind one small async trait.
//!
//! Every object Walden writes is written once and never rewritten, so the only
//! write is [`Storage::create`], which refuses to replace an existing object.

mod error;
mod file;
#[cfg(test)]
pub mod memory;
mod s3;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncRead;

pub use error::{ErrorKind, StorageError};
pub use file::FileStorage;
pub use s3::{S3Settings, S3Storage};

/// A stream of bytes going to or coming from storage.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;

/// One stored object, as a listing reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the repository prefix, `/`-separated.
    pub key: String,
    pub size: u64,
    /// When the object was stored, where the backend reports it.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// What [`Storage::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object did not exist and now holds the body.
    Created,
    /// An object already existed under that key; it was left untouched.
    AlreadyExists,
}

/// What an interrupted write left behind: a temporary file, or an S3
/// multipart upload that was never completed or aborted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Incomplete {
    /// Where it lives relative to the prefix (the temporary file, or the key being uploaded).
    pub key: String,
    /// What the backend needs to remove it (the upload id; for files, the key).
    pub handle: String,
    /// When the write started, where the backend reports it.
    pub started: Option<chrono::DateTime<chrono::Utc>>,
}

/// A download: the body and its exact stored length.
pub struct Download {
    pub body: Reader,
    pub size: u64,
}

/// Object storage as Walden needs it: write-once objects under a prefix.
#[async_trait]
pub trait Storage: Send + Sync + fmt::Debug {
    /// The storage URL, for messages (`s3://bucket/prefix`, `file:///path`).
    fn url(&self) -> String;

    /// Stores `body` under `key` unless an object already exists there.
    /// Returns only once the object is durable (fsynced, or acknowledged by S3).
    async fn create(&self, key: &str, body: Reader) -> Result<Created, StorageError>;

    /// Opens an object for reading. A missing object is [`ErrorKind::NotFound`].
    async fn get(&self, key: &str) -> Result<Download, StorageError>;

    /// Reads the last `len` bytes of an object (or all of it, if shorter).
    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError>;

    /// The object's size, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError>;

    /// Every object whose key starts with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError>;

    /// The names of the "folders" directly under `prefix` (which ends with `/`),
    /// sorted: a delimiter listing, so callers can find the newest WAL folder
    /// without listing every segment.
    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError>;

    /// Deletes the objects; keys that do not exist are not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError>;

    /// The size of the body that was written to a listed object: the listed
    /// size, unless a wrapper (encryption) adds framing the engine never sees.
    async fn written_size(&self, object: &ObjectInfo) -> Result<u64, StorageError> {
        Ok(object.size)
    }

    /// Leftovers of interrupted writes under the prefix (none where the
    /// backend leaves none). An error means the backend cannot tell.
    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        Ok(Vec::new())
    }

    /// Removes one leftover [`Storage::list_incomplete`] reported.
    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        let _ = item;
        Ok(())
    }
}

/// Opens the storage a URL names: `file:///path` or `s3://bucket/prefix`.
pub async fn open(url: &str, s3: &S3Settings) -> Result<Arc<dyn Storage>, StorageError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        StorageError::config(format!(
            "storage URL {url:?} is not a URL ({e}); expected s3://bucket/prefix or file:///path"
        ))
    })?;
    match parsed.scheme() {
        "file" => {
            if parsed
                .host_str()
                .is_some_and(|h| !h.is_empty() && h != "localhost")
            {
                return Err(StorageError::config(format!(
                    "storage URL {url:?} names a host; a file URL needs three slashes: file:///path"
                )));
            }
            // The URL parser turns `file:relative` into /relative: insist on the written form.
            let rest = url
                .strip_prefix("file://")
                .map(|r| r.strip_prefix("localhost").unwrap_or(r));
            if !rest.is_some_and(|r| r.starts_with('/')) {
                return Err(StorageError::config(format!(
                    "storage URL {url:?} is not an absolute file URL: write file:///absolute/path"
                )));
            }
            let path = parsed.to_file_path().map_err(|()| {
                StorageError::config(format!("storage URL {url:?} is not an absolute file path"))
            })?;
            if path.parent().is_none() {
                return Err(StorageError::config(format!(
                    "storage URL {url:?} names the root directory; give the archive its own directory, e.g. file:///var/lib/walden"
                )));
            }
            Ok(Arc::new(FileStorage::new(path)))
        }
        "s3" => {
            let bucket = parsed.host_str().filter(|b| !b.is_empty()).ok_or_else(|| {
                StorageError::config(format!(
                    "storage URL {url:?} has no bucket: s3://bucket/prefix"
                ))
            })?;
            let prefix = parsed.path().trim_matches('/');
            Ok(Arc::new(S3Storage::connect(bucket, prefix, s3).await?))
        }
        other => Err(StorageError::config(format!(
            "storage URL {url:?} has scheme {other:?}; supported: s3://bucket/prefix, file:///path"
        ))),
    }
}

/// Refuses every write: the storage of a fork or follower, which must never
/// modify its source's archive (safety invariant 6).
#[derive(Debug)]
pub struct ReadOnly(pub Arc<dyn Storage>);

#[async_trait]
impl Storage for ReadOnly {
    fn url(&self) -> String {
        self.0.url()
    }
    async fn create(&self, key: &str, _body: Reader) -> Result<Created, StorageError> {
        Err(StorageError::read_only("create", &self.0.url(), key))
    }
    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        self.0.get(key).await
    }
    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        self.0.get_tail(key, len).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.0.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.0.list(prefix).await
    }
    async fn written_size(&self, object: &ObjectInfo) -> Result<u64, StorageError> {
        self.0.written_size(object).await
    }
    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.0.list_folders(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        Err(StorageError::read_only("delete", &self.0.url(), first))
    }
    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        self.0.list_incomplete().await
    }
    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        Err(StorageError::read_only("remove", &self.0.url(), &item.key))
    }
}

/// Joins a repository prefix and a key with exactly one `/`.
pub(crate) fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}/{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_rejects_bad_urls_with_specific_messages() {
        let s3 = S3Settings::default();
        for (url, needle) in [
            ("not a url", "is not a URL"),
            ("ftp://host/x", "scheme \"ftp\""),
            ("file://host/x", "three slashes"),
            ("s3:///prefix", "no bucket"),
            ("file:relative", "not an absolute file URL"),
            ("file:relative/deeper", "not an absolute file URL"),
            ("file:/single-slash", "not an absolute file URL"),
            ("file://", "not an absolute file URL"),
            ("file:///", "root directory"),
            ("file:////", "root directory"),
            ("file://localhost/", "root directory"),
        ] {
            let err = open(url, &s3).await.expect_err(url).to_string();
            assert!(err.contains(needle), "{url}: {err}");
        }
        for good in ["file:///tmp/archive", "file://localhost/tmp/archive"] {
            let s = open(good, &s3).await.expect(good);
            assert_eq!(s.url(), "file:///tmp/archive");
        }
    }

    #[tokio::test]
    async fn read_only_refuses_writes_and_passes_reads() {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().to_path_buf()));
        let body: Reader = Box::pin(&b"abc"[..]);
        inner.create("a", body).await.unwrap();
        let ro = ReadOnly(inner);
        let body: Reader = Box::pin(&b"xyz"[..]);
        let err = ro.create("b", body).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::ReadOnly);
        assert!(ro.delete(&["a".into()]).await.is_err());
        assert_eq!(ro.head("a").await.unwrap().unwrap().size, 3);
        assert!(!dir.path().join("b").exists());
    }

    #[test]
    fn join_key_handles_empty_prefix() {
        assert_eq!(join_key("", "wal/x"), "wal/x");
        assert_eq!(join_key("db1", "wal/x"), "db1/wal/x");
    }
}
