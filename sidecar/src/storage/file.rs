//! `file:///path`: the local default. Writes go to a temporary file that is
//! fsynced, then hard-linked into place (which fails if the name is taken, so
//! an existing object is never replaced), and the directory is fsynced.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufWriter};

use super::{Created, Download, ErrorKind, Incomplete, ObjectInfo, Reader, Storage, StorageError};

/// Names of in-progress writes start with this; listings skip them.
const TEMP_PREFIX: &str = ".walden-tmp-";
const WRITE_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    fn location(&self, key: &str) -> String {
        format!("file://{}/{key}", self.root.display())
    }

    /// Maps a key to a path under the root, refusing keys that could escape it.
    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StorageError> {
        let rel = Path::new(key);
        let clean = !key.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !clean {
            return Err(StorageError::new(
                ErrorKind::Permanent,
                op,
                self.location(key),
                "invalid object key",
            ));
        }
        Ok(self.root.join(rel))
    }
}

async fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

/// Creates `dir` and any missing parents, fsyncing each parent whose entries changed.
async fn create_dirs_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cur = dir;
    while tokio::fs::metadata(cur).await.is_err() {
        missing.push(cur.to_path_buf());
        match cur.parent() {
            Some(p) => cur = p,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        match tokio::fs::create_dir(d).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if let Some(parent) = d.parent() {
            fsync_dir(parent).await?;
        }
    }
    Ok(())
}

#[async_trait]
impl Storage for FileStorage {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn create(&self, key: &str, mut body: Reader) -> Result<Created, StorageError> {
        let op = "create";
        let path = self.path(op, key)?;
        let loc = self.location(key);
        let io = |e| StorageError::io(op, loc.clone(), e);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        if tokio::fs::try_exists(&path).await.map_err(io)? {
            return Ok(Created::AlreadyExists);
        }
        create_dirs_durably(&dir).await.map_err(io)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(
            "{TEMP_PREFIX}{name}.{}.{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let result = async {
            let file = tokio::fs::File::create(&tmp).await?;
            let mut out = BufWriter::with_capacity(WRITE_BUFFER, file);
            tokio::io::copy(&mut body, &mut out).await?;
            out.flush().await?;
            out.into_inner().sync_all().await?;
            // link() fails if the name exists, so a concurrent writer can never be overwritten.
            match tokio::fs::hard_link(&tmp, &path).await {
                Ok(()) => {
                    fsync_dir(&dir).await?;
                    Ok(Created::Created)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok(Created::AlreadyExists)
                }
                Err(e) => Err(e),
            }
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result.map_err(io)
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        let op = "read";
        let path = self.path(op, key)?;
        let io = |e| StorageError::io(op, self.location(key), e);
        let file = tokio::fs::File::open(&path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        Ok(Download {
            body: Box::pin(tokio::io::BufReader::with_capacity(WRITE_BUFFER, file)),
            size,
        })
    }

    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        let op = "read";
        let path = self.path(op, key)?;
        let io = |e| StorageError::io(op, self.location(key), e);
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let size = file.metadata().await.map_err(io)?.len();
        let start = size.saturating_sub(len);
        file.seek(SeekFrom::Start(start)).await.map_err(io)?;
        let mut buf = Vec::with_capacity((size - start) as usize);
        file.read_to_end(&mut buf).await.map_err(io)?;
        Ok(buf)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        let path = self.path("stat", key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key: key.to_string(),
                size: m.len(),
                modified: m.modified().ok().map(Into::into),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError::io("stat", self.location(key), e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let loc = self.location(&prefix);
        tokio::task::spawn_blocking(move || list_blocking(&root, &prefix))
            .await
            .map_err(|e| StorageError::new(ErrorKind::Transient, "list", loc.clone(), e))?
            .map_err(|e| StorageError::io("list", loc, e))
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let rel = prefix.trim_end_matches('/');
        let dir = if rel.is_empty() {
            self.root.clone()
        } else {
            self.path("list", rel)?
        };
        let loc = self.location(prefix);
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StorageError::io("list", loc, e)),
        };
        let mut out = Vec::new();
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| StorageError::io("list", loc.clone(), e))?
        {
            let is_dir = entry.file_type().await.map(|t| t.is_dir()).unwrap_or(false);
            if is_dir {
                out.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let mut dirs = std::collections::BTreeSet::new();
        for key in keys {
            let path = self.path("delete", key)?;
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {
                    if let Some(d) = path.parent() {
                        dirs.insert(d.to_path_buf());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("delete", self.location(key), e)),
            }
        }
        for d in dirs {
            fsync_dir(&d)
                .await
                .map_err(|e| StorageError::io("delete", d.display().to_string(), e))?;
        }
        Ok(())
    }

    /// Temporary files of writes whose process died before the rename.
    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        let root = self.root.clone();
        let loc = self.url();
        tokio::task::spawn_blocking(move || list_temporaries(&root))
            .await
            .map_err(|e| StorageError::new(ErrorKind::Transient, "list", loc.clone(), e))?
            .map_err(|e| StorageError::io("list", loc, e))
    }

    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        let path = self.path("remove", &item.handle)?;
        let ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if !ours {
            return Err(StorageError::new(
                ErrorKind::Permanent,
                "remove",
                self.location(&item.handle),
                "not a temporary file of walden",
            ));
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("remove", self.location(&item.handle), e)),
        }
    }
}

/// Every file under `root` named like a temporary of [`Storage::create`].
fn list_temporaries(root: &Path) -> std::io::Result<Vec<Incomplete>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let ft = entry.file_type()?;
            let path = entry.path();
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            let temporary = entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX);
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            if ft.is_file() && temporary {
                let key = rel
                    .to_string_lossy()
                    .replace(std::path::MAIN_SEPARATOR, "/");
                out.push(Incomplete {
                    handle: key.clone(),
                    key,
                    started: entry.metadata()?.modified().ok().map(Into::into),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

/// Walks only the directories that can hold keys starting with `prefix`.
fn list_blocking(root: &Path, prefix: &str) -> std::io::Result<Vec<ObjectInfo>> {
    let start_dir = match prefix.rfind('/') {
        Some(i) => root.join(&prefix[..i]),
        None => root.to_path_buf(),
    };
    let mut out = Vec::new();
    let mut stack = vec![start_dir];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(TEMP_PREFIX) {
                continue;
            }
            let path = entry.path();
            let ft = entry.file_type()?;
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let key = rel
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            if ft.is_dir() {
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    stack.push(path);
                }
            } else if ft.is_file() && key.starts_with(prefix) {
                let meta = entry.metadata()?;
                out.push(ObjectInfo {
                    key,
                    size: meta.len(),
                    modified: meta.modified().ok().map(Into::into),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(b: &'static [u8]) -> Reader {
        Box::pin(b)
    }

    #[tokio::test]
    async fn create_is_write_once_and_durable_paths_exist() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().join("repo"));
        assert_eq!(
            s.create("wal/a/x.zst", body(b"one")).await.unwrap(),
            Created::Created
        );
        assert_eq!(
            s.create("wal/a/x.zst", body(b"two")).await.unwrap(),
            Created::AlreadyExists
        );
        let mut d = s.get("wal/a/x.zst").await.unwrap();
        let mut got = Vec::new();
        d.body.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one");
        assert_eq!(d.size, 3);
        // no temporary files left behind
        let names: Vec<_> = std::fs::read_dir(dir.path().join("repo/wal/a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.zst")]);
    }

    #[tokio::test]
    async fn leftover_temporaries_are_listed_and_only_they_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().to_path_buf());
        s.create("wal/a/x.zst", body(b"one")).await.unwrap();
        std::fs::write(dir.path().join("wal/a/.walden-tmp-y.zst.1.2"), b"half").unwrap();
        std::fs::write(dir.path().join(".walden-tmp-walden.json.3.4"), b"half").unwrap();
        let left = s.list_incomplete().await.unwrap();
        let keys: Vec<&str> = left.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(
            keys,
            [".walden-tmp-walden.json.3.4", "wal/a/.walden-tmp-y.zst.1.2"]
        );
        assert!(left.iter().all(|i| i.started.is_some()));
        for i in &left {
            s.remove_incomplete(i).await.unwrap();
        }
        assert!(s.list_incomplete().await.unwrap().is_empty());
        assert!(dir.path().join("wal/a/x.zst").exists());
        let not_ours = Incomplete {
            key: "wal/a/x.zst".into(),
            handle: "wal/a/x.zst".into(),
            started: None,
        };
        assert!(s.remove_incomplete(&not_ours).await.is_err());
        assert!(dir.path().join("wal/a/x.zst").exists());
    }

    #[tokio::test]
    async fn missing_objects_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().to_path_buf());
        let err = s.get("nope").await.err().unwrap();
        assert!(err.is_not_found(), "{err}");
        assert!(s.get_tail("nope", 4).await.unwrap_err().is_not_found());
        assert_eq!(s.head("nope").await.unwrap(), None);
        s.delete(&["nope".into()]).await.unwrap();
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().join("repo"));
        for key in ["../x", "/etc/passwd", "a/../../b", ""] {
            let err = s.create(key, body(b"x")).await.unwrap_err();
            assert_eq!(err.kind, ErrorKind::Permanent, "{key}");
        }
    }

    #[tokio::test]
    async fn list_filters_by_prefix_and_sorts() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::new(dir.path().to_path_buf());
        for k in [
            "wal/b/2",
            "wal/a/1",
            "wal/a/3",
            "backups/x/backup.json",
            "walden.json",
        ] {
            s.create(k, body(b"12")).await.unwrap();
        }
        let keys = |v: Vec<ObjectInfo>| v.into_iter().map(|o| o.key).collect::<Vec<_>>();
        assert_eq!(
            keys(s.list("wal/").await.unwrap()),
            ["wal/a/1", "wal/a/3", "wal/b/2"]
        );
        assert_eq!(keys(s.list("wal/a").await.unwrap()), ["wal/a/1", "wal/a/3"]);
        assert_eq!(keys(s.list("wal").await.unwrap()).len(), 4);
        assert_eq!(s.list("nothing/").await.unwrap(), vec![]);
        assert_eq!(s.list_folders("wal/").await.unwrap(), ["a", "b"]);
        assert_eq!(s.list_folders("").await.unwrap(), ["backups", "wal"]);
        assert!(s.list_folders("nothing/").await.unwrap().is_empty());
        assert_eq!(s.get_tail("wal/a/1", 1).await.unwrap(), b"2");
        assert_eq!(s.get_tail("wal/a/1", 10).await.unwrap(), b"12");
    }
}
