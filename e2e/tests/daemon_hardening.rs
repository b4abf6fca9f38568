//! Issue 12, items 5, 7, 8, 9, 10 and 15: the daemon tells the truth about
//! its own storage, hands its children its resolved settings, touches only
//! what it made, cannot be stalled by network clients, observes PostgreSQL
//! over one connection, and refuses bad settings with a clear error.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use walden_e2e::daemon::{Options, TOKEN};
use walden_e2e::ledger::{restore_and_start, LONG};
use walden_e2e::sys::{aws_env, wait_for};
use walden_e2e::{walden_bin, Archive, Daemon, PgCluster, StorageKind, Workdir};

/// A primary archiving through `daemon` (its thin client), with a ledger table.
fn primary(work: &Workdir, name: &str, extra: &[(&str, String)]) -> PgCluster {
    let pg = PgCluster::init(work.path(), name);
    let mut settings = vec![
        ("archive_mode", "on".to_string()),
        (
            "archive_command",
            format!("'{} wal-push %p'", walden_bin().display()),
        ),
    ];
    settings.extend(extra.iter().cloned());
    pg.set(&settings);
    pg
}

fn thin_push(daemon: &Daemon, path: &std::path::Path) -> std::process::Output {
    Command::new(walden_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("WALDEN_SOCKET", &daemon.socket)
        .arg("wal-push")
        .arg(path)
        .output()
        .expect("wal-push")
}

fn segment_key(name: &str) -> String {
    walden::wal::WalFile::parse(name)
        .expect("WAL name")
        .object_key()
}

/// Item 10: a daemon configured by flags alone runs backup-push, backup-list
/// and retain with those settings.
#[test]
fn children_run_with_the_daemons_resolved_settings() {
    let work = Workdir::new("daemon-flags");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut pg = primary(&work, "primary", &[("track_commit_timestamp", "on".into())]);
    // Only libpq settings and credentials in the environment; walden's own by flag.
    let env: Vec<(String, String)> = aws_env()
        .into_iter()
        .chain(pg.libpq_env().into_iter().filter(|(k, _)| k != "PGDATA"))
        .collect();
    let args: Vec<String> = [
        "--storage",
        &archive.url,
        "--retries",
        "2",
        "--pgdata",
        pg.data.to_str().expect("utf-8"),
        "--retention-full",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let daemon = Daemon::start_with(work.path(), "flags", env, Options { args, nofile: None });
    pg.with_env(daemon.client_env()).start();
    pg.sql("CREATE TABLE ledger (id serial PRIMARY KEY, batch int NOT NULL)");
    pg.sql("INSERT INTO ledger (batch) SELECT 1 FROM generate_series(1, 50)");
    let first = daemon.backup();
    pg.sql("INSERT INTO ledger (batch) SELECT 2 FROM generate_series(1, 50)");
    pg.switch_wal();
    let second = daemon.backup();
    // retain --full 1 ran with the daemon's storage: only the second is left.
    wait_for("retention to retire the first backup", LONG, || {
        (archive.backup_ids() == [second.as_str()]).then_some(())
    });
    assert_ne!(first, second);
    // backup-list ran with it too: the status knows the last backup.
    wait_for("the status to show the last backup", LONG, || {
        let (_, status) = daemon.api("GET", "/v1/status");
        (status["lastBackup"]["id"] == second.as_str()).then_some(())
    });
    pg.sql("INSERT INTO ledger (batch) SELECT 3 FROM generate_series(1, 50) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, LONG);
    let restored = restore_and_start(&work, &archive, &pg, "restored", &["--backup", &second]);
    let rows =
        restored.sql("SELECT batch || ':' || count(*) FROM ledger GROUP BY batch ORDER BY batch");
    assert_eq!(rows, "1:50\n2:50\n3:50");
    // The id a backup is stored under is the one asked for (the daemon
    // passes its job id: the API, status and Events name the stored backup,
    // even when backup-push starts in the next second); a taken id is refused.
    let named = archive
        .walden(&["backup-push", "--no-archive-check"])
        .envs(pg.libpq_env())
        .env("WALDEN_BACKUP_ID", "before-migration")
        .output()
        .expect("backup-push");
    assert!(
        named.status.success(),
        "{}",
        String::from_utf8_lossy(&named.stderr)
    );
    assert!(
        archive
            .backup_ids()
            .contains(&"before-migration".to_string()),
        "{:?}",
        archive.backup_ids()
    );
    let again = archive
        .walden(&[
            "backup-push",
            "--no-archive-check",
            "--id",
            "before-migration",
        ])
        .envs(pg.libpq_env())
        .output()
        .expect("backup-push");
    let err = String::from_utf8_lossy(&again.stderr);
    assert_eq!(again.status.code(), Some(1), "{err}");
    assert!(
        err.contains("backup id before-migration is already taken"),
        "{err}"
    );
}

/// Item 15: bad storage URLs and absurd durations get a clear error, never a
/// panic, and nothing is written where the URL did not mean.
#[test]
fn bad_urls_and_huge_durations_get_clear_errors() {
    let work = Workdir::new("bad-settings");
    let walden = |env: &[(&str, &str)], args: &[&str]| {
        Command::new(walden_bin())
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(env.iter().copied())
            .current_dir(work.path())
            .args(args)
            .output()
            .expect("walden")
    };
    assert!(!std::path::Path::new("/relative-walden-test").exists());
    for (url, needle) in [
        ("file:relative-walden-test", "not an absolute file URL"),
        ("file://", "not an absolute file URL"),
        ("file:///", "root directory"),
    ] {
        for args in [&["backup-list"][..], &["retain", "--full", "1"][..]] {
            let out = walden(&[("WALDEN_STORAGE", url)], args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{url} {args:?}: {err}");
            assert!(err.contains(needle), "{url} {args:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
    assert!(!std::path::Path::new("/relative-walden-test").exists());

    // A window longer than the calendar: everything is kept, nothing panics.
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let out = archive.walden_output(&["retain", "--window", "999999999d", "--json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // The daemon refuses a bad policy at start, naming it.
    let mut env = archive.env();
    env.push(("WALDEN_RETENTION_WINDOW".into(), "a fortnight".into()));
    env.push((
        "WALDEN_SOCKET".into(),
        work.path().join("s.sock").display().to_string(),
    ));
    env.push((
        "WALDEN_STATE_DIR".into(),
        work.path().join("state").display().to_string(),
    ));
    let out = Command::new(walden_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env)
        .arg("daemon")
        .output()
        .expect("daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("a fortnight") && err.contains("is not a duration"),
        "{err}"
    );
}

/// Item 5: the archive log speaks only for the storage it was written for.
#[test]
fn the_archive_log_does_not_outlive_its_storage() {
    let work = Workdir::new("log-identity");
    let first = Archive::new(StorageKind::File, work.path(), "first");
    let second = Archive::new(StorageKind::File, work.path(), "second");
    // Segments stay in pg_wal after archiving, so they can be pushed again.
    let mut pg = primary(&work, "primary", &[("wal_keep_size", "'256MB'".into())]);
    let mut env = first.env();
    env.extend(pg.libpq_env());
    let mut daemon = Daemon::start(work.path(), "d", env);
    pg.with_env(daemon.client_env()).start();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, LONG);
    pg.stop();
    daemon.terminate(LONG);
    assert!(first.object_path(&segment_key(&seg)).exists());

    // The same state directory, another storage.
    let mut env = second.env();
    env.extend(pg.libpq_env());
    let daemon = Daemon::start(work.path(), "d", env);
    let out = thin_push(&daemon, &pg.data.join("pg_wal").join(&seg));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        second.object_path(&segment_key(&seg)).exists(),
        "wal-push answered 0 for {seg}, but {} does not hold it (answered from the old storage's log)",
        second.url
    );
}

/// Item 9: the daemon deletes only what it made, refuses a socket path that
/// is not a socket, keeps the socket to PostgreSQL's user and group, and
/// archives only files of PGDATA's pg_wal.
#[test]
fn the_daemon_touches_only_what_it_made() {
    let work = Workdir::new("own-files");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut pg = primary(&work, "primary", &[]);
    let spool = work.path().join("spool");
    std::fs::create_dir_all(spool.join("keep")).expect("mkdir");
    std::fs::write(spool.join("notes.txt"), b"mine").expect("write");
    std::fs::write(spool.join("keep/more.txt"), b"mine too").expect("write");
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    env.push(("WALDEN_PREFETCH_DIR".into(), spool.display().to_string()));
    env.push(("WALDEN_PREFETCH".into(), "0".into()));

    // A regular file where the socket should go: refused, and left alone.
    let run = work.path().join("run-own");
    std::fs::create_dir_all(&run).expect("mkdir");
    std::fs::write(run.join("walden.sock"), b"precious").expect("write");
    let refused_log = work.path().join("refused.log");
    let mut refused = Command::new(walden_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(env.clone())
        .env("WALDEN_SOCKET", run.join("walden.sock"))
        .env("WALDEN_LISTEN", "127.0.0.1:0")
        .env("WALDEN_STATE_DIR", work.path().join("state-refused"))
        .arg("daemon")
        .stderr(std::fs::File::create(&refused_log).expect("log"))
        .spawn()
        .expect("daemon");
    let exited = wait_for(
        "the daemon to refuse the path",
        Duration::from_secs(60),
        || match refused.try_wait().expect("try_wait") {
            Some(status) => Some(Some(status)),
            None if refused_log_says_ready(&refused_log) => Some(None),
            None => None,
        },
    );
    if exited.is_none() {
        let _ = refused.kill();
        let _ = refused.wait();
    }
    let out = std::process::Output {
        status: exited.unwrap_or_else(|| std::os::unix::process::ExitStatusExt::from_raw(0)),
        stdout: Vec::new(),
        stderr: std::fs::read(&refused_log).unwrap_or_default(),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the daemon started on a regular file"
    );
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read(run.join("walden.sock")).expect("read"),
        b"precious"
    );
    std::fs::remove_file(run.join("walden.sock")).expect("rm");

    let daemon = Daemon::start(work.path(), "own", env);
    assert_eq!(
        std::fs::read(spool.join("notes.txt")).expect("notes"),
        b"mine"
    );
    assert_eq!(
        std::fs::read(spool.join("keep/more.txt")).expect("more"),
        b"mine too"
    );
    let meta = std::fs::symlink_metadata(&daemon.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660, "socket mode");
    let data = std::fs::metadata(&pg.data).expect("pgdata");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (data.uid(), data.gid()),
        "socket owner"
    );

    // PostgreSQL archives through it.
    pg.with_env(daemon.client_env()).start();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, LONG);
    // A WAL-named file outside PGDATA's pg_wal is refused (and never read).
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("pg_wal")).expect("mkdir");
    pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 1000) g");
    let next = pg.switch_wal();
    pg.wait_archived(&next, LONG);
    for dir in [elsewhere.clone(), elsewhere.join("pg_wal")] {
        let copy = dir.join(&next);
        std::fs::copy(pg.data.join("pg_wal").join(&next), &copy).expect("copy");
        let out = thin_push(&daemon, &copy);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{} was archived", copy.display());
        assert!(err.contains("refusing to archive"), "{err}");
    }
}

fn refused_log_says_ready(log: &std::path::Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|l| l.contains("walden daemon ready"))
}

/// One request on its own connection, with short timeouts: `None` when the
/// daemon closed it or did not answer in time.
fn quick_get(port: u16, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Item 7: more idle connections than the daemon has file descriptors, and
/// slowloris clients, neither stall WAL archiving nor keep /healthz away for
/// longer than the header timeout.
#[test]
fn network_clients_cannot_stall_archiving() {
    let work = Workdir::new("http-flood");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut pg = primary(&work, "primary", &[]);
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    env.push(("WALDEN_HTTP_HEADER_TIMEOUT".into(), "3".into()));
    let daemon = Daemon::start_with(
        work.path(),
        "flood",
        env,
        Options {
            args: Vec::new(),
            nofile: Some(256),
        },
    );
    pg.with_env(daemon.client_env()).start();
    pg.sql("CREATE TABLE t (v text)");

    // 50 slowloris connections that send a header byte now and then, and 600
    // idle ones (the daemon may open 256 descriptors in all).
    let slow_started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..50)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", daemon.port)).ok())
        .collect();
    for s in &mut slow {
        let _ = s.write_all(b"G");
    }
    let idle: Vec<TcpStream> = (0..600)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", daemon.port)).ok())
        .collect();
    assert!(idle.len() >= 500, "only {} connections opened", idle.len());
    // Archiving goes on meanwhile, as fast as PostgreSQL asks.
    let started = Instant::now();
    for i in 0..5 {
        pg.sql(&format!(
            "INSERT INTO t SELECT md5(g::text) FROM generate_series(1, {}) g",
            1000 * (i + 1)
        ));
        let seg = pg.switch_wal();
        pg.wait_archived(&seg, Duration::from_secs(60));
        for s in &mut slow {
            let _ = s.write_all(b"G");
        }
    }
    let archived_in = started.elapsed();
    // The slowloris connections are closed by the header timeout.
    for s in &mut slow {
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                Err(_) => break true,
            }
        };
        assert!(closed, "a slowloris connection stayed open");
    }
    let slow_closed_in = slow_started.elapsed();
    // /healthz answers again within the header timeout of the idle ones, while they stay open.
    let healthz_from = Instant::now();
    wait_for("/healthz to answer", Duration::from_secs(30), || {
        quick_get(daemon.port, "/healthz", None).filter(|(c, _)| *c == 200)
    });
    let healthz_in = healthz_from.elapsed();
    eprintln!(
        "with {} idle and {} slowloris connections: 5 segments archived in {archived_in:?}, \
         slowloris all found closed when checked {slow_closed_in:?} after they connected, /healthz answered after {healthz_in:?}",
        idle.len(),
        slow.len()
    );
    assert!(daemon.log_text().contains("too many HTTP connections"));
    drop(idle);
    let (code, _) = daemon.api("GET", "/v1/status");
    assert_eq!(code, 200);
}

/// Item 8: concurrent status calls share one PostgreSQL connection.
#[test]
fn status_observes_postgres_over_one_connection() {
    let work = Workdir::new("one-observer");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut pg = primary(
        &work,
        "primary",
        &[
            ("log_connections", "on".into()),
            ("max_connections", "20".into()),
        ],
    );
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    let daemon = Daemon::start(work.path(), "observer", env);
    pg.with_env(daemon.client_env()).start();
    let port = daemon.port;
    let answered: Vec<Value> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..300)
            .map(|_| {
                scope.spawn(move || {
                    // Over the connection cap a call is closed at once: ask again.
                    wait_for("a status answer", LONG, || {
                        quick_get(port, "/v1/status", Some(TOKEN))
                            .filter(|(c, _)| *c == 200)
                            .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                    })
                })
            })
            .collect();
        calls.into_iter().map(|c| c.join().expect("call")).collect()
    });
    assert_eq!(answered.len(), 300);
    assert!(
        answered.iter().all(|s| s["role"] == "primary"),
        "{:?}",
        answered[0]
    );
    let log = pg.log_text();
    let opened = log
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=walden"))
        .count();
    eprintln!(
        "300 concurrent /v1/status calls: {opened} PostgreSQL connection(s) opened by the daemon"
    );
    assert!(!log.contains("too many clients"), "{log}");
    assert!(opened <= 2, "{opened} connections for 300 status calls");
    let (_, status) = daemon.api("GET", "/v1/status");
    assert_eq!(status["role"], "primary");
    drop(pg);
    // PostgreSQL gone: the status still answers, from the data directory.
    wait_for("the status without PostgreSQL", LONG, || {
        let (code, s) = daemon.api("GET", "/v1/status");
        (code == 200 && s["role"] == "primary").then_some(())
    });
}
