//! PostgreSQL itself is the client: it calls `walden wal-push %p` as its
//! archive_command and `walden wal-fetch %f %p` as its restore_command.
//!
//! One scenario per storage kind: a clean archiving run checked through
//! pg_stat_archiver and the stored objects; a storage outage during archiving
//! (PostgreSQL keeps the segments and retries, nothing is lost); then a
//! recovery from a base backup taken before the writes, first with storage
//! failing (PostgreSQL must refuse to finish recovery, not end it early), then
//! healthy (it must hold exactly the rows of the primary).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use walden_e2e::{walden_bin, Archive, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(240);

/// Sets every directory under `dir` (included) to `mode`.
fn chmod_dirs(dir: &Path, mode: u32) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            chmod_dirs(&entry.path(), mode);
        }
    }
}

/// Makes storage fail for writes (push) or for everything (fetch), per backend.
fn break_storage(archive: &Archive, reads_too: bool) {
    match archive.kind {
        StorageKind::S3 => archive.proxy().fail_with_503(),
        // archive_command and restore_command run as the postgres user, who loses access.
        StorageKind::File => chmod_dirs(&archive.dir, if reads_too { 0o000 } else { 0o555 }),
    }
}

fn heal_storage(archive: &Archive) {
    match archive.kind {
        StorageKind::S3 => archive.proxy().pass(),
        StorageKind::File => chmod_dirs(&archive.dir, 0o755),
    }
}

/// A digest of everything the tests write, to compare two servers row by row.
fn fingerprint(pg: &PgCluster) -> String {
    pg.sql(
        "SELECT (SELECT count(*) || ':' || md5(string_agg(id || '=' || v, ',' ORDER BY id)) FROM t) \
         || '|' || (SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts) \
         || '|' || (SELECT count(*) || ':' || md5(string_agg(tid || '/' || delta, ',' ORDER BY mtime, tid, delta)) FROM pgbench_history)",
    )
}

fn insert_batch(pg: &PgCluster, batch: u32) {
    pg.sql(&format!(
        "INSERT INTO t SELECT g, 'batch {batch} row ' || g FROM generate_series({}, {}) g",
        batch * 1000,
        batch * 1000 + 999
    ));
}

/// Every segment PostgreSQL marked archived and still has in pg_wal is stored
/// with identical content (fetched back through `walden wal-fetch`).
fn assert_archive_matches_pg_wal(pg: &PgCluster, archive: &Archive, work: &Path) -> usize {
    let mut compared = 0;
    for name in pg.archive_status("done") {
        let local = pg.data.join("pg_wal").join(&name);
        let Ok(expected) = std::fs::read(&local) else {
            continue;
        };
        let dest = work.join(format!("check-{name}"));
        let out = archive.walden_output(&["wal-fetch", &name, dest.to_str().expect("utf-8 path")]);
        assert!(
            out.status.success(),
            "fetch {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            std::fs::read(&dest).expect("fetched file") == expected,
            "{name}: archived content differs from pg_wal"
        );
        std::fs::remove_file(&dest).expect("rm");
        compared += 1;
    }
    compared
}

fn scenario(kind: StorageKind) {
    let work = Workdir::new(&format!("pg-{kind:?}").to_lowercase());
    let mut archive = Archive::new(kind, work.path(), "db1");
    let walden = walden_bin();

    let mut primary = PgCluster::init(work.path(), "primary");
    primary.archive_through_walden();
    primary.set(&[("wal_level", "replica".into())]);
    primary.with_env(archive.env()).start();
    let base = primary.base_backup(work.path(), "base");

    // 1. A clean run: batches with segment switches, then a pgbench load.
    primary.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    for batch in 0..4 {
        insert_batch(&primary, batch);
        primary.switch_wal();
    }
    primary.pgbench(&["-i", "-s", "2", "-q"]);
    primary.pgbench(&["-n", "-c", "2", "-t", "200"]);
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);
    let (archived, failed) = primary.archiver_counts();
    assert_eq!(
        failed,
        0,
        "pg_stat_archiver reports failures in a clean run:\n{}",
        primary.log_text()
    );
    assert!(archived >= 6, "only {archived} segments archived");
    let keys = futures_lite_block_on(archive.keys());
    assert!(
        keys.iter().any(|k| k == "walden.json"),
        "no walden.json in {keys:?}"
    );
    for name in primary.archive_status("done") {
        let folder = &name[..16];
        let key = format!("wal/{folder}/{name}.zst");
        assert!(
            keys.contains(&key),
            "{name} marked archived by PostgreSQL but {key} is not stored"
        );
    }

    // 2. Storage fails while PostgreSQL archives: it keeps the segments and retries.
    break_storage(&archive, false);
    let mut pending = Vec::new();
    for batch in 4..7 {
        insert_batch(&primary, batch);
        pending.push(primary.switch_wal());
    }
    walden_e2e::sys::wait_for("archive failures to be reported", LONG, || {
        (primary.archiver_counts().1 >= 2).then_some(())
    });
    let ready = primary.archive_status("ready");
    assert!(
        ready.contains(&pending[0]),
        "{} not kept as .ready during the outage: {ready:?}",
        pending[0]
    );
    let last_archived = primary.sql("SELECT last_archived_wal FROM pg_stat_archiver");
    assert!(
        last_archived < pending[0],
        "{} reported archived while storage was failing",
        pending[0]
    );
    heal_storage(&archive);

    // For S3, also a full outage: the server process is gone, then comes back.
    if kind == StorageKind::S3 {
        primary.wait_archived(&primary.switch_wal(), LONG);
        let failed_before = primary.archiver_counts().1;
        archive.s3.as_mut().expect("s3").stop();
        insert_batch(&primary, 7);
        let during = primary.switch_wal();
        walden_e2e::sys::wait_for("failures while the S3 server is down", LONG, || {
            (primary.archiver_counts().1 > failed_before).then_some(())
        });
        assert!(
            primary.archive_status("ready").contains(&during),
            "{during} not kept during the outage"
        );
        archive.s3.as_mut().expect("s3").restart();
    }
    insert_batch(&primary, 8);
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);
    let compared = assert_archive_matches_pg_wal(&primary, &archive, work.path());
    assert!(compared >= 3, "only {compared} segments could be compared");
    let expected = fingerprint(&primary);
    primary.stop();

    // 3. Recovery from the base backup through restore_command.
    let mut restored = PgCluster::adopt(work.path(), base);
    restored.set(&[
        ("archive_mode", "off".into()),
        (
            "restore_command",
            format!("'{} wal-fetch %f %p'", walden.display()),
        ),
    ]);
    std::fs::write(restored.data.join("recovery.signal"), "").expect("recovery.signal");
    walden_e2e::sys::chown_pg(&restored.data.join("recovery.signal"));
    restored.with_env(archive.env());

    // Storage failing: recovery must stop with an error, never end early and promote.
    break_storage(&archive, true);
    let out = restored.try_start(Duration::from_secs(120));
    let log = restored.log_text();
    assert!(
        !out.status.success(),
        "server started although storage was failing:\n{log}"
    );
    assert!(
        !restored.is_running(),
        "server still running after a failed restore_command:\n{log}"
    );
    assert!(
        log.contains("exit code 254"),
        "restore_command did not fail with 254:\n{log}"
    );
    assert!(
        !log.contains("selected new timeline"),
        "recovery ended early and promoted:\n{log}"
    );
    heal_storage(&archive);

    restored.start();
    restored.wait_promoted(LONG);
    let log = restored.log_text();
    assert!(
        log.contains("restored log file"),
        "recovery did not use the archive:\n{log}"
    );
    assert_eq!(
        fingerprint(&restored),
        expected,
        "recovered server differs from the primary"
    );
}

/// Runs a future on a small runtime (the tests themselves are synchronous).
fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

#[test]
fn postgres_archives_and_recovers_through_walden_on_s3() {
    scenario(StorageKind::S3);
}

#[test]
fn postgres_archives_and_recovers_through_walden_on_file() {
    scenario(StorageKind::File);
}
