//! Retention against real PostgreSQL 15 and a real S3-compatible server:
//! after `walden retain`, every point of the promised window still restores
//! exactly, what lies outside is gone, more than a thousand WAL objects are
//! deleted, and an interrupted run is finished by the next one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use walden::retention::{self, Policy};
use walden::storage::{Created, Download, ObjectInfo, Reader, Storage, StorageError};
use walden::wal::{SegmentName, WalFile};
use walden_e2e::ledger::{batches_in, block_on, ok, restore_and_start, rfc3339, Primary};
use walden_e2e::{Archive, StorageKind, Workdir};

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn strs(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect()
}

fn segment_keys(keys: &[String]) -> Vec<(SegmentName, String)> {
    keys.iter()
        .filter_map(|k| match WalFile::from_object_key(k) {
            Some(WalFile::Segment(s)) => Some((s, k.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn retain_window_keeps_every_point_inside_it_restorable_and_deletes_the_rest() {
    let work = Workdir::new("retainwin");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    let a = p.backup(&archive, &[]);
    p.commit_batch(0, "before B");
    p.commit_batch(1, "before B");
    p.pg.switch_wal();
    let b = p.backup(&archive, &[]);
    p.commit_batch(2, "after B");
    p.pg.switch_wal();
    p.commit_batch(3, "after B");
    // The window will start here: B finished before it, C after it.
    p.pg.sql("SELECT pg_sleep(3)");
    let cut = p.pg.sql("SELECT clock_timestamp()::text");
    p.pg.sql("SELECT pg_sleep(3)");
    p.commit_batch(4, "inside");
    p.pg.switch_wal();
    let c = p.backup(&archive, &[]);
    p.commit_batch(5, "inside");
    p.commit_batch(6, "inside");
    p.archive_everything();
    let id = |m: &serde_json::Value| m["id"].as_str().expect("id").to_string();
    let (a_id, b_id, c_id) = (id(&a), id(&b), id(&c));
    let b_start = SegmentName::parse(b["start_wal"].as_str().expect("start_wal")).expect("segment");

    let keys_before = block_on(archive.keys());
    let window = p.pg.sql(&format!(
        "SELECT ceil(extract(epoch FROM clock_timestamp() - '{cut}'::timestamptz))::int"
    ));
    let window = format!("{window}s");

    // A dry run says what it would do and does nothing.
    let out = ok(
        archive.walden_output(&["retain", "--window", &window, "--dry-run", "--json"]),
        "retain --dry-run",
    );
    let plan = json(&out);
    assert_eq!(strs(&plan["deletedBackups"]), [a_id.as_str()], "{plan:#}");
    assert_eq!(plan["deleted"], 0);
    assert_eq!(plan["dryRun"], true);
    assert_eq!(
        block_on(archive.keys()),
        keys_before,
        "a dry run deleted something"
    );
    let text = ok(
        archive.walden_output(&["retain", "--window", &window, "--dry-run"]),
        "retain --dry-run (text)",
    );
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("would delete backup {a_id}")),
        "{text}"
    );

    let out = ok(
        archive.walden_output(&["retain", "--window", &window, "--json"]),
        "retain",
    );
    let done = json(&out);
    let kept: Vec<String> = done["keptBackups"]
        .as_array()
        .expect("keptBackups")
        .iter()
        .map(|k| k["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(kept, [b_id.clone(), c_id.clone()], "{done:#}");
    let planned = done["delete"].as_array().expect("delete").len();
    assert!(planned > 0);
    assert_eq!(done["deleted"], planned);

    // Outside the window: backup A and the WAL before B's start are gone.
    let keys_after = block_on(archive.keys());
    assert!(
        !keys_after
            .iter()
            .any(|k| k.starts_with(&format!("backups/{a_id}/"))),
        "backup A left objects behind: {keys_after:?}"
    );
    for (seg, key) in segment_keys(&keys_before) {
        let kept = keys_after.contains(&key);
        assert_eq!(
            kept,
            seg >= b_start,
            "{key}: kept={kept}, B starts at {b_start}"
        );
    }
    assert!(keys_after.contains(&"walden.json".to_string()));
    let out = archive.walden_output(&["verify"]);
    assert!(
        out.status.success(),
        "verify after retain: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Inside the window: every point restores exactly.
    let t = |i: usize| p.batches[i].commit_time.clone();
    let cases: Vec<(&str, Vec<String>, Vec<u32>)> = vec![
        (
            "just inside the window, before C: from B",
            vec![
                "--target-time".into(),
                rfc3339(&p.pg, &format!("'{cut}'::timestamptz + interval '2.5 s'")),
            ],
            vec![0, 1, 2, 3],
        ),
        (
            "batch 4's commit",
            vec![
                "--target-time".into(),
                rfc3339(&p.pg, &format!("'{}'::timestamptz", t(4))),
            ],
            vec![0, 1, 2, 3, 4],
        ),
        (
            "between batches 5 and 6: from C",
            vec![
                "--target-time".into(),
                rfc3339(
                    &p.pg,
                    &format!(
                        "'{}'::timestamptz + ('{}'::timestamptz - '{}'::timestamptz) / 2",
                        t(5),
                        t(6),
                        t(5)
                    ),
                ),
            ],
            vec![0, 1, 2, 3, 4, 5],
        ),
        ("end of the archive", vec![], (0..7).collect()),
    ];
    for (i, (what, args, expected)) in cases.into_iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut restored = restore_and_start(&work, &archive, &p.pg, &format!("r{i}"), &args);
        assert_eq!(
            batches_in(&restored),
            expected.into_iter().collect(),
            "{what}"
        );
        restored.stop();
    }
    // Before the window, and before B: nothing can reach it any more.
    let dest = work.pg_dir("too-old");
    let before_b = rfc3339(&p.pg, &format!("'{}'::timestamptz", t(0)));
    let out = archive
        .walden_pg(
            &p.pg,
            &[
                "restore",
                dest.to_str().expect("utf-8"),
                "--target-time",
                &before_b,
            ],
        )
        .output()
        .expect("restore");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no backup can reach"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes only the first `budget` keys it is asked to, then fails: a
/// retention run interrupted in the middle of a batch.
#[derive(Debug)]
struct Interrupting {
    inner: Arc<dyn Storage>,
    budget: AtomicUsize,
}

#[async_trait]
impl Storage for Interrupting {
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn create(&self, key: &str, body: Reader) -> Result<Created, StorageError> {
        self.inner.create(key, body).await
    }
    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        self.inner.get(key).await
    }
    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        self.inner.get_tail(key, len).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.head(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix).await
    }
    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list_folders(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let budget = self.budget.load(Ordering::SeqCst);
        let n = budget.min(keys.len());
        self.inner.delete(&keys[..n]).await?;
        self.budget.store(budget - n, Ordering::SeqCst);
        if n < keys.len() {
            return Err(StorageError::new(
                walden::storage::ErrorKind::Permanent,
                "delete",
                self.url(),
                "injected interruption",
            ));
        }
        Ok(())
    }
}

fn manifest(id: &str, start: u64, stop_time: &str) -> serde_json::Value {
    let seg = |n: u64| {
        SegmentName {
            timeline: 1,
            log: (n / 256) as u32,
            seg: (n % 256) as u32,
        }
        .to_string()
    };
    let lsn = |n: u64| format!("{:X}/{:X}", (n << 24) >> 32, (n << 24) & 0xFFFF_FFFF);
    serde_json::json!({
        "format": 1, "id": id, "label": id, "system_identifier": "7", "pg_version_num": 150000,
        "timeline": 1, "start_lsn": lsn(start), "stop_lsn": lsn(start + 1),
        "start_wal": seg(start), "stop_wal": seg(start + 1),
        "start_time": stop_time, "stop_time": stop_time, "backup_label": "", "tablespace_map": null,
        "tablespaces": [], "parts": [], "file_count": 0, "logical_size": 0, "stored_size": 0,
        "compression": {"algorithm": "zstd", "level": 1}, "encryption": null, "created_by": "test"
    })
}

fn sealed(content: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let content = content.to_vec();
    block_on(async move {
        // The sealer starts its pipeline on the runtime: create it inside.
        let mut sealer = walden::object::Sealer::new(
            std::io::Cursor::new(content),
            walden::object::SealOptions::default(),
        );
        let mut out = Vec::new();
        sealer.read_to_end(&mut out).await.expect("seal");
        out
    })
}

async fn put_all(storage: &dyn Storage, objects: Vec<(String, Vec<u8>)>) {
    let results: Vec<_> = stream::iter(objects)
        .map(|(k, body)| async move {
            let r = storage
                .create(&k, Box::pin(std::io::Cursor::new(body)))
                .await;
            (k, r)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (k, r) in results {
        r.unwrap_or_else(|e| panic!("create {k}: {e}"));
    }
}

#[test]
fn more_than_a_thousand_wal_objects_go_and_an_interrupted_retain_is_finished_by_the_next() {
    let work = Workdir::new("retainmany");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let storage = block_on(archive.storage());
    const OLD_START: u64 = 1;
    const NEW_START: u64 = 2600;
    const LAST: u64 = 2605;
    let mut objects: Vec<(String, Vec<u8>)> = Vec::new();
    objects.push((
        "backups/20260101T000000Z/backup.json".into(),
        serde_json::to_vec(&manifest(
            "20260101T000000Z",
            OLD_START,
            "2026-01-01T00:00:00Z",
        ))
        .unwrap(),
    ));
    for i in 1..=3 {
        objects.push((
            format!("backups/20260101T000000Z/part-0000{i}.tar.zst"),
            vec![i],
        ));
    }
    for n in 1..=LAST {
        let s = SegmentName {
            timeline: 1,
            log: (n / 256) as u32,
            seg: (n % 256) as u32,
        };
        objects.push((WalFile::Segment(s).object_key(), vec![1]));
    }
    objects.push((
        "wal/00000002.history.zst".into(),
        sealed(b"1\t0/3000000\tno recovery target specified\n"),
    ));
    block_on(put_all(storage.as_ref(), objects));
    // The newer backup finished after everything above was stored.
    let stop = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    block_on(put_all(
        storage.as_ref(),
        vec![
            (
                "backups/29990101T000000Z/part-00001.tar.zst".into(),
                vec![1],
            ),
            (
                "backups/29990101T000000Z/backup.json".into(),
                serde_json::to_vec(&manifest("29990101T000000Z", NEW_START, &stop)).unwrap(),
            ),
        ],
    ));
    let before = block_on(archive.keys());
    assert_eq!(segment_keys(&before).len() as u64, LAST);

    // Interrupted after two deletions, in the middle of the first batch.
    let interrupting = Interrupting {
        inner: storage.clone(),
        budget: AtomicUsize::new(2),
    };
    let err = block_on(async {
        let grace = chrono::Duration::minutes(10);
        let plan = retention::plan_for(&interrupting, Policy::Full(1), chrono::Utc::now(), grace)
            .await
            .expect("plan");
        assert_eq!(plan.deleted_backups, ["20260101T000000Z"]);
        assert_eq!(plan.deleted_wal_objects as u64, NEW_START - OLD_START);
        assert_eq!(plan.delete[0], "backups/20260101T000000Z/backup.json");
        retention::execute(&interrupting, &plan, &walden::retry::RetryPolicy::default())
            .await
            .expect_err("interrupted")
    });
    assert!(err.to_string().contains("run retain again"), "{err}");
    // The half-deleted backup is no longer listed: its manifest went first.
    let list = json(&ok(
        archive.walden_output(&["backup-list", "--json"]),
        "backup-list",
    ));
    let listed: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["29990101T000000Z"]);
    let mid = block_on(archive.keys());
    assert_eq!(mid.len(), before.len() - 2);

    // A failing store: retain fails cleanly and deletes nothing.
    archive.proxy().fail_with_503();
    let out = archive.walden_output(&["retain", "--full", "1"]);
    archive.proxy().pass();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(block_on(archive.keys()), mid);

    // The re-run, through the S3 API, finishes the job: more than a thousand WAL objects.
    let out = ok(
        archive.walden_output(&["retain", "--full", "1", "--json"]),
        "retain re-run",
    );
    let done = json(&out);
    assert_eq!(strs(&done["abandonedBackups"]), ["20260101T000000Z"]);
    assert_eq!(done["deletedWalObjects"], NEW_START - OLD_START);
    assert!(
        done["deleted"].as_u64().unwrap() > 2000,
        "{}",
        done["deleted"]
    );
    let after = block_on(archive.keys());
    assert!(
        !after.iter().any(|k| k.contains("20260101T000000Z")),
        "{after:?}"
    );
    let left: Vec<u64> = segment_keys(&after)
        .iter()
        .map(|(s, _)| u64::from(s.log) * 256 + u64::from(s.seg))
        .collect();
    assert_eq!(left, (NEW_START..=LAST).collect::<Vec<_>>());
    assert!(after.contains(&"wal/00000002.history.zst".to_string()));
    assert!(after.contains(&"backups/29990101T000000Z/part-00001.tar.zst".to_string()));
    // Nothing is left to do.
    let again = json(&ok(
        archive.walden_output(&["retain", "--full", "1", "--json"]),
        "retain third run",
    ));
    assert_eq!(again["deleted"], 0);
}
