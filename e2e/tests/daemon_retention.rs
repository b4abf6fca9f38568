//! The daemon applies the operator's retention policy after each successful
//! base backup: with `WALDEN_RETENTION_FULL=1`, the second backup taken
//! through `POST /v1/backups` makes the first (and the WAL only it needed) go.

use std::time::Duration;

use walden::wal::{SegmentName, WalFile};
use walden_e2e::ledger::block_on;
use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, Daemon, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(180);

#[test]
fn daemon_applies_retention_after_each_successful_backup() {
    let work = Workdir::new("daemon-retain");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    env.push(("WALDEN_RETENTION_FULL".into(), "1".into()));
    let daemon = Daemon::start(work.path(), "retain", env);
    pg.with_env(daemon.client_env()).start();
    pg.pgbench(&["-i", "-s", "1", "-q"]);

    let first = daemon.backup();
    assert_eq!(archive.backup_ids(), [first.as_str()]);
    for _ in 0..3 {
        pg.sql(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now())",
        );
        pg.switch_wal();
    }
    let second = daemon.backup();
    assert_ne!(first, second);
    // Retention deletes the first backup's manifest first, then its parts
    // and the WAL only it needed: wait for the run after the second backup
    // to end (the one after the first backup logs the same line).
    wait_for("retention to finish after the second backup", LONG, || {
        (daemon.log_text().matches("retention applied").count() >= 2).then_some(())
    });
    assert_eq!(
        archive.backup_ids(),
        [second.as_str()],
        "the first backup stayed"
    );
    let keys = block_on(archive.keys());
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with(&format!("backups/{first}/"))),
        "{keys:?}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(archive.object_path(&format!("backups/{second}/backup.json")))
            .expect("manifest"),
    )
    .expect("json");
    let start =
        SegmentName::parse(manifest["start_wal"].as_str().expect("start_wal")).expect("segment");
    for k in &keys {
        if let Some(WalFile::Segment(s)) = WalFile::from_object_key(k) {
            assert!(
                s >= start,
                "{k} is older than the retained backup's start {start}"
            );
        }
    }
    assert!(
        daemon.log_text().contains("retention applied"),
        "{}",
        daemon.log_text()
    );
}
