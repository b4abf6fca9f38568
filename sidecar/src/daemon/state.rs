//! What the daemon has archived, remembered across its own restarts.
//!
//! Each durably stored WAL file is appended as one JSON line to
//! `<state-dir>/archived.jsonl` and fsynced *after* storage acknowledged the
//! object, so the log never claims more than storage holds. A remembered
//! file is answered from memory only while its size, modification time and
//! inode are what they were when it was read for upload: a file that changed
//! since is archived again (and storage then decides: identical content is
//! fine, different content is a loud conflict). A torn last line from a crash
//! mid-append is ignored: that file is simply pushed again.
//!
//! Every record names the repository it was stored in (storage URL, S3
//! endpoint and the system identifier of its `walden.json`). The log is
//! opened for one repository: records of any other (a daemon restarted on
//! another `WALDEN_STORAGE` or prefix with the same state directory, or an
//! archive wiped and started again) are dropped, so those files are pushed
//! again and storage decides.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

const LOG_NAME: &str = "archived.jsonl";
/// Entries kept in memory and on disk; PostgreSQL never asks again about
/// files this far behind.
const KEEP: usize = 4096;

/// Identity of a local file's content as far as the filesystem tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub dev: u64,
    pub ino: u64,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub name: String,
    pub stamp: Stamp,
    pub archived_at: DateTime<Utc>,
    /// The repository the file was stored in ([`repository`]); records
    /// without one (older daemons) belong to none.
    #[serde(default)]
    pub repository: Option<String>,
}

/// Names a repository for the log: where it is and which database's it is.
pub fn repository(storage_url: &str, s3_endpoint: Option<&str>, system_identifier: &str) -> String {
    match s3_endpoint.filter(|e| !e.is_empty()) {
        Some(e) => format!("{storage_url} at {e}, system {system_identifier}"),
        None => format!("{storage_url}, system {system_identifier}"),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct StateError {
    op: &'static str,
    path: String,
    source: std::io::Error,
}

/// The persisted log of archived files.
#[derive(Debug)]
pub struct ArchivedLog {
    dir: PathBuf,
    file: File,
    entries: HashMap<String, Record>,
    order: VecDeque<String>,
    lines: usize,
    keep: usize,
}

fn err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError {
        op,
        path: path.display().to_string(),
        source,
    }
}

impl From<crate::durable::WriteError> for StateError {
    fn from(e: crate::durable::WriteError) -> Self {
        StateError {
            op: e.op,
            path: e.path.display().to_string(),
            source: e.source,
        }
    }
}

impl ArchivedLog {
    /// Opens (creating) the log in `dir` and loads what it remembers of
    /// `repository` (`None`: the storage holds no repository yet, so nothing).
    pub fn open(dir: &Path, repository: Option<&str>) -> Result<Self, StateError> {
        Self::open_keeping(dir, repository, KEEP)
    }

    fn open_keeping(dir: &Path, repository: Option<&str>, keep: usize) -> Result<Self, StateError> {
        std::fs::create_dir_all(dir).map_err(err("create", dir))?;
        let path = dir.join(LOG_NAME);
        let mut entries = HashMap::new();
        let mut order = VecDeque::new();
        let mut lines = 0;
        let mut foreign = 0;
        match File::open(&path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(err("read", &path))?;
                    lines += 1;
                    match serde_json::from_str::<Record>(&line) {
                        Ok(r) if repository.is_none() || r.repository.as_deref() != repository => {
                            foreign += 1;
                        }
                        Ok(r) => {
                            if entries.insert(r.name.clone(), r.clone()).is_none() {
                                order.push_back(r.name);
                            }
                        }
                        Err(e) => tracing::warn!(
                            path = %path.display(),
                            error = %e,
                            "ignoring an unreadable line of the archive log (a crash mid-write); that file will be pushed again"
                        ),
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("open", &path)(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(err("open", &path))?;
        crate::durable::sync_dir(dir)?;
        let mut log = Self {
            dir: dir.to_path_buf(),
            file,
            entries,
            order,
            lines,
            keep,
        };
        log.trim();
        if foreign > 0 {
            tracing::info!(
                records = foreign,
                repository = repository.unwrap_or("none yet"),
                "forgetting archive log records of another repository; those files are pushed again if asked"
            );
        }
        if foreign > 0 || log.lines > 2 * log.keep {
            log.compact()?;
        }
        Ok(log)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    /// True when `name` was archived from a file with exactly this stamp.
    pub fn remembers(&self, name: &str, stamp: &Stamp) -> bool {
        self.entries.get(name).is_some_and(|r| r.stamp == *stamp)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The newest WAL segment remembered (by name), for status after a restart.
    pub fn newest_segment(&self) -> Option<&Record> {
        self.entries
            .values()
            .filter(|r| r.name.len() == 24)
            .max_by(|a, b| a.name.cmp(&b.name))
    }

    /// Appends `record` and fsyncs the log before returning.
    pub fn record(&mut self, record: Record) -> Result<(), StateError> {
        let path = self.path();
        let mut line = serde_json::to_vec(&record)
            .map_err(|e| err("encode a record for", &path)(std::io::Error::other(e)))?;
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(err("append to", &path))?;
        self.file.sync_data().map_err(err("fsync", &path))?;
        self.lines += 1;
        if self
            .entries
            .insert(record.name.clone(), record.clone())
            .is_none()
        {
            self.order.push_back(record.name);
        }
        self.trim();
        if self.lines > 2 * self.keep {
            self.compact()?;
        }
        Ok(())
    }

    fn trim(&mut self) {
        while self.order.len() > self.keep {
            if let Some(old) = self.order.pop_front() {
                self.entries.remove(&old);
            }
        }
    }

    /// Rewrites the log with only the kept entries, atomically.
    fn compact(&mut self) -> Result<(), StateError> {
        let path = self.path();
        let mut buf = Vec::new();
        for name in &self.order {
            if let Some(r) = self.entries.get(name) {
                serde_json::to_writer(&mut buf, r)
                    .map_err(|e| err("encode", &path)(std::io::Error::other(e)))?;
                buf.push(b'\n');
            }
        }
        crate::durable::replace(&path, &buf, 0o600)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(err("open", &path))?;
        self.lines = self.order.len();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "file:///archive, system 7";

    fn stamp_of(p: &Path) -> Stamp {
        Stamp::of(&std::fs::metadata(p).unwrap())
    }

    fn record(name: &str, stamp: Stamp) -> Record {
        Record {
            name: name.into(),
            stamp,
            archived_at: Utc::now(),
            repository: Some(REPO.into()),
        }
    }

    /// Only records of the repository the log is opened for count; the others
    /// are dropped from the file too, so switching back does not revive them.
    #[test]
    fn records_of_another_repository_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let stamp = Stamp {
            size: 1,
            mtime_ns: 2,
            dev: 3,
            ino: 4,
        };
        let seg = "000000010000000000000001";
        {
            let mut log = ArchivedLog::open(dir.path(), Some(REPO)).unwrap();
            log.record(record(seg, stamp)).unwrap();
        }
        // (opened for, remembered?)
        let other = repository("file:///elsewhere", None, "7");
        let wiped = repository("file:///archive", None, "8");
        let via = repository("s3://b/p", Some("http://127.0.0.1:9000"), "7");
        assert_eq!(via, "s3://b/p at http://127.0.0.1:9000, system 7");
        assert!(ArchivedLog::open(dir.path(), Some(REPO))
            .unwrap()
            .remembers(seg, &stamp));
        for (repo, remembered) in [(Some(other.as_str()), false), (Some(REPO), false)] {
            let log = ArchivedLog::open(dir.path(), repo).unwrap();
            assert_eq!(log.remembers(seg, &stamp), remembered, "{repo:?}");
        }
        let mut log = ArchivedLog::open(dir.path(), Some(wiped.as_str())).unwrap();
        assert!(!log.remembers(seg, &stamp));
        log.record(Record {
            repository: Some(wiped.clone()),
            ..record(seg, stamp)
        })
        .unwrap();
        drop(log);
        // No repository (nothing stored yet): nothing is remembered.
        assert!(!ArchivedLog::open(dir.path(), None)
            .unwrap()
            .remembers(seg, &stamp));
        // Records of older daemons name no repository: forgotten as well.
        let old = r#"{"name":"000000010000000000000002","stamp":{"size":1,"mtimeNs":2,"dev":3,"ino":4},"archivedAt":"2026-01-01T00:00:00Z"}"#;
        std::fs::write(dir.path().join(LOG_NAME), format!("{old}\n")).unwrap();
        let log = ArchivedLog::open(dir.path(), Some(REPO)).unwrap();
        assert!(log.is_empty());
    }

    #[test]
    fn remembers_across_reopen_and_forgets_changed_files() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join("000000010000000000000001");
        std::fs::write(&seg, b"one").unwrap();
        let stamp = stamp_of(&seg);
        {
            let mut log = ArchivedLog::open(&dir.path().join("state"), Some(REPO)).unwrap();
            assert!(!log.remembers("000000010000000000000001", &stamp));
            log.record(record("000000010000000000000001", stamp))
                .unwrap();
        }
        // A torn line at the end, as after a crash mid-append.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("state").join(LOG_NAME))
            .unwrap();
        f.write_all(br#"{"name":"0000000100000000000"#).unwrap();
        drop(f);
        let log = ArchivedLog::open(&dir.path().join("state"), Some(REPO)).unwrap();
        assert!(log.remembers("000000010000000000000001", &stamp));
        assert_eq!(log.len(), 1);
        // Same name, different content (size and mtime change): not remembered.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&seg, b"other content").unwrap();
        assert!(!log.remembers("000000010000000000000001", &stamp_of(&seg)));
    }

    #[test]
    fn compaction_keeps_the_newest_entries() {
        let dir = tempfile::tempdir().unwrap();
        const KEEP: usize = 50;
        let mut log = ArchivedLog::open_keeping(dir.path(), Some(REPO), KEEP).unwrap();
        let stamp = Stamp {
            size: 1,
            mtime_ns: 2,
            dev: 3,
            ino: 4,
        };
        for i in 0..(2 * KEEP + 10) {
            log.record(record(&format!("{i:024X}"), stamp)).unwrap();
        }
        assert_eq!(log.len(), KEEP);
        let last = format!("{:024X}", 2 * KEEP + 9);
        assert!(log.remembers(&last, &stamp));
        assert!(!log.remembers(&format!("{:024X}", 0), &stamp));
        let reopened = ArchivedLog::open_keeping(dir.path(), Some(REPO), KEEP).unwrap();
        assert_eq!(reopened.len(), KEEP);
        assert!(reopened.remembers(&last, &stamp));
        let lines = std::fs::read_to_string(dir.path().join(LOG_NAME))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * KEEP, "{lines} lines after compaction");
    }
}
