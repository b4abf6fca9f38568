//! No hole in the archive after a failover (issue 15 §3).
//!
//! A protected StatefulSet may run a primary with streaming standbys (Patroni
//! or any HA tool). WAL that reached a standby by streaming but that the old
//! primary never archived is lost to the archive when the primary dies,
//! unless the standby archives too. The operator therefore gives every pod of
//! a protected StatefulSet the same archive settings, `archive_mode=always`
//! among them; this test configures both servers with exactly the settings
//! the operator builds (`walden_operator::specs::archive_settings`), each
//! with its own `walden daemon`, breaks the primary's way to storage, streams
//! ledger batches to the standby, kills the primary, promotes the standby and
//! restores the archive to its end: every batch committed on the primary
//! must be there, and `verify --wal` must find no hole.

use walden_e2e::ledger::{batches_in, ok, restore_and_start, Primary, LONG};
use walden_e2e::sys::{as_pg, pg_bin, run, wait_for};
use walden_e2e::{walden_bin, Archive, Daemon, PgCluster, StorageKind, Workdir};

/// The archive settings the operator puts on every protected pod, with the
/// pod's binary path replaced by the test's walden.
fn operator_archive_settings() -> Vec<(&'static str, String)> {
    walden_operator::specs::archive_settings("60s", None)
        .into_iter()
        .map(|(k, v)| {
            let v = if k == "archive_command" {
                format!("'{} wal-push %p'", walden_bin().display())
            } else {
                v
            };
            (leak(k), v)
        })
        .collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Waits until the standby has replayed everything the primary has written.
fn wait_replayed(primary: &PgCluster, standby: &PgCluster) {
    let target = primary.sql("SELECT pg_current_wal_lsn()");
    wait_for("the standby to replay the primary's WAL", LONG, || {
        let behind = standby
            .try_sql(&format!(
                "SELECT pg_last_wal_replay_lsn() < '{target}'::pg_lsn"
            ))
            .ok()?;
        (behind == "f").then_some(())
    });
}

#[test]
fn a_promoted_standby_archives_what_the_dead_primary_could_not() {
    let work = Workdir::new("failover");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let direct_s3 = archive.s3.as_ref().expect("S3 archive").endpoint();
    let settings = operator_archive_settings();

    // The primary archives through its daemon, via the fault proxy.
    let mut primary = Primary::start(&work, &archive, "primary");
    primary.pg.set(&settings);
    primary.pg.stop();
    let mut env = archive.env();
    env.extend(primary.pg.libpq_env());
    let mut primary_daemon = Daemon::start(work.path(), "primary", env);
    primary.pg.with_env(primary_daemon.client_env()).start();
    primary.commit_batch(1, "before the backup");
    primary.backup(&archive, &[]);
    primary.commit_batch(2, "archived by the primary");
    primary.archive_everything();

    // A streaming standby, cloned from the primary, with its own daemon that
    // reaches the S3 server directly (the primary's path to storage is the
    // one that breaks).
    let clone = primary.pg.base_backup(work.path(), "standby");
    let mut standby = PgCluster::adopt(work.path(), clone);
    standby.set(&settings);
    standby.set(&[
        ("hot_standby", "on".into()),
        (
            "primary_conninfo",
            format!(
                "'host=127.0.0.1 port={} user=postgres application_name=standby'",
                primary.pg.port
            ),
        ),
        (
            "restore_command",
            format!("'{} wal-fetch %f %p'", walden_bin().display()),
        ),
    ]);
    std::fs::write(standby.data.join("standby.signal"), "").expect("standby.signal");
    run(std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&standby.data));
    let mut env: Vec<(String, String)> = archive
        .env()
        .into_iter()
        .filter(|(k, _)| k != "WALDEN_S3_ENDPOINT")
        .collect();
    env.push(("WALDEN_S3_ENDPOINT".into(), direct_s3));
    env.extend(standby.libpq_env());
    let standby_daemon = Daemon::start(work.path(), "standby", env);
    standby.with_env(standby_daemon.client_env()).start();
    wait_for("the standby to stream", LONG, || {
        (standby
            .try_sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'")
            .ok()?
            == "1")
            .then_some(())
    });

    // The primary loses its storage; what it commits now only streams.
    archive.proxy().fail_with_503();
    for batch in 3..=6 {
        primary.commit_batch(batch, "streamed, never archived by the primary");
        primary.pg.switch_wal();
    }
    primary.commit_batch(7, "in the last, unfinished segment of the primary");
    wait_replayed(&primary.pg, &standby);
    let (_, failed) = primary.pg.archiver_counts();
    assert!(
        failed > 0 || !primary.pg.archive_status("ready").is_empty(),
        "the primary was meant to be unable to archive"
    );

    // The primary dies with its segments unarchived; the standby takes over.
    run(as_pg(pg_bin("pg_ctl"))
        .args(["-D"])
        .arg(&primary.pg.data)
        .args(["-m", "immediate", "-w", "stop"]));
    primary_daemon.kill9();
    run(as_pg(pg_bin("pg_ctl"))
        .args(["-D"])
        .arg(&standby.data)
        .args(["-w", "promote"]));
    standby.wait_promoted(LONG);
    let mut new_primary = Primary {
        pg: standby,
        batches: Vec::new(),
    };
    new_primary.commit_batch(8, "after the failover");
    let standby = new_primary.pg;
    let last = standby.switch_wal();
    standby.wait_archived(&last, LONG);

    // The archive holds every segment: verify finds no hole, and a restore to
    // the end holds every batch, the ones only the standby ever archived too.
    archive.proxy().pass();
    let verify = archive.walden_output(&["verify", "--wal"]);
    ok(verify, "verify --wal after the failover");
    let restored = restore_and_start(&work, &archive, &primary.pg, "restored", &[]);
    let expected: std::collections::BTreeSet<u32> = (1..=8).collect();
    assert_eq!(
        batches_in(&restored),
        expected,
        "a restore to the end after the failover lost batches"
    );
    drop(standby_daemon);
}
