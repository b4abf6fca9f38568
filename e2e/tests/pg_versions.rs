//! The version matrix: every PostgreSQL major version Walden supports (14 to
//! 18) runs the same five flows against the real server of that version, and
//! each restore is checked row by row against a ledger with known commit times.
//!
//! 1. PostgreSQL archives through `walden wal-push` and a cold copy of the
//!    cluster recovers through `walden wal-fetch` to the archive's end;
//! 2. `backup-push` (`pg_start_backup` on 14, `pg_backup_start` from 15) and a
//!    restore to a random time between two commits, exact to the transaction;
//! 3. a restore across a promotion: the fork archives timeline 2 into the same
//!    prefix and a restore follows it there;
//! 4. a follower from the archive (read-only daemon, prefetch) replays, then
//!    streams from its primary, reports its replay through `/v1/status`, and is
//!    promoted through `POST /v1/promote`;
//! 5. the daemon archives under pgbench, is killed with `kill -9` while
//!    uploads are in flight, restarts, and a restore holds exactly the
//!    primary's rows.
//!
//! 15 also runs the whole suite; here it is one more row of the matrix.

use std::collections::BTreeSet;
use walden_contract::api::{IdentityMismatch, Role};
use walden_e2e::ledger::{
    batches_in, block_on, ok, restore_and_start, restore_into, rfc3339, Primary, LONG,
};
use walden_e2e::pg::Install;
use walden_e2e::sys::BUCKET;
use walden_e2e::sys::{chown_pg, run, wait_for};
use walden_e2e::{walden_bin, Archive, Daemon, FaultProxy, PgCluster, StorageKind, Workdir};
use walden_operator::api::{ContinuousBackupStatus, StorageSpec};
use walden_operator::archives::{self, OnMismatch};
use walden_operator::specs;

fn set(v: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    v.into_iter().collect()
}

/// A time halfway between the commits of batches `a` and `b`, in RFC 3339.
fn between(p: &Primary, a: usize, b: usize) -> String {
    let (a, b) = (&p.batches[a].commit_time, &p.batches[b].commit_time);
    rfc3339(
        &p.pg,
        &format!("'{a}'::timestamptz + ('{b}'::timestamptz - '{a}'::timestamptz) / 2"),
    )
}

/// A pseudo-random index below `n`, printed so that a failure can be replayed.
fn pick(n: usize) -> usize {
    let seed = std::env::var("WALDEN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as usize)
                .unwrap_or(0)
        });
    eprintln!("random pick: WALDEN_TEST_SEED={seed}");
    seed % n
}

fn timeline(pg: &PgCluster) -> String {
    pg.sql("SELECT timeline_id FROM pg_control_checkpoint()")
}

/// The server is the version the row is about (not a fallback to 15).
fn assert_version(pg: &PgCluster, major: u32) {
    let num: u32 = pg
        .sql("SELECT current_setting('server_version_num')")
        .parse()
        .expect("server_version_num");
    assert_eq!(num / 10000, major, "the server runs {num}, not {major}");
}

/// 1. archive_command and restore_command are walden, nothing else in between.
fn wal_push_and_wal_fetch_recover_every_row(major: u32) {
    let install = Install::version(major);
    let work = Workdir::new(&format!("pg{major}-wal"));
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut p = Primary::start_with(&work, &archive, "primary", &install);
    assert_version(&p.pg, major);
    p.pg.stop();
    // A cold copy of the cluster as it is before any batch.
    let copy = work.pg_dir("copy");
    run(std::process::Command::new("cp")
        .args(["-a", "--no-target-directory"])
        .arg(&p.pg.data)
        .arg(&copy));
    p.pg.start();
    for b in 0..5 {
        p.commit_batch(b, "row");
        if b % 2 == 1 {
            p.pg.switch_wal();
        }
    }
    p.archive_everything();
    let (archived, failed) = p.pg.archiver_counts();
    assert!(archived >= 3, "only {archived} files archived");
    assert_eq!(failed, 0, "archive_command failed {failed} times");
    p.pg.stop();

    let mut recovered = PgCluster::adopt_with(work.path(), copy, &install);
    std::fs::remove_file(recovered.data.join("postmaster.pid")).ok();
    recovered.set(&[
        ("archive_mode", "off".into()),
        (
            "restore_command",
            format!("'{} wal-fetch %f %p'", walden_bin().display()),
        ),
    ]);
    let signal = recovered.data.join("recovery.signal");
    std::fs::write(&signal, "").expect("recovery.signal");
    chown_pg(&signal);
    recovered.with_env(archive.env()).start();
    recovered.wait_promoted(LONG);
    assert_eq!(batches_in(&recovered), set(0..5), "rows lost in recovery");
    assert!(
        recovered.log_text().contains("restored log file"),
        "recovery did not go through wal-fetch:\n{}",
        recovered.log_text()
    );
}

/// 2. A base backup of this version and a point-in-time restore.
fn backup_and_restore_to_a_random_time_are_exact(major: u32) {
    let install = Install::version(major);
    let work = Workdir::new(&format!("pg{major}-pitr"));
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut p = Primary::start_with(&work, &archive, "primary", &install);
    p.commit_batch(0, "before the backup");
    let manifest = p.backup(&archive, &[]);
    assert_eq!(
        manifest["pg_version_num"].as_u64().map(|v| v / 10000),
        Some(major as u64),
        "{manifest}"
    );
    for b in 1..7 {
        p.commit_batch(b, "row");
        if b == 3 {
            p.pg.switch_wal();
        }
    }
    p.archive_everything();
    let k = 1 + pick(5);
    let target = between(&p, k, k + 1);
    eprintln!(
        "restoring PostgreSQL {major} to {target}, between batches {k} and {}",
        k + 1
    );
    let mut at_time = restore_and_start(
        &work,
        &archive,
        &p.pg,
        "at-time",
        &["--target-time", &target],
    );
    assert_version(&at_time, major);
    assert_eq!(
        batches_in(&at_time),
        set(0..=k as u32),
        "restore to {target}"
    );
    at_time.stop();
    let to_end = restore_and_start(&work, &archive, &p.pg, "to-end", &[]);
    assert_eq!(batches_in(&to_end), set(0..7), "restore to the end");
}

/// 3. Timeline 2: a fork archives into the same prefix; restores follow it.
fn a_restore_follows_a_promotion_to_timeline_2(major: u32) {
    let install = Install::version(major);
    let work = Workdir::new(&format!("pg{major}-tli"));
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start_with(&work, &archive, "primary", &install);
    p.backup(&archive, &[]);
    for b in 0..4 {
        p.commit_batch(b, "row");
    }
    p.archive_everything();
    let branch_at = between(&p, 1, 2);
    p.pg.stop();

    let restored = restore_into(
        &work,
        &archive,
        &p.pg,
        "fork",
        &["--target-time", &branch_at],
        true,
    );
    assert_eq!(batches_in(&restored), set([0, 1]));
    assert_eq!(timeline(&restored), "2");
    let mut fork = Primary {
        pg: restored,
        batches: Vec::new(),
    };
    for b in 100..103 {
        fork.commit_batch(b, "on timeline 2");
    }
    fork.archive_everything();
    let keys = block_on(archive.keys());
    assert!(
        keys.iter().any(|k| k == "wal/00000002.history.zst"),
        "history file not archived: {keys:?}"
    );
    let on_tl2 = between(&fork, 0, 1);
    fork.pg.stop();

    let mut mid = restore_and_start(
        &work,
        &archive,
        &fork.pg,
        "on-tl2",
        &["--target-time", &on_tl2],
    );
    assert_eq!(
        batches_in(&mid),
        set([0, 1, 100]),
        "restore to a point on timeline 2"
    );
    mid.stop();
    let end = restore_and_start(&work, &archive, &fork.pg, "tl2-end", &[]);
    assert_eq!(
        batches_in(&end),
        set([0, 1, 100, 101, 102]),
        "restore to the end of timeline 2"
    );
    assert_eq!(
        timeline(&end),
        "3",
        "the restore did not branch off timeline 2"
    );
}

/// Row count and digest of table t.
fn digest(pg: &PgCluster) -> Result<String, String> {
    pg.try_sql("SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM t")
}

fn insert_rows(pg: &PgCluster, batch: u32) {
    pg.sql(&format!(
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
        batch * 10000,
        batch * 10000 + 9999
    ));
}

/// A primary of `install` archiving through its own daemon.
fn primary_with_daemon(
    work: &Workdir,
    archive: &Archive,
    install: &Install,
    extra: &[(&str, &str)],
) -> (PgCluster, Daemon) {
    let mut pg = PgCluster::init_with(work.path(), "primary", install);
    pg.archive_through_walden();
    pg.set(&[
        ("wal_level", "replica".into()),
        ("max_wal_size", "'1GB'".into()),
    ]);
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let daemon = Daemon::start(work.path(), "primary", env);
    pg.with_env(daemon.client_env()).start();
    (pg, daemon)
}

/// 4. A follower from the archive: replay, stream, promote.
fn a_follower_replays_streams_and_is_promoted(major: u32) {
    let install = Install::version(major);
    let work = Workdir::new(&format!("pg{major}-follower"));
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let (primary, _source_daemon) = primary_with_daemon(&work, &archive, &install, &[]);
    primary.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    insert_rows(&primary, 0);
    run(&mut archive.walden_pg(&primary, &["backup-push"]));
    let mut last = String::new();
    for batch in 1..=4 {
        insert_rows(&primary, batch);
        last = primary.switch_wal();
    }
    // (A second switch with nothing written in between is a no-op, and from
    // 18 on pg_switch_wal then names the segment still being written.)
    primary.wait_archived(&last, LONG);

    // The primary is unreachable at first: the follower must replay from the archive.
    let to_primary = FaultProxy::start(primary.port);
    to_primary.drop_connections();
    let dest = work.pg_dir("follower");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=follower",
        to_primary.port
    );
    let restore_command = format!("{} wal-fetch %f %p", walden_bin().display());
    let mut restore = archive.walden_pg(
        &primary,
        &[
            "restore",
            dest.to_str().expect("utf-8"),
            "--standby",
            "--primary-conninfo",
            &conninfo,
            "--restore-command",
            &restore_command,
        ],
    );
    restore.env("WALDEN_READ_ONLY", "true");
    run(&mut restore);
    let mut follower = PgCluster::adopt_with(work.path(), dest, &install);
    follower.set(&[("hot_standby", "on".into()), ("archive_mode", "off".into())]);
    let mut env = archive.env();
    env.extend(follower.libpq_env());
    env.push(("WALDEN_READ_ONLY".into(), "true".into()));
    env.push(("WALDEN_PREFETCH".into(), "4".into()));
    let follower_daemon = Daemon::start(work.path(), "follower", env);
    follower.with_env(follower_daemon.client_env()).start();
    assert_version(&follower, major);

    let archived = digest(&primary).expect("digest");
    wait_for("the follower to replay the archive", LONG, || {
        (digest(&follower).ok()? == archived).then_some(())
    });
    assert!(
        follower_daemon
            .metrics()
            .get("walden_wal_fetches_total{result=\"restored\"}")
            >= 4.0,
        "the archive was not replayed through the daemon"
    );

    to_primary.pass();
    insert_rows(&primary, 5);
    primary.sql("UPDATE t SET v = 'latest' WHERE id = 7");
    let latest = digest(&primary).expect("digest");
    wait_for("the follower to stream", LONG, || {
        let streaming = follower
            .try_sql("SELECT coalesce(string_agg(status, ','), '') FROM pg_stat_wal_receiver")
            .ok()?;
        (streaming == "streaming" && digest(&follower).ok()? == latest).then_some(())
    });
    let status = follower_daemon.status();
    assert_eq!(status.role, Role::Standby, "{status:?}");
    let replay = status
        .replay
        .as_ref()
        .expect("a standby reports its replay");
    assert!(replay.replay_lsn.contains('/'), "{status:?}");
    assert_eq!(replay.streaming, Some(true), "{status:?}");

    let (code, body) = follower_daemon.api("POST", "/v1/promote");
    assert_eq!(code, 200, "{body}");
    follower.wait_promoted(LONG);
    follower.sql("INSERT INTO t VALUES (-1, 'written after promotion')");
    assert_eq!(follower.sql("SELECT count(*) FROM t"), "60001");
}

/// pgbench's tables, summed: two servers with the same rows give the same text.
fn pgbench_digest(pg: &PgCluster) -> String {
    pg.sql(
        "SELECT (SELECT count(*) || ':' || sum(abalance) FROM pgbench_accounts) || '|' || \
         (SELECT count(*) || ':' || coalesce(sum(delta), 0) FROM pgbench_history)",
    )
}

/// 5. The daemon under pgbench, killed mid-upload; the restore has every row.
fn the_daemon_survives_kill_9_under_pgbench(major: u32) {
    let install = Install::version(major);
    let work = Workdir::new(&format!("pg{major}-kill"));
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let (mut pg, mut daemon) = primary_with_daemon(
        &work,
        &archive,
        &install,
        &[("WALDEN_ARCHIVE_PARALLELISM", "4")],
    );
    ok(
        archive
            .walden_pg(&pg, &["backup-push"])
            .output()
            .expect("backup-push"),
        "backup-push",
    );

    archive.proxy().throttle(512 << 10);
    pg.pgbench(&["-i", "-s", "4", "-q"]);
    wait_for("several uploads in flight", LONG, || {
        (daemon.metrics().get("walden_wal_uploads_in_flight") >= 2.0).then_some(())
    });
    daemon.kill9();
    let stored = archive.stored_segments();
    for name in pg
        .archive_status("done")
        .into_iter()
        .filter(|n| n.len() == 24)
    {
        assert!(
            stored.contains(&name),
            "{name} reported archived but not stored"
        );
    }
    assert!(
        !pg.archive_status("ready").is_empty(),
        "nothing left to archive at the kill"
    );

    archive.proxy().pass();
    daemon.restart();
    pg.pgbench(&["-t", "300", "-c", "2", "-n"]);
    let expected = pgbench_digest(&pg);
    let last = pg.switch_wal();
    pg.wait_archived(&last, LONG);
    pg.stop();

    let restored = restore_and_start(&work, &archive, &pg, "restored", &[]);
    assert_version(&restored, major);
    assert_eq!(pgbench_digest(&restored), expected, "the restore lost rows");
    let log = daemon.log_text() + &pg.log_text();
    assert!(
        !log.contains("refusing to overwrite"),
        "a conflicting re-push:\n{log}"
    );
}

/// One module per major version, each running every flow.
macro_rules! matrix {
    ($($module:ident => $major:literal),* $(,)?) => {
    /// The majors with a row here.
    const ROWS: &[u32] = &[$($major),*];
    $(
        mod $module {
            #[test]
            fn wal_push_and_wal_fetch_recover_every_row() {
                super::wal_push_and_wal_fetch_recover_every_row($major);
            }
            #[test]
            fn backup_and_restore_to_a_random_time_are_exact() {
                super::backup_and_restore_to_a_random_time_are_exact($major);
            }
            #[test]
            fn a_restore_follows_a_promotion_to_timeline_2() {
                super::a_restore_follows_a_promotion_to_timeline_2($major);
            }
            #[test]
            fn a_follower_replays_streams_and_is_promoted() {
                super::a_follower_replays_streams_and_is_promoted($major);
            }
            #[test]
            fn the_daemon_survives_kill_9_under_pgbench() {
                super::the_daemon_survives_kill_9_under_pgbench($major);
            }
        }
    )*};
}

matrix!(pg14 => 14, pg15 => 15, pg16 => 16, pg17 => 17, pg18 => 18);

/// Every major version walden accepts has a row, and no row tests a version
/// walden refuses.
#[test]
fn the_matrix_covers_every_supported_version() {
    let supported: Vec<u32> = walden::pg::SUPPORTED_MAJORS.collect();
    assert_eq!(ROWS, supported.as_slice());
    assert_eq!(walden_e2e::pg::MATRIX, ROWS);
}

/// After `pg_upgrade` from 15 to 18 (a new system identifier) the daemon on
/// the old prefix refuses the upgraded server and reports both databases,
/// typed. The operator's decision on that report is a new archive below the
/// prefix; the same daemon restarted with it (as the pod is) archives the
/// backlog there, backs up, and restores exactly with 18, with the rows
/// pg_upgrade carried over. The old archive is untouched by all of it,
/// verifies, and restores exactly with 15.
#[test]
fn after_pg_upgrade_the_old_archive_stays_restorable_and_the_new_server_gets_its_own() {
    let old_install = Install::version(15);
    let new_install = Install::version(18);
    let work = Workdir::new("pg-upgrade");
    let old_archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut old = Primary::start_with(&work, &old_archive, "old", &old_install);
    for b in 0..3 {
        old.commit_batch(b, "before the upgrade");
    }
    old.backup(&old_archive, &[]);
    old.commit_batch(3, "after the last 15 backup");
    old.archive_everything();
    let old_sysid = old
        .pg
        .sql("SELECT system_identifier FROM pg_control_system()");
    old.pg.stop();
    let old_keys = block_on(old_archive.keys());

    // pg_upgrade into a fresh 18 cluster (checksums off, as in the 15 one).
    let mut new =
        PgCluster::init_with_flags(work.path(), "new", &new_install, &["--no-data-checksums"]);
    let upgrade_dir = work.pg_dir("upgrade");
    let out = walden_e2e::sys::as_pg(new_install.server("pg_upgrade"))
        .current_dir(&upgrade_dir)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .arg("-b")
        .arg(&old_install.bin)
        .arg("-B")
        .arg(&new_install.bin)
        .arg("-d")
        .arg(&old.pg.data)
        .arg("-D")
        .arg(&new.data)
        .args([
            "-U",
            "postgres",
            "-p",
            &walden_e2e::sys::free_port().to_string(),
        ])
        .args(["-P", &walden_e2e::sys::free_port().to_string(), "-s"])
        .arg(&upgrade_dir)
        .output()
        .expect("pg_upgrade");
    ok(out, "pg_upgrade 15 -> 18");

    // The upgraded server archives through a daemon on the old prefix.
    new.archive_through_walden();
    new.set(&[("track_commit_timestamp", "on".into())]);
    let libpq = new.libpq_env();
    let daemon_env = |archive: &Archive| {
        let mut env = archive.env();
        env.extend(libpq.iter().cloned());
        env
    };
    let mut daemon = Daemon::start(work.path(), "upgraded", daemon_env(&old_archive));
    new.with_env(daemon.client_env()).start();
    assert_version(&new, 18);
    let new_sysid = new.sql("SELECT system_identifier FROM pg_control_system()");
    assert_ne!(
        new_sysid, old_sysid,
        "pg_upgrade kept the system identifier"
    );
    assert_eq!(batches_in(&new), set(0..4), "pg_upgrade lost rows");
    // Known before anything is pushed: the daemon compares PGDATA with walden.json.
    let refused = wait_for("the daemon to report the mismatch", LONG, || {
        daemon.status().archiving.identity_mismatch
    });
    assert_eq!(
        refused,
        IdentityMismatch {
            server_system_identifier: new_sysid.clone(),
            server_pg_version: Some(18),
            archive_system_identifier: old_sysid.clone(),
            archive_pg_version: Some(15),
        }
    );
    new.sql("CREATE TABLE after_upgrade AS SELECT 1 AS x");
    new.switch_wal();
    let error = wait_for("a push to be refused", LONG, || {
        daemon.status().archiving.last_error
    });
    assert!(
        error.contains(&format!("system identifier {new_sysid}"))
            && error.contains(&old_sysid)
            && error.contains("give this one its own storage prefix"),
        "the refusal does not name both databases: {error}"
    );
    assert_eq!(
        block_on(old_archive.keys()),
        old_keys,
        "the old archive changed"
    );

    // What the operator makes of the report: a new archive below the prefix.
    let spec: StorageSpec = serde_json::from_value(serde_json::json!({
        "s3": {"bucket": BUCKET, "prefix": "db", "workloadIdentity": true}
    }))
    .expect("storage spec");
    let OnMismatch::Start { current, previous } =
        archives::on_mismatch(&spec, None, &refused, chrono::Utc::now())
    else {
        panic!("an upgrade from 15 to 18 did not start a new archive");
    };
    assert_eq!(previous.prefix.as_deref(), Some("db"));
    let status = ContinuousBackupStatus {
        archive: Some(current),
        ..Default::default()
    };
    let url = specs::storage_url(&archives::current(&spec, Some(&status)));
    let sub = format!("db/pg18-{new_sysid}");
    assert_eq!(url, format!("s3://{BUCKET}/{sub}"));
    let new_archive = old_archive.at_prefix(&sub);

    // The pod restarts with it: the backlog goes there, then a backup.
    daemon.terminate(LONG);
    drop(daemon);
    let daemon = Daemon::start(work.path(), "upgraded", daemon_env(&new_archive));
    let mut upgraded = Primary {
        pg: new,
        batches: Vec::new(),
    };
    wait_for(
        "the refused segment to be stored in the new archive",
        LONG,
        || (daemon.status().archiving.archived_count >= 1).then_some(()),
    );
    assert_eq!(daemon.status().archiving.identity_mismatch, None);
    let id = daemon.backup();
    assert_eq!(new_archive.backup_ids(), [id]);
    upgraded.commit_batch(4, "after the upgrade");
    upgraded.archive_everything();
    let restored_new = restore_and_start(&work, &new_archive, &upgraded.pg, "new-restored", &[]);
    assert_version(&restored_new, 18);
    assert_eq!(
        batches_in(&restored_new),
        set(0..5),
        "the upgraded server's restore"
    );
    drop(restored_new);

    // The old archive: its own keys as they were, whole, and exact with 15.
    let own: Vec<String> = block_on(old_archive.keys())
        .into_iter()
        .filter(|k| !k.starts_with(&format!("pg18-{new_sysid}/")))
        .collect();
    assert_eq!(own, old_keys, "the old archive changed");
    ok(
        old_archive.walden_output(&["verify", "--wal"]),
        "verify the old archive",
    );
    let restored_old = restore_and_start(&work, &old_archive, &old.pg, "old-restored", &[]);
    assert_version(&restored_old, 15);
    assert_eq!(
        batches_in(&restored_old),
        set(0..4),
        "the old archive no longer restores exactly"
    );
}
