//! Prefetch: when PostgreSQL asks for segment N, download N+1… N+depth of the
//! same timeline into the daemon's own folder, verified, so its next requests
//! are served from local disk.
//!
//! Files are keyed by their full name, timeline included, so a request is
//! only ever served the exact file it named: when PostgreSQL moves to another
//! timeline (a history file appeared) it names segments of that timeline,
//! which are fetched and prefetched on that timeline, and files prefetched
//! for the old one are deleted. Disk use is bounded by `depth` segments plus
//! the downloads running; everything is removed at start and on shutdown.
//! Only successful downloads are kept: "absent" is never remembered, because
//! the primary may archive that segment a moment later.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{watch, OnceCell};
use tracing::Instrument;

use super::lock;
use super::metrics::{Metrics, ResultLabel, SourceLabel};
use crate::repo;
use crate::storage::Storage;
use crate::wal::{self, FetchOptions, SegmentName, WalError, WalFile};

/// A restored file ready to hand to the client; removed when dropped.
#[derive(Debug)]
pub struct Served {
    pub path: PathBuf,
    pub len: u64,
    pub prefetched: bool,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, Clone)]
struct Ready {
    path: PathBuf,
    len: u64,
}

type Outcome = Option<Result<Ready, String>>;

#[derive(Default)]
struct Inner {
    ready: HashMap<String, Ready>,
    in_flight: HashMap<String, watch::Receiver<Outcome>>,
    /// Segments wanted ahead of the last successful request.
    wanted: HashSet<String>,
}

pub struct Prefetcher {
    storage: Arc<dyn Storage>,
    opts: FetchOptions,
    depth: usize,
    dir: PathBuf,
    segment_size: OnceCell<u32>,
    inner: Mutex<Inner>,
    seq: AtomicU64,
    metrics: Metrics,
}

impl Prefetcher {
    /// A prefetcher working in `dir`, which it empties first (nothing there
    /// from an earlier run is trusted).
    pub fn new(
        storage: Arc<dyn Storage>,
        opts: FetchOptions,
        depth: usize,
        dir: PathBuf,
        metrics: Metrics,
    ) -> std::io::Result<Arc<Self>> {
        clear_dir(&dir)?;
        Ok(Arc::new(Self {
            storage,
            opts,
            depth,
            dir,
            segment_size: OnceCell::new(),
            inner: Mutex::new(Inner::default()),
            seq: AtomicU64::new(0),
            metrics,
        }))
    }

    fn temp_name(&self, name: &str, kind: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{kind}-{n}-{name}"))
    }

    /// Handles PostgreSQL's `wal-fetch <name>`: the verified file, or an error
    /// (`is_not_found()` only when storage says it is absent).
    pub async fn fetch(self: &Arc<Self>, name: &str) -> Result<Served, WalError> {
        let started = Instant::now();
        let result = self.fetch_inner(name).await;
        let label = match &result {
            Ok(_) => "restored",
            Err(e) if e.is_not_found() => "not_found",
            Err(_) => "failed",
        };
        self.metrics
            .wal_fetches
            .get_or_create(&ResultLabel { result: label })
            .inc();
        if let Ok(served) = &result {
            let source = if served.prefetched {
                "prefetch"
            } else {
                "storage"
            };
            self.metrics
                .wal_fetch_duration
                .get_or_create(&SourceLabel { source })
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }

    async fn fetch_inner(self: &Arc<Self>, name: &str) -> Result<Served, WalError> {
        let file = WalFile::parse(name).ok_or_else(|| WalError::InvalidName {
            name: name.to_string(),
        })?;
        let WalFile::Segment(seg) = file else {
            // History, partial and backup files: always asked of storage, never cached.
            return self.direct(name).await;
        };
        if self.depth > 0 {
            if let Some(served) = self.take_prefetched(name).await {
                self.metrics.prefetch_hits.inc();
                self.plan(seg).await;
                return Ok(served);
            }
            self.metrics.prefetch_misses.inc();
        }
        let served = self.direct(name).await?;
        self.plan(seg).await;
        Ok(served)
    }

    /// A prefetched copy of `name`, waiting for a running download of it.
    async fn take_prefetched(&self, name: &str) -> Option<Served> {
        let pending = {
            let mut inner = lock(&self.inner);
            if let Some(r) = inner.ready.remove(name) {
                self.metrics.prefetch_files.set(inner.ready.len() as i64);
                return Some(Served {
                    path: r.path,
                    len: r.len,
                    prefetched: true,
                });
            }
            inner.in_flight.get(name).cloned()
        }?;
        let mut rx = pending;
        let done = rx.wait_for(Option::is_some).await.ok()?.clone();
        match done {
            Some(Ok(_)) => {
                let mut inner = lock(&self.inner);
                let r = inner.ready.remove(name)?;
                self.metrics.prefetch_files.set(inner.ready.len() as i64);
                Some(Served {
                    path: r.path,
                    len: r.len,
                    prefetched: true,
                })
            }
            // Absent or failed when prefetched: ask storage afresh.
            _ => None,
        }
    }

    async fn direct(&self, name: &str) -> Result<Served, WalError> {
        let tmp = self.temp_name(name, "req");
        let fetched = wal::fetch(self.storage.as_ref(), name, &tmp, &self.opts).await?;
        Ok(Served {
            path: tmp,
            len: fetched.content_len,
            prefetched: false,
        })
    }

    async fn segment_size(&self) -> Option<u32> {
        self.segment_size
            .get_or_try_init(|| async {
                repo::require(self.storage.as_ref())
                    .await
                    .map(|id| id.wal_segment_size)
            })
            .await
            .map_err(
                |e| tracing::warn!(error = %e, "cannot read the segment size; not prefetching"),
            )
            .ok()
            .copied()
    }

    /// After serving `seg`, wants `seg+1 ..= seg+depth` on its timeline:
    /// drops prefetched files outside that window and starts the missing downloads.
    async fn plan(self: &Arc<Self>, seg: SegmentName) {
        if self.depth == 0 {
            return;
        }
        let Some(size) = self.segment_size().await else {
            return;
        };
        let mut window = Vec::with_capacity(self.depth);
        let mut next = seg;
        for _ in 0..self.depth {
            next = next.next(size);
            window.push(next.to_string());
        }
        let mut to_start = Vec::new();
        {
            let mut inner = lock(&self.inner);
            inner.wanted = window.iter().cloned().collect();
            let stale: Vec<String> = inner
                .ready
                .keys()
                .filter(|k| !inner.wanted.contains(*k))
                .cloned()
                .collect();
            for k in stale {
                if let Some(r) = inner.ready.remove(&k) {
                    let _ = std::fs::remove_file(&r.path);
                    self.metrics.prefetch_discarded.inc();
                }
            }
            self.metrics.prefetch_files.set(inner.ready.len() as i64);
            for name in window {
                if inner.ready.contains_key(&name) || inner.in_flight.contains_key(&name) {
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inner.in_flight.insert(name.clone(), rx);
                to_start.push((name, tx));
            }
        }
        for (name, tx) in to_start {
            let me = self.clone();
            let span = tracing::debug_span!("prefetch", file = %name);
            tokio::spawn(
                async move {
                    let outcome = me.download(&name).await;
                    let _ = tx.send(Some(outcome));
                }
                .instrument(span),
            );
        }
    }

    async fn download(&self, name: &str) -> Result<Ready, String> {
        let tmp = self.temp_name(name, "pf");
        // A guess ahead of PostgreSQL: no hole check and no waiting; the real
        // request checks for a hole itself.
        let opts = FetchOptions {
            hole_grace: None,
            ..self.opts
        };
        let result = wal::fetch(self.storage.as_ref(), name, &tmp, &opts).await;
        let mut inner = lock(&self.inner);
        inner.in_flight.remove(name);
        match result {
            Ok(f) if inner.wanted.contains(name) => {
                let r = Ready {
                    path: tmp,
                    len: f.content_len,
                };
                inner.ready.insert(name.to_string(), r.clone());
                self.metrics.prefetch_files.set(inner.ready.len() as i64);
                Ok(r)
            }
            Ok(_) => {
                let _ = std::fs::remove_file(&tmp);
                self.metrics.prefetch_discarded.inc();
                Err("no longer wanted".into())
            }
            Err(e) => {
                if !e.is_not_found() {
                    tracing::debug!(error = %e, "prefetch failed; the request will ask storage itself");
                }
                Err(e.to_string())
            }
        }
    }

    /// Files prefetched and waiting (for tests and status).
    pub fn prefetched(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner).ready.keys().cloned().collect();
        v.sort();
        v
    }

    /// Removes everything prefetched (at shutdown).
    pub fn clear(&self) {
        let mut inner = lock(&self.inner);
        inner.ready.clear();
        inner.wanted.clear();
        let _ = clear_dir(&self.dir);
    }
}

/// True for the names [`Prefetcher::temp_name`] makes, `req-<n>-<wal file>`
/// or `pf-<n>-<wal file>`, and for the temporary `wal::fetch` writes them
/// through (`.<name>.walden-tmp-<pid>`).
fn is_own_file(name: &str) -> bool {
    let name = match name
        .strip_prefix('.')
        .and_then(|n| n.rsplit_once(".walden-tmp-"))
    {
        Some((inner, pid)) if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => inner,
        Some(_) => return false,
        None => name,
    };
    let Some((kind, rest)) = name.split_once('-') else {
        return false;
    };
    let Some((n, file)) = rest.split_once('-') else {
        return false;
    };
    matches!(kind, "req" | "pf")
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
        && WalFile::parse(file).is_some()
}

/// Removes the files an earlier run of the daemon left in `dir` (its own
/// names only: the directory may be shared, and nothing else there is ours).
fn clear_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let own = entry.file_name().to_str().is_some_and(is_own_file);
        if own && entry.file_type()?.is_file() {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{SealOptions, Sealer};
    use crate::storage::FileStorage;
    use prometheus_client::registry::Registry;

    const SIZE: u32 = 1 << 20;

    /// A valid segment for `name` (what every fetch checks), tagged with the name.
    fn content(name: &str) -> Vec<u8> {
        let seg = SegmentName::parse(name).unwrap();
        crate::wal::header::sample_segment(
            1,
            seg.timeline,
            seg.start_lsn(SIZE),
            SIZE,
            name.as_bytes(),
        )
    }

    async fn archive(dir: &Path, names: &[String]) -> Arc<dyn Storage> {
        let storage: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.to_path_buf()));
        let id = serde_json::json!({
            "format": repo::FORMAT,
            "system_identifier": "1",
            "pg_version": 15,
            "wal_segment_size": SIZE,
            "created_at": chrono::Utc::now(),
            "created_by": "test",
        });
        let json = serde_json::to_vec(&id).unwrap();
        storage
            .create(repo::IDENTITY_KEY, Box::pin(std::io::Cursor::new(json)))
            .await
            .unwrap();
        for name in names {
            let key = WalFile::parse(name).unwrap().object_key();
            let body = Sealer::new(std::io::Cursor::new(content(name)), SealOptions::default());
            storage.create(&key, Box::pin(body)).await.unwrap();
        }
        storage
    }

    fn seg(tli: u32, n: u32) -> String {
        format!("{tli:08X}{:08X}{n:08X}", 0)
    }

    fn files_in(dir: &Path) -> usize {
        std::fs::read_dir(dir).unwrap().count()
    }

    #[test]
    fn only_its_own_files_are_removed_from_the_spool() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = tmp.path().join("spool");
        std::fs::create_dir_all(spool.join("req-1-000000010000000000000001")).unwrap();
        let own = [
            "req-0-000000010000000000000001",
            "pf-17-000000020000000000000003",
            "pf-3-00000002.history",
            ".pf-4-000000010000000000000002.walden-tmp-77",
        ];
        let foreign = [
            "notes.txt",
            "req-x-000000010000000000000001",
            "pf-1-",
            "req-1-backup.tar",
            "pf--000000010000000000000001",
            ".notes.walden-tmp-1",
            ".pf-4-000000010000000000000002.walden-tmp-x",
        ];
        for name in own.iter().chain(&foreign) {
            std::fs::write(spool.join(name), b"x").unwrap();
        }
        clear_dir(&spool).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&spool)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut expected: Vec<String> = foreign.iter().map(|s| s.to_string()).collect();
        expected.push("req-1-000000010000000000000001".into()); // a directory: not ours
        expected.sort();
        assert_eq!(left, expected);
    }

    #[tokio::test]
    async fn serves_ahead_follows_the_requested_timeline_and_bounds_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let mut names: Vec<String> = (1..=12).map(|n| seg(1, n)).collect();
        names.extend((6..=12).map(|n| seg(2, n)));
        let storage = archive(&tmp.path().join("archive"), &names).await;
        let metrics = Metrics::new(&mut Registry::default());
        let spool = tmp.path().join("spool");
        let depth = 3;
        let p = Prefetcher::new(
            storage,
            FetchOptions::default(),
            depth,
            spool.clone(),
            metrics.clone(),
        )
        .unwrap();

        let check = |served: &Served, name: &str| {
            assert_eq!(
                std::fs::read(&served.path).unwrap(),
                content(name),
                "{name}"
            );
            assert_eq!(served.len, content(name).len() as u64);
        };
        let first = p.fetch(&seg(1, 1)).await.unwrap();
        check(&first, &seg(1, 1));
        assert!(!first.prefetched);
        drop(first);
        for n in 2..=5 {
            let s = p.fetch(&seg(1, n)).await.unwrap();
            check(&s, &seg(1, n));
            assert!(s.prefetched, "segment {n} was not served from prefetch");
            drop(s);
            assert!(
                files_in(&spool) <= depth,
                "{} files in the spool",
                files_in(&spool)
            );
        }
        assert_eq!(metrics.prefetch_hits.get(), 4);
        // Timeline 1 is prefetched through 8; PostgreSQL now follows timeline 2.
        let t2 = p.fetch(&seg(2, 6)).await.unwrap();
        assert!(!t2.prefetched, "timeline 2 must come from storage");
        check(&t2, &seg(2, 6));
        drop(t2);
        let t2 = p.fetch(&seg(2, 7)).await.unwrap();
        assert!(t2.prefetched);
        check(&t2, &seg(2, 7));
        drop(t2);
        // Nothing of timeline 1 is kept or handed out.
        for _ in 0..100 {
            if p.prefetched().len() == depth {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            p.prefetched().iter().all(|n| n.starts_with("00000002")),
            "{:?}",
            p.prefetched()
        );
        let t1 = p.fetch(&seg(1, 8)).await.unwrap();
        check(&t1, &seg(1, 8));
        drop(t1);
        assert!(metrics.prefetch_discarded.get() >= 1);
        // The end of the archive: absent is reported as such, and not remembered.
        let end = p.fetch(&seg(1, 13)).await.unwrap_err();
        assert!(end.is_not_found(), "{end}");
        p.clear();
        assert_eq!(files_in(&spool), 0);
    }

    #[tokio::test]
    async fn corrupt_objects_are_never_served() {
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (1..=3).map(|n| seg(1, n)).collect();
        let root = tmp.path().join("archive");
        let storage = archive(&root, &names).await;
        // Damage segment 2 in storage.
        let obj = root.join(WalFile::parse(&seg(1, 2)).unwrap().object_key());
        let mut bytes = std::fs::read(&obj).unwrap();
        bytes[10] ^= 0xFF;
        std::fs::remove_file(&obj).unwrap();
        std::fs::write(&obj, bytes).unwrap();
        let metrics = Metrics::new(&mut Registry::default());
        let p = Prefetcher::new(
            storage,
            FetchOptions {
                retry: crate::retry::RetryPolicy {
                    retries: 0,
                    ..Default::default()
                },
                hole_grace: None,
            },
            4,
            tmp.path().join("spool"),
            metrics,
        )
        .unwrap();
        drop(p.fetch(&seg(1, 1)).await.unwrap());
        let err = p.fetch(&seg(1, 2)).await.unwrap_err();
        assert!(!err.is_not_found());
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn a_segment_stored_under_another_name_is_never_served_even_prefetched() {
        let tmp = tempfile::tempdir().unwrap();
        let names: Vec<String> = (1..=3).map(|n| seg(1, n)).collect();
        let root = tmp.path().join("archive");
        let storage = archive(&root, &names).await;
        // Segment 2's (valid, checksummed) object under segment 3's name.
        let key3 = WalFile::parse(&seg(1, 3)).unwrap().object_key();
        std::fs::remove_file(root.join(&key3)).unwrap();
        let body = Sealer::new(
            std::io::Cursor::new(content(&seg(1, 2))),
            SealOptions::default(),
        );
        storage.create(&key3, Box::pin(body)).await.unwrap();
        let metrics = Metrics::new(&mut Registry::default());
        let p = Prefetcher::new(
            storage,
            FetchOptions::default(),
            4,
            tmp.path().join("spool"),
            metrics,
        )
        .unwrap();
        drop(p.fetch(&seg(1, 1)).await.unwrap());
        drop(p.fetch(&seg(1, 2)).await.unwrap());
        let err = p.fetch(&seg(1, 3)).await.unwrap_err();
        assert!(!err.is_not_found());
        assert!(err.to_string().contains("another segment"), "{err}");
    }
}
