//! Object storage in memory, for fast unit tests of what sits on top of
//! [`Storage`]: the WAL push and fetch invariants, without a file system
//! or an S3 server. Faults are injected by count (the next N creates or
//! reads fail transiently) and objects can be altered in place, the way a
//! damaged or mis-filed object would look.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::io::AsyncReadExt;

use super::{Created, Download, ErrorKind, ObjectInfo, Reader, Storage, StorageError};

/// One archive in memory. Each has its own URL, since process-wide caches
/// (the repository identity) are keyed by it.
#[derive(Debug)]
pub struct MemoryStorage {
    id: u64,
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    faults: Mutex<Faults>,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            objects: Mutex::default(),
            faults: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct Faults {
    creates: usize,
    gets: usize,
    /// Delete calls that succeed before the failing ones start.
    deletes_first_ok: usize,
    deletes: usize,
    /// Stored under the next created key just before that create: another
    /// writer that won the race between a caller's check and its upload.
    racing_writer: Option<Vec<u8>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryStorage {
    /// The next `n` creates fail with a transient error.
    pub fn fail_creates(&self, n: usize) {
        lock(&self.faults).creates = n;
    }

    /// The next `n` reads fail with a transient error.
    pub fn fail_gets(&self, n: usize) {
        lock(&self.faults).gets = n;
    }

    /// After `ok` more delete calls succeed, the next `n` fail (transient)
    /// without deleting anything.
    pub fn fail_deletes_after(&self, ok: usize, n: usize) {
        let mut faults = lock(&self.faults);
        faults.deletes_first_ok = ok;
        faults.deletes = n;
    }

    /// The next create finds `bytes` already stored under its key, as if
    /// another writer had stored them after the caller looked.
    pub fn race_next_create_with(&self, bytes: Vec<u8>) {
        lock(&self.faults).racing_writer = Some(bytes);
    }

    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.objects).get(key).cloned()
    }

    /// Replaces an object's bytes behind the writer's back.
    pub fn replace(&self, key: &str, bytes: Vec<u8>) {
        lock(&self.objects).insert(key.to_string(), bytes);
    }

    pub fn keys(&self) -> Vec<String> {
        lock(&self.objects).keys().cloned().collect()
    }

    fn injected(
        &self,
        op: &'static str,
        key: &str,
        counter: fn(&mut Faults) -> &mut usize,
    ) -> Result<(), StorageError> {
        let mut faults = lock(&self.faults);
        let left = counter(&mut faults);
        if *left == 0 {
            return Ok(());
        }
        *left -= 1;
        Err(StorageError::new(
            ErrorKind::Transient,
            op,
            self.location(key),
            "injected fault",
        ))
    }

    fn location(&self, key: &str) -> String {
        format!("{}/{key}", self.url())
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn url(&self) -> String {
        format!("memory://test-{}", self.id)
    }

    async fn create(&self, key: &str, mut body: Reader) -> Result<Created, StorageError> {
        self.injected("create", key, |f| &mut f.creates)?;
        let mut bytes = Vec::new();
        body.read_to_end(&mut bytes)
            .await
            .map_err(|e| StorageError::io("create", self.location(key), e))?;
        let racing = lock(&self.faults).racing_writer.take();
        let mut objects = lock(&self.objects);
        if let Some(other) = racing {
            objects.insert(key.to_string(), other);
        }
        if objects.contains_key(key) {
            return Ok(Created::AlreadyExists);
        }
        objects.insert(key.to_string(), bytes);
        Ok(Created::Created)
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        self.injected("get", key, |f| &mut f.gets)?;
        let bytes = self
            .object(key)
            .ok_or_else(|| StorageError::not_found("get", self.location(key)))?;
        Ok(Download {
            size: bytes.len() as u64,
            body: Box::pin(std::io::Cursor::new(bytes)),
        })
    }

    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        self.injected("get", key, |f| &mut f.gets)?;
        let bytes = self
            .object(key)
            .ok_or_else(|| StorageError::not_found("get", self.location(key)))?;
        let from = bytes.len().saturating_sub(len as usize);
        Ok(bytes[from..].to_vec())
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        Ok(self.object(key).map(|b| ObjectInfo {
            key: key.to_string(),
            size: b.len() as u64,
            modified: None,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        Ok(lock(&self.objects)
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, b)| ObjectInfo {
                key: k.clone(),
                size: b.len() as u64,
                modified: None,
            })
            .collect())
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let mut folders: Vec<String> = lock(&self.objects)
            .keys()
            .filter_map(|k| {
                k.strip_prefix(prefix)?
                    .split_once('/')
                    .map(|(f, _)| f.to_string())
            })
            .collect();
        folders.dedup();
        Ok(folders)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let skip = {
            let mut faults = lock(&self.faults);
            let skip = faults.deletes_first_ok > 0;
            faults.deletes_first_ok = faults.deletes_first_ok.saturating_sub(1);
            skip
        };
        if !skip {
            let first = keys.first().map_or("", String::as_str);
            self.injected("delete", first, |f| &mut f.deletes)?;
        }
        let mut objects = lock(&self.objects);
        for k in keys {
            objects.remove(k);
        }
        Ok(())
    }
}
