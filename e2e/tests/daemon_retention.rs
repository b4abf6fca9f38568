//! The daemon applies the operator's retention policy after each successful
//! base backup: with `WALDEN_RETENTION_FULL=1`, the second backup taken
//! through `POST /v1/backups` makes the first (and the WAL only it needed) go.

use std::time::Duration;

use walden::wal::{SegmentName, WalFile};
use walden_e2e::ledger::block_on;
use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, Daemon, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(180);

fn backup_through_the_api(daemon: &Daemon) -> String {
    let (code, started) = daemon.api("POST", "/v1/backups");
    assert_eq!(code, 202, "{started}");
    let id = started["id"].as_str().expect("id").to_string();
    wait_for(&format!("backup {id} to succeed"), LONG, || {
        let (_, job) = daemon.api("GET", &format!("/v1/backups/{id}"));
        assert_ne!(job["state"], "failed", "{job}\n{}", daemon.log_text());
        (job["state"] == "succeeded").then_some(())
    });
    id
}

fn listed(archive: &Archive) -> Vec<String> {
    let out = archive.walden_output(&["backup-list", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["backups"]
        .as_array()
        .expect("backups")
        .iter()
        .map(|b| b["id"].as_str().expect("id").to_string())
        .collect()
}

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

    let first = backup_through_the_api(&daemon);
    assert_eq!(listed(&archive), [first.as_str()]);
    for _ in 0..3 {
        pg.sql(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 1, 1, 1, now())",
        );
        pg.switch_wal();
    }
    let second = backup_through_the_api(&daemon);
    assert_ne!(first, second);
    wait_for("the first backup to be retired", LONG, || {
        (listed(&archive) == [second.as_str()]).then_some(())
    });
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
