//! Measurements, not tests (ignored by default): archiving and restoring 64
//! real 16 MiB segments (from `pgbench -i -s 100`) on S3 (s3s-fs on
//! loopback, no proxy), one `walden` call per segment versus through the
//! daemon, sequentially as PostgreSQL calls them. Run with the release binary:
//!
//! ```sh
//! cargo build --release -p walden --bins
//! WALDEN_BIN=$CARGO_TARGET_DIR/release/walden \
//!   cargo test -p walden-e2e --test daemon_bench -- --ignored --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use walden_e2e::{walden_bin, Archive, Daemon, PgCluster, StorageKind, Workdir};

const SEGMENTS: usize = 64;
const MIB: f64 = 1024.0 * 1024.0;

/// 64 completed segments with their `.ready` markers, in `<work>/wal`.
fn make_segments(work: &Workdir) -> (PathBuf, Vec<String>) {
    let mut pg = PgCluster::init(work.path(), "src");
    pg.set(&[
        ("archive_mode", "on".into()),
        // Never archives: every segment stays .ready.
        ("archive_command", "'/bin/false'".into()),
        ("wal_level", "replica".into()),
        ("max_wal_size", "'4GB'".into()),
    ]);
    pg.start();
    pg.pgbench(&["-i", "-s", "100", "-q"]);
    pg.switch_wal();
    pg.stop();
    let ready = pg.archive_status("ready");
    assert!(ready.len() >= SEGMENTS, "only {} segments", ready.len());
    let names: Vec<String> = ready
        .into_iter()
        .filter(|n| n.len() == 24)
        .take(SEGMENTS)
        .collect();
    let wal = work.path().join("wal");
    std::fs::create_dir_all(wal.join("archive_status")).expect("mkdir");
    for n in &names {
        std::fs::copy(pg.data.join("pg_wal").join(n), wal.join(n)).expect("copy");
        std::fs::write(wal.join("archive_status").join(format!("{n}.ready")), "").expect("ready");
    }
    (wal, names)
}

/// The archive's environment, straight to the S3 server (no fault proxy).
fn direct_env(archive: &Archive) -> Vec<(String, String)> {
    let mut env = archive.env();
    env.retain(|(k, _)| k != "WALDEN_S3_ENDPOINT");
    env.push((
        "WALDEN_S3_ENDPOINT".into(),
        archive.s3.as_ref().expect("s3").endpoint(),
    ));
    env
}

/// Runs `walden <args>` under `/usr/bin/time`; returns its peak RSS in KiB.
fn walden(env: &[(String, String)], args: &[&str], rss_file: &Path) -> u64 {
    let out = Command::new("/usr/bin/time")
        .args(["-f", "%M", "-o", s(rss_file)])
        .arg(walden_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().cloned())
        .env("WALDEN_LOG", "warn")
        .args(args)
        .output()
        .expect("walden");
    assert!(
        out.status.success(),
        "walden {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(rss_file)
        .ok()
        .and_then(|t| t.trim().lines().last()?.parse().ok())
        .unwrap_or(0)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8")
}

/// `rss`: (whose, peak KiB).
fn report(what: &str, secs: f64, rss: (&str, u64)) {
    let mb = SEGMENTS as f64 * 16.0 * MIB / MIB;
    let rss = format!(", {} peak RSS {:.1} MiB", rss.0, rss.1 as f64 / 1024.0);
    eprintln!(
        "{what:<48} {secs:6.2} s  {:6.1} segments/s  {:7.1} MiB/s{rss}",
        SEGMENTS as f64 / secs,
        mb / secs
    );
}

/// Pushes every segment in order; (seconds, peak RSS of any one call in KiB).
fn push_all(env: &[(String, String)], wal: &Path, names: &[String]) -> (f64, u64) {
    let rss_file = wal.join("time.out");
    let started = Instant::now();
    let mut peak = 0;
    for n in names {
        peak = peak.max(walden(env, &["wal-push", s(&wal.join(n))], &rss_file));
    }
    (started.elapsed().as_secs_f64(), peak)
}

fn fetch_all(env: &[(String, String)], out: &Path, names: &[String]) -> (f64, u64) {
    std::fs::create_dir_all(out).expect("mkdir");
    let rss_file = out.join("time.out");
    let started = Instant::now();
    let mut peak = 0;
    for n in names {
        let dest = out.join(n);
        peak = peak.max(walden(env, &["wal-fetch", n, s(&dest)], &rss_file));
        std::fs::remove_file(&dest).expect("rm");
    }
    (started.elapsed().as_secs_f64(), peak)
}

fn daemon_peak(d: &Daemon) -> u64 {
    d.rss_kib().map(|(_, peak)| peak).unwrap_or(0)
}

#[test]
#[ignore = "measurement; run with --ignored and a release WALDEN_BIN"]
fn measure_daemon_archive_and_fetch_throughput_on_s3() {
    let work = Workdir::new("daemon-bench");
    let (wal, names) = make_segments(&work);
    eprintln!("walden binary: {}", walden_bin().display());

    // Archiving: one call per segment (each a process with its own S3 client).
    let a = Archive::new(StorageKind::S3, work.path(), "direct");
    let (secs, peak) = push_all(&direct_env(&a), &wal, &names);
    report("wal-push, one call per segment", secs, ("per-call", peak));

    // Through the daemon, without and with parallel archiving.
    for parallelism in [1, 4, 8] {
        let archive = Archive::new(
            StorageKind::S3,
            work.path(),
            &format!("daemon-p{parallelism}"),
        );
        let mut env = direct_env(&archive);
        env.push(("WALDEN_ARCHIVE_PARALLELISM".into(), parallelism.to_string()));
        let daemon = Daemon::start(work.path(), &format!("push-p{parallelism}"), env);
        let (secs, client) = push_all(&daemon.client_env(), &wal, &names);
        report(
            &format!("wal-push via daemon, parallelism {parallelism}"),
            secs,
            ("daemon", daemon_peak(&daemon)),
        );
        eprintln!("    thin client peak RSS {:.1} MiB", client as f64 / 1024.0);
    }

    // Restoring the 64 segments from the directly-pushed archive.
    let env = direct_env(&a);
    let (secs, peak) = fetch_all(&env, &work.path().join("fetch-direct"), &names);
    report("wal-fetch, one call per segment", secs, ("per-call", peak));
    for depth in [0, 8] {
        let mut env = direct_env(&a);
        env.push(("WALDEN_PREFETCH".into(), depth.to_string()));
        let daemon = Daemon::start(work.path(), &format!("fetch-d{depth}"), env);
        let (secs, _) = fetch_all(
            &daemon.client_env(),
            &work.path().join(format!("fetch-d{depth}")),
            &names,
        );
        report(
            &format!("wal-fetch via daemon, prefetch {depth}"),
            secs,
            ("daemon", daemon_peak(&daemon)),
        );
        let m = daemon.metrics();
        eprintln!(
            "    prefetch hits {} misses {}",
            m.get("walden_prefetch_hits_total"),
            m.get("walden_prefetch_misses_total")
        );
    }
}

/// Runs the archiving test's pgbench load (`-i -s $WALDEN_BENCH_SCALE`,
/// default 20, then 4 clients × 5000 transactions) with `archive_command` direct or through a daemon;
/// prints the largest `.ready` backlog seen and the daemon's RSS.
fn backlog_run(through_daemon: bool) {
    let tag = if through_daemon { "daemon" } else { "direct" };
    let scale = std::env::var("WALDEN_BENCH_SCALE").unwrap_or_else(|_| "20".into());
    let work = Workdir::new(&format!("bench-backlog-{tag}"));
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    pg.set(&[
        ("wal_level", "replica".into()),
        ("max_wal_size", "'1GB'".into()),
    ]);
    let mut env = direct_env(&archive);
    env.extend(pg.libpq_env());
    let daemon = through_daemon.then(|| Daemon::start(work.path(), "primary", env.clone()));
    match &daemon {
        Some(d) => pg.with_env(d.client_env()),
        None => pg.with_env(env),
    };
    pg.start();
    let started = Instant::now();
    let mut max_ready = 0;
    let mut peak_rss = 0;
    std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            pg.pgbench(&["-i", "-s", &scale, "-q"]);
            pg.pgbench(&["-n", "-c", "4", "-j", "2", "-t", "5000"]);
        });
        while !load.is_finished() {
            max_ready = max_ready.max(pg.archive_status("ready").len());
            if let Some(d) = &daemon {
                peak_rss = peak_rss.max(daemon_peak(d));
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        load.join().expect("pgbench");
    });
    let load_secs = started.elapsed().as_secs_f64();
    let last = pg.switch_wal();
    pg.wait_archived(&last, std::time::Duration::from_secs(600));
    let (archived, failed) = pg.archiver_counts();
    eprintln!(
        "pgbench -s {scale} backlog, archive_command {tag:<7}: load {load_secs:5.1} s, all {archived} archived after {:5.1} s, \
         {failed} failures, max .ready backlog {max_ready}{}",
        started.elapsed().as_secs_f64(),
        if through_daemon {
            format!(", daemon peak RSS {:.1} MiB", peak_rss as f64 / 1024.0)
        } else {
            String::new()
        }
    );
}

#[test]
#[ignore = "measurement; run with --ignored and a release WALDEN_BIN"]
fn measure_archive_backlog_under_pgbench() {
    backlog_run(false);
    backlog_run(true);
}
