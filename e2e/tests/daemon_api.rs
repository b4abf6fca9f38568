//! The daemon's HTTP API: `/v1` needs the bearer token (missing or wrong →
//! 401 and nothing done), one base backup at a time (second POST → 409), the
//! status shape the operator is built against, promotion refused on a
//! primary, and `/metrics` as Prometheus text whose counters follow the work.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use walden_e2e::daemon::TOKEN;
use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, Daemon, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(180);

/// Keys of a JSON object, sorted.
fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect();
    k.sort();
    k
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// A backup command the test controls: it records its WALDEN_BACKUP_ID, waits
/// for a `release` file, and fails when a `fail` file exists.
fn backup_command(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "echo \"$WALDEN_BACKUP_ID\" >> {d}/ids; while [ ! -e {d}/release ]; do sleep 0.05; done; \
         if [ -e {d}/fail ]; then echo 'backup exploded: disk on fire' >&2; exit 3; fi"
    )
}

fn wait_job(daemon: &Daemon, id: &str, state: &str) -> Value {
    wait_for(&format!("backup {id} to be {state}"), LONG, || {
        let (code, job) = daemon.api("GET", &format!("/v1/backups/{id}"));
        assert_eq!(code, 200, "{job}");
        (job["state"] == state).then_some(job)
    })
}

#[test]
fn api_requires_the_token_runs_one_backup_at_a_time_and_reports_status() {
    let work = Workdir::new("daemon-api");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let jobs = work.path().join("jobs");
    std::fs::create_dir_all(&jobs).expect("mkdir");
    let mut pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    env.push(("WALDEN_BACKUP_COMMAND".into(), backup_command(&jobs)));
    let daemon = Daemon::start(work.path(), "api", env);
    pg.with_env(daemon.client_env()).start();

    // Health and metrics need no token.
    assert_eq!(daemon.http("GET", "/healthz", None).0, 200);
    let m0 = daemon.metrics();

    // Everything under /v1: no token, a wrong token (same length and not), a
    // malformed header → 401, and nothing happens.
    let wrong_same_len: String = TOKEN.chars().rev().collect();
    for token in [None, Some("nope"), Some(wrong_same_len.as_str()), Some("")] {
        for (method, path) in [
            ("GET", "/v1/status"),
            ("POST", "/v1/backups"),
            ("GET", "/v1/backups/x"),
            ("POST", "/v1/promote"),
        ] {
            let (code, body) = daemon.http(method, path, token);
            assert_eq!(code, 401, "{method} {path} with {token:?}: {body}");
        }
    }
    assert!(
        !jobs.join("ids").exists(),
        "a refused POST /v1/backups started a backup"
    );
    assert!(pg.sql("SELECT pg_is_in_recovery()") == "f");

    // The right token: the status, in exactly the operator's shape.
    pg.sql("CREATE TABLE t AS SELECT 1 AS x");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, LONG);
    let (code, status) = daemon.api("GET", "/v1/status");
    assert_eq!(code, 200, "{status}");
    assert_eq!(
        keys(&status),
        sorted(&[
            "role",
            "archiving",
            "lastBackup",
            "backupInProgress",
            "recoveryWindow",
            "replay",
            "recoveredTo",
            "continuity"
        ])
    );
    assert_eq!(
        keys(&status["archiving"]),
        sorted(&[
            "lastArchivedWal",
            "lastArchivedTime",
            "lastFailedWal",
            "lastFailedTime",
            "lastError",
            "archivedCount",
            "failedCount",
            "readyCount",
            "oldestReadyTime",
            "identityMismatch"
        ])
    );
    assert_eq!(status["role"], "primary");
    assert_eq!(status["archiving"]["lastArchivedWal"], seg.as_str());
    let t = status["archiving"]["lastArchivedTime"]
        .as_str()
        .expect("time");
    chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339 time");
    assert!(
        status["archiving"]["archivedCount"]
            .as_u64()
            .expect("count")
            >= 1
    );
    assert_eq!(status["archiving"]["failedCount"], 0);
    assert!(status["archiving"]["identityMismatch"].is_null());
    assert!(status["archiving"]["lastError"].is_null());
    assert!(status["backupInProgress"].is_null());
    assert!(status["replay"].is_null());
    // No base backup exists yet (the backup command here is a stand-in): no last backup, no window.
    assert!(status["lastBackup"].is_null());
    assert!(status["recoveryWindow"].is_null());
    assert!(status["continuity"].is_null());

    // Promotion of a primary is refused.
    let (code, body) = daemon.api("POST", "/v1/promote");
    assert_eq!(code, 409, "{body}");
    assert_eq!(pg.sql("SELECT pg_is_in_recovery()"), "f");

    // One backup at a time.
    let (code, first) = daemon.api("POST", "/v1/backups");
    assert_eq!(code, 202, "{first}");
    assert_eq!(first["state"], "running");
    let id = first["id"].as_str().expect("id").to_string();
    let (code, second) = daemon.api("POST", "/v1/backups");
    assert_eq!(code, 409, "{second}");
    assert_eq!(second["running"], id.as_str());
    assert!(second["error"].is_string());
    let (_, status) = daemon.api("GET", "/v1/status");
    assert_eq!(status["backupInProgress"]["id"], id.as_str());
    assert!(status["backupInProgress"]["startTime"].is_string());
    let (code, job) = daemon.api("GET", &format!("/v1/backups/{id}"));
    assert_eq!(code, 200);
    assert_eq!(
        keys(&job),
        sorted(&["id", "state", "error", "startTime", "stopTime"])
    );
    assert_eq!(job["state"], "running");
    assert!(job["stopTime"].is_null());
    assert_eq!(daemon.metrics().get("walden_backup_running"), 1.0);

    std::fs::write(jobs.join("release"), "").expect("release");
    let job = wait_job(&daemon, &id, "succeeded");
    assert!(job["error"].is_null(), "{job}");
    assert!(job["stopTime"].is_string());

    // The next one may start now; this one fails, and says why.
    std::fs::write(jobs.join("fail"), "").expect("fail");
    let (code, third) = daemon.api("POST", "/v1/backups");
    assert_eq!(code, 202, "{third}");
    let id3 = third["id"].as_str().expect("id").to_string();
    assert_ne!(id3, id);
    let job = wait_job(&daemon, &id3, "failed");
    assert!(
        job["error"].as_str().unwrap_or("").contains("disk on fire"),
        "{job}"
    );
    let ids = std::fs::read_to_string(jobs.join("ids")).expect("ids");
    assert_eq!(
        ids.lines().collect::<Vec<_>>(),
        vec![id.as_str(), id3.as_str()],
        "each backup ran once with its id"
    );
    let (code, _) = daemon.api("GET", "/v1/backups/19990101T000000Z");
    assert_eq!(code, 404);

    // The metrics followed all of it.
    let m = daemon.metrics();
    assert_eq!(m.get("walden_backups_total{result=\"succeeded\"}"), 1.0);
    assert_eq!(m.get("walden_backups_total{result=\"failed\"}"), 1.0);
    assert_eq!(
        m.get("walden_backup_duration_seconds_count{result=\"succeeded\"}"),
        1.0
    );
    assert_eq!(m.get("walden_backup_running"), 0.0);
    assert!(m.get("walden_backup_last_success_timestamp_seconds") > 1.7e9);
    assert!(m.get("walden_wal_archived_total") > m0.get("walden_wal_archived_total"));
    assert!(
        m.get("walden_storage_uploaded_bytes_total")
            > m0.get("walden_storage_uploaded_bytes_total")
    );
    assert_eq!(m.get("walden_postgres_in_recovery"), 0.0);
}

/// Without an override, `POST /v1/backups` runs `walden backup-push` as a
/// child with the daemon's environment; afterwards the status reports the
/// backup and the recovery window, read from the archive's catalog.
#[test]
fn api_backup_runs_backup_push_and_status_reports_the_catalog() {
    let work = Workdir::new("daemon-api-backup");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    pg.set(&[("wal_level", "replica".into())]);
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    let daemon = Daemon::start(work.path(), "api", env);
    pg.with_env(daemon.client_env()).start();
    pg.pgbench(&["-i", "-s", "2", "-q"]);

    let (code, started) = daemon.api("POST", "/v1/backups");
    assert_eq!(code, 202, "{started}");
    let id = started["id"].as_str().expect("id").to_string();
    let job = wait_job(&daemon, &id, "succeeded");
    assert!(job["error"].is_null(), "{job}\n{}", daemon.log_text());

    let (code, status) = daemon.api("GET", "/v1/status");
    assert_eq!(code, 200);
    let last = &status["lastBackup"];
    assert_eq!(
        keys(last),
        sorted(&["id", "startTime", "stopTime", "startLsn", "stopLsn"]),
        "{status}"
    );
    assert!(last["stopLsn"].as_str().expect("stopLsn").contains('/'));
    let window = &status["recoveryWindow"];
    assert_eq!(
        keys(window),
        sorted(&["firstPoint", "firstLsn", "lastArchivedWal"]),
        "{status}"
    );
    assert!(window["lastArchivedWal"].is_string(), "{status}");
    assert!(status["backupInProgress"].is_null());
    let m = daemon.metrics();
    assert_eq!(m.get("walden_backups_total{result=\"succeeded\"}"), 1.0);
    assert!(m.get("walden_backup_duration_seconds_sum{result=\"succeeded\"}") > 0.0);
}

/// Issue 14, item 8: a rotated token file is honoured at once, and the token
/// it replaced keeps working for the grace period only (the kubelet updates
/// the mounted Secret long after the operator reads the new one).
#[test]
fn a_rotated_token_works_at_once_and_the_old_one_only_within_the_grace() {
    let work = Workdir::new("daemon-token-rotation");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let grace = Duration::from_secs(3);
    let mut env = archive.env();
    env.push(("WALDEN_TOKEN_GRACE".into(), grace.as_secs().to_string()));
    let daemon = Daemon::start(work.path(), "rotation", env);
    // An unknown backup id: 404 when authorized, 401 when not.
    let probe = |token: &str| daemon.http("GET", "/v1/backups/none", Some(token)).0;
    assert_eq!(probe(TOKEN), 404, "the first token works");
    let rotated = "rotated-token-9876543210";
    assert_eq!(probe(rotated), 401, "not before the file says so");

    std::fs::write(&daemon.token_file, format!("{rotated}\n")).expect("rotate the token file");
    let changed = std::time::Instant::now();
    assert_eq!(probe(rotated), 404, "the new token is accepted at once");
    assert_eq!(probe(TOKEN), 404, "the old token within the grace");
    assert_eq!(probe("someone-else"), 401, "other tokens are still refused");

    wait_for("the old token to expire", LONG, || {
        (probe(TOKEN) == 401).then_some(())
    });
    assert!(
        changed.elapsed() >= grace,
        "the old token was refused after {:?}, before the {grace:?} grace",
        changed.elapsed()
    );
    assert_eq!(probe(rotated), 404, "the new token still works");

    // The daemon's log (a file, as in `kubectl logs`) carries no colour codes.
    let log = std::fs::read(&daemon.log).expect("daemon log");
    assert!(
        !log.is_empty() && !log.contains(&0x1b),
        "ANSI escapes in the daemon log"
    );
}
