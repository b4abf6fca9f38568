//! A follower at process level, run the way the operator's pod runs it:
//! `walden backup-push` on the source, then for the follower `walden restore
//! --standby --primary-conninfo ...` (read-only storage), its own read-only
//! `walden daemon` (prefetching) serving `restore_command`, and `pg_ctl start`.
//! The primary is reached through a TCP proxy that first refuses connections
//! (the primary is unreachable: the follower must replay from the archive)
//! and then passes them (it must stream). It catches up through both,
//! answers reads with the primary's latest rows, is promoted through
//! `POST /v1/promote`, accepts writes — and never writes into the source's
//! archive (invariant 6: the object list is identical before and after, even
//! though the promoted follower tries to archive its new timeline).

use std::time::Duration;

use walden::storage::ObjectInfo;
use walden_e2e::ledger::block_on;
use walden_e2e::sys::{run, wait_for};
use walden_e2e::{walden_bin, Archive, Daemon, FaultProxy, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(300);

fn objects(archive: &Archive) -> Vec<ObjectInfo> {
    block_on(async { archive.storage().await.list("").await.expect("list") })
}

/// Row count and digest of table t.
fn digest(pg: &PgCluster) -> Result<String, String> {
    pg.try_sql("SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM t")
}

fn insert_batch(pg: &PgCluster, batch: u32) {
    pg.sql(&format!(
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({}, {}) g",
        batch * 20000,
        batch * 20000 + 19999
    ));
}

fn wait_same_rows(follower: &PgCluster, primary_digest: &str, how: &str) {
    wait_for(
        &format!("the follower to catch up through {how}"),
        LONG,
        || (digest(follower).ok()? == primary_digest).then_some(()),
    );
}

#[test]
fn follower_replays_the_archive_streams_is_promoted_and_never_writes_the_source() {
    let work = Workdir::new("follower");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let walden = walden_bin();

    // The source: a primary archiving through its daemon.
    let mut primary = PgCluster::init(work.path(), "primary");
    primary.archive_through_walden();
    primary.set(&[("wal_level", "replica".into())]);
    let mut env = archive.env();
    env.extend(primary.libpq_env());
    let mut source_daemon = Daemon::start(work.path(), "source", env);
    primary.with_env(source_daemon.client_env()).start();
    primary.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    insert_batch(&primary, 0);
    let mut backup = archive.walden(&["backup-push"]);
    backup.envs(primary.libpq_env());
    run(&mut backup);

    // Written after the base backup and archived: the follower must replay it from the archive.
    for batch in 1..=8 {
        insert_batch(&primary, batch);
        primary.switch_wal();
    }
    let last = primary.switch_wal();
    primary.wait_archived(&last, LONG);

    // The follower, as its pod builds it: restore (read-only), then its own read-only daemon.
    let to_primary = FaultProxy::start(primary.port);
    to_primary.drop_connections();
    let dest = work.path().join("follower");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=follower",
        to_primary.port
    );
    let restore_command = format!("{} wal-fetch %f %p", walden.display());
    let mut restore = archive.walden(&[
        "restore",
        dest.to_str().expect("utf-8"),
        "--standby",
        "--primary-conninfo",
        &conninfo,
        "--restore-command",
        &restore_command,
    ]);
    restore.env("WALDEN_READ_ONLY", "true");
    run(&mut restore);
    run(std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dest));
    assert!(
        dest.join("standby.signal").exists(),
        "restore --standby wrote no standby.signal"
    );
    let mut follower = PgCluster::adopt(work.path(), dest);
    follower.set(&[
        ("hot_standby", "on".into()),
        ("archive_mode", "on".into()),
        (
            "archive_command",
            format!("'{} wal-push %p'", walden.display()),
        ),
    ]);
    let mut env = archive.env();
    env.extend(follower.libpq_env());
    env.push(("WALDEN_READ_ONLY".into(), "true".into()));
    env.push(("WALDEN_PREFETCH".into(), "4".into()));
    let follower_daemon = Daemon::start(work.path(), "follower", env);
    follower.with_env(follower_daemon.client_env()).start();

    // 1. Archive replay: the primary is unreachable.
    let archived_rows = digest(&primary).expect("digest");
    wait_same_rows(&follower, &archived_rows, "archive replay");
    assert_eq!(follower.sql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(
        follower.sql("SELECT count(*) FROM pg_stat_wal_receiver"),
        "0",
        "streaming without primary_conninfo?"
    );
    assert!(
        follower.log_text().contains("restored log file"),
        "{}",
        follower.log_text()
    );
    let m = follower_daemon.metrics();
    assert!(
        m.get("walden_prefetch_hits_total") > 0.0,
        "archive replay never used the prefetch: {:?}",
        m.0
    );
    assert!(m.get("walden_wal_fetches_total{result=\"restored\"}") >= 8.0);
    assert_eq!(m.get("walden_wal_fetches_total{result=\"failed\"}"), 0.0);

    // 2. Streaming: the primary becomes reachable; new rows are not archived yet.
    to_primary.pass();
    insert_batch(&primary, 9);
    primary.sql("UPDATE t SET v = 'latest' WHERE id = 7");
    let latest = digest(&primary).expect("digest");
    wait_same_rows(&follower, &latest, "streaming");
    assert_eq!(follower.sql("SELECT v FROM t WHERE id = 7"), "latest");
    wait_for("the wal receiver to stream", LONG, || {
        (follower.sql("SELECT coalesce(string_agg(status, ','), '') FROM pg_stat_wal_receiver")
            == "streaming")
            .then_some(())
    });
    let (code, status) = follower_daemon.api("GET", "/v1/status");
    assert_eq!(code, 200);
    assert_eq!(status["role"], "standby");
    let lsn = status["replay"]["replayLsn"].as_str().expect("replayLsn");
    assert!(lsn.contains('/'), "{status}");
    assert!(status["replay"]["lagBytes"].is_u64());
    assert!(status["replay"]["lagSeconds"].is_f64());
    assert_eq!(
        follower_daemon.metrics().get("walden_postgres_in_recovery"),
        1.0
    );

    // The source goes away with its archive complete; from here on nothing may change in it.
    primary.wait_archived(&primary.switch_wal(), LONG);
    primary.stop();
    source_daemon.kill9();
    let before = objects(&archive);

    // 3. Promote through the follower's API; it accepts writes.
    let (code, body) = follower_daemon.api("POST", "/v1/promote");
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, serde_json::json!({"promoted": true}));
    follower.wait_promoted(LONG);
    let (code, _) = follower_daemon.api("POST", "/v1/promote");
    assert_eq!(code, 409, "promoting a primary again must be refused");
    follower.sql("INSERT INTO t VALUES (-1, 'written after promotion')");
    assert_eq!(
        follower.sql("SELECT v FROM t WHERE id = -1"),
        "written after promotion"
    );
    follower.switch_wal();

    // It tries to archive its new timeline into the source: refused, nothing written.
    wait_for(
        "the promoted follower's archiving to be refused",
        LONG,
        || {
            let (_, s) = follower_daemon.api("GET", "/v1/status");
            s["archiving"]["lastError"]
                .as_str()
                .filter(|e| e.contains("read-only"))
                .map(|_| ())
        },
    );
    assert!(follower.archiver_counts().1 >= 1);
    let after = objects(&archive);
    assert_eq!(
        before, after,
        "the follower wrote into its source's archive"
    );
    let (_, status) = follower_daemon.api("GET", "/v1/status");
    assert_eq!(
        status["role"],
        "primary",
        "{status}\ndaemon log:\n{}",
        follower_daemon.log_text()
    );
    assert_eq!(status["archiving"]["archivedCount"], 0);
}
