//! PostgreSQL archives through `walden daemon`: its archive_command is the
//! thin client (only WALDEN_SOCKET in its environment, no storage settings),
//! and the daemon uploads the next `.ready` segments in parallel.
//!
//! - under a sustained pgbench load (bounded by transactions, not time) the
//!   archive keeps up, every segment is stored, contiguous and verifiable, and
//!   the metrics move with the work;
//! - `kill -9` of the daemon during parallel uploads, then a restart: nothing
//!   was reported archived before it was stored, nothing is lost, and every
//!   segment's stored content equals PostgreSQL's.

use std::path::Path;
use std::time::{Duration, Instant};

use walden::wal::SegmentName;
use walden_e2e::sys::wait_for;
use walden_e2e::{walden_bin, Archive, Daemon, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(300);
const SEGMENT_SIZE: u32 = 16 << 20;

/// A primary whose archive_command goes through `daemon`.
fn primary(work: &Workdir, daemon_env: &mut Vec<(String, String)>) -> PgCluster {
    let pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    pg.set(&[
        ("wal_level", "replica".into()),
        ("max_wal_size", "'1GB'".into()),
    ]);
    daemon_env.extend(pg.libpq_env());
    pg
}

/// Every segment from the first stored through `last` is stored (no gap), and
/// each one still in pg_wal comes back (verified, through the daemon) byte for byte.
fn assert_archive_complete(
    pg: &PgCluster,
    archive: &Archive,
    daemon: &Daemon,
    work: &Path,
    last: &str,
) -> usize {
    let stored = archive.stored_segments();
    let first = stored.iter().next().expect("no segment stored").clone();
    let mut seg = SegmentName::parse(&first).expect("segment name");
    let last_seg = SegmentName::parse(last).expect("segment name");
    let mut count = 0;
    while seg <= last_seg {
        assert!(
            stored.contains(&seg.to_string()),
            "{seg} missing from the archive (stored: {stored:?})"
        );
        seg = seg.next(SEGMENT_SIZE);
        count += 1;
    }
    let dest_dir = work.join("verify");
    std::fs::create_dir_all(&dest_dir).expect("mkdir");
    let mut compared = 0;
    for name in &stored {
        let dest = dest_dir.join(name);
        let out = std::process::Command::new(walden_bin())
            .env_clear()
            .envs(daemon.client_env())
            .args(["wal-fetch", name, dest.to_str().expect("utf-8")])
            .output()
            .expect("wal-fetch");
        assert!(
            out.status.success(),
            "{name} does not restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = std::fs::read(&dest).expect("restored");
        assert_eq!(got.len(), SEGMENT_SIZE as usize, "{name}: wrong size");
        if pg.archive_status("done").contains(name) {
            if let Ok(local) = std::fs::read(pg.data.join("pg_wal").join(name)) {
                assert!(local == got, "{name}: archived content differs from pg_wal");
                compared += 1;
            }
        }
        std::fs::remove_file(&dest).expect("rm");
    }
    eprintln!("archive complete: {count} segments through {last}, {compared} compared with pg_wal byte for byte");
    count
}

#[test]
fn archive_keeps_up_with_pgbench_through_the_daemon_on_s3() {
    let work = Workdir::new("daemon-load");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut env = archive.env();
    let mut pg = primary(&work, &mut env);
    env.push(("WALDEN_ARCHIVE_PARALLELISM".into(), "4".into()));
    let daemon = Daemon::start(work.path(), "primary", env);
    pg.with_env(daemon.client_env()).start();

    let m0 = daemon.metrics();
    assert_eq!(m0.get("walden_wal_archived_total"), 0.0);

    // Sustained write load, bounded by transaction count; sample the backlog meanwhile.
    let started = Instant::now();
    let mut max_ready = 0;
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            pg.pgbench(&["-i", "-s", "20", "-q"]);
            pg.pgbench(&["-n", "-c", "4", "-j", "2", "-t", "5000"]);
        });
        while !load.is_finished() {
            max_ready = max_ready.max(pg.archive_status("ready").len());
            std::thread::sleep(Duration::from_millis(25));
        }
        load.join().expect("pgbench");
    });
    let load_secs = started.elapsed().as_secs_f64();
    let rss = daemon.rss_kib();
    let last = pg.switch_wal();
    pg.wait_archived(&last, LONG);
    let drained = started.elapsed().as_secs_f64();
    let (archived, failed) = pg.archiver_counts();
    eprintln!(
        "pgbench load: {load_secs:.1} s, {archived} files archived, all archived after {drained:.1} s, \
         max .ready backlog {max_ready}, daemon RSS (now, peak) KiB {rss:?}"
    );
    assert_eq!(
        failed,
        0,
        "archive failures under load:\n{}",
        daemon.log_text()
    );
    assert!(
        archived >= 10,
        "only {archived} files archived; the load is too small to prove anything"
    );
    wait_for("the .ready backlog to drain", LONG, || {
        pg.archive_status("ready").is_empty().then_some(())
    });

    let count = assert_archive_complete(&pg, &archive, &daemon, work.path(), &last);
    assert!(count as u64 >= archived.saturating_sub(1));

    // The metrics moved with the work, and parallel archiving answered from memory.
    let m = daemon.metrics();
    assert!(
        m.get("walden_wal_archived_total") >= archived as f64,
        "{:?}",
        m.0
    );
    assert!(
        m.get("walden_wal_push_answers_total{answer=\"remembered\"}") > 0.0,
        "no push was answered from memory: {:?}",
        m.0
    );
    assert_eq!(m.get("walden_wal_archive_failures_total"), 0.0);
    assert_eq!(m.get("walden_wal_ready_files"), 0.0);
    assert!(m.get("walden_storage_uploaded_bytes_total") > 1e6);
    assert!(m.get("walden_wal_last_archived_timestamp_seconds") > 1.7e9);
    assert_eq!(
        m.get(&format!("walden_wal_last_archived{{wal=\"{last}\"}}")),
        1.0,
        "{:?}",
        m.0
    );
    assert!(m.get("walden_wal_fetches_total{result=\"restored\"}") >= count as f64);
    assert!(
        m.get("walden_prefetch_hits_total") > 0.0,
        "verification fetches never hit the prefetch"
    );
    assert!(m.get("walden_wal_fetch_duration_seconds_count{source=\"prefetch\"}") > 0.0);
    // /v1/status agrees with PostgreSQL.
    let (code, status) = daemon.api("GET", "/v1/status");
    assert_eq!(code, 200);
    assert_eq!(status["role"], "primary");
    assert_eq!(status["archiving"]["lastArchivedWal"], last.as_str());
    assert_eq!(status["archiving"]["readyCount"], 0);
    assert_eq!(status["archiving"]["failedCount"], 0);
    assert!(status["replay"].is_null());
}

#[test]
fn kill_9_during_parallel_uploads_loses_nothing_and_reports_nothing_early() {
    let work = Workdir::new("daemon-kill");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut env = archive.env();
    let mut pg = primary(&work, &mut env);
    env.push(("WALDEN_ARCHIVE_PARALLELISM".into(), "4".into()));
    let mut daemon = Daemon::start(work.path(), "primary", env);
    pg.with_env(daemon.client_env()).start();

    // Slow storage, so that several uploads are in flight at once.
    archive.proxy().throttle(512 << 10);
    pg.pgbench(&["-i", "-s", "6", "-q"]);
    wait_for("several uploads in flight", LONG, || {
        (daemon.metrics().get("walden_wal_uploads_in_flight") >= 2.0).then_some(())
    });
    daemon.kill9();

    // With the daemon dead nothing more can be stored: whatever PostgreSQL
    // considers archived must be in storage now, and so must whatever the
    // daemon's log remembers.
    let done = pg.archive_status("done");
    let reported = pg.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
    let stored = archive.stored_segments();
    for name in &done {
        assert!(
            stored.contains(name),
            "{name} reported archived to PostgreSQL but not stored"
        );
    }
    if reported.len() == 24 {
        assert!(
            stored.contains(&reported),
            "pg_stat_archiver says {reported} but it is not stored"
        );
    }
    let remembered =
        std::fs::read_to_string(daemon.state_dir.join("archived.jsonl")).unwrap_or_default();
    let mut remembered_count = 0;
    for line in remembered.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("archive log line");
        let name = v["name"].as_str().expect("name");
        assert!(
            stored.contains(name),
            "the archive log remembers {name}, which is not stored"
        );
        remembered_count += 1;
    }
    let ready_at_kill = pg.archive_status("ready");
    eprintln!(
        "at kill -9: {} done, {} ready, {} stored, {remembered_count} remembered",
        done.len(),
        ready_at_kill.len(),
        stored.len()
    );
    assert!(
        !ready_at_kill.is_empty(),
        "nothing was left to archive at the kill; the test proves nothing"
    );

    // Restart: PostgreSQL retries, everything ends up stored exactly once in content.
    archive.proxy().pass();
    daemon.restart();
    pg.sql("CREATE TABLE after_restart AS SELECT 1 AS x");
    let last = pg.switch_wal();
    pg.wait_archived(&last, LONG);
    assert_archive_complete(&pg, &archive, &daemon, work.path(), &last);
    let log = daemon.log_text() + &pg.log_text();
    assert!(
        !log.contains("refusing to overwrite"),
        "a conflicting re-push:\n{log}"
    );
    let m = daemon.metrics();
    eprintln!(
        "after restart: push answers remembered={} uploaded={}",
        m.get("walden_wal_push_answers_total{answer=\"remembered\"}"),
        m.get("walden_wal_push_answers_total{answer=\"uploaded\"}")
    );
}
