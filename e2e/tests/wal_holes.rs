//! What `wal-fetch` hands PostgreSQL is the archive's truth: a hole in the
//! archive stops recovery loudly instead of ending it early, a segment stored
//! under another segment's name is refused, and files that are not what
//! their names say are refused at push, at fetch and by `verify`.
//! Real PostgreSQL 15 replays every restore; rows are compared.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use walden_e2e::ledger::{batches_in, block_on, ok, restore_into, rfc3339, Primary, LONG};
use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, Daemon, PgCluster, StorageKind, Workdir};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn seg_key(name: &str) -> String {
    format!("wal/{}/{name}.zst", &name[..16])
}

/// A primary with a backup and `n` batches, each batch in a segment of its
/// own; returns it and the segment each batch was completed in.
fn segmented(work: &Workdir, archive: &Archive, n: u32) -> (Primary, Vec<String>) {
    let mut p = Primary::start(work, archive, "primary");
    p.backup(archive, &[]);
    let mut segments = Vec::new();
    for b in 0..n {
        p.commit_batch(b, "row");
        segments.push(p.pg.switch_wal());
    }
    p.archive_everything();
    (p, segments)
}

/// Restores to the end of the archive (with extra environment for the
/// restored server's restore_command) and starts it without waiting.
fn restore_unstarted(
    work: &Workdir,
    archive: &Archive,
    source: &PgCluster,
    name: &str,
    env: &[(&str, &str)],
) -> PgCluster {
    let dest = work.pg_dir(name);
    ok(
        archive
            .walden_pg(source, &["restore", dest.to_str().expect("utf-8")])
            .output()
            .expect("restore"),
        "restore",
    );
    let mut pg = PgCluster::adopt(work.path(), dest);
    pg.set(&[("archive_mode", "off".into())]);
    let mut e = archive.env();
    e.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    pg.with_env(e);
    pg
}

/// Starts a restored server that must refuse to finish recovery: waits until
/// the postmaster is gone, and checks it never promoted and said `needles`.
fn assert_recovery_stops(pg: &mut PgCluster, needles: &[&str]) -> String {
    let _ = pg.try_start(Duration::from_secs(5));
    wait_for("the server to stop recovery or promote", LONG, || {
        (!pg.is_running() || pg.try_sql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f"))
            .then_some(())
    });
    let log = pg.log_text();
    if pg.is_running() {
        panic!(
            "recovery ended early and promoted, with batches {:?}:\n{log}",
            batches_in(pg)
        );
    }
    for n in needles {
        assert!(log.contains(n), "expected {n:?} in the server log:\n{log}");
    }
    assert!(
        !log.contains("archive recovery complete") && !log.contains("selected new timeline ID"),
        "recovery ended early and promoted:\n{log}"
    );
    log
}

/// Item 2: a segment missing from the middle of the archive stops the
/// restore (exit >125, "hole", the segment named) instead of promoting with
/// the rows before it; an upload arriving within the grace is replayed.
#[test]
fn a_hole_in_the_archive_stops_recovery_and_a_late_upload_is_waited_for() {
    let work = Workdir::new("hole");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let (p, segments) = segmented(&work, &archive, 6);
    let missing = segments[3].clone();
    let object = archive.object_path(&seg_key(&missing));
    let saved = work.path().join("saved-object");
    std::fs::rename(&object, &saved).expect("take the segment out");

    let mut pg = restore_unstarted(
        &work,
        &archive,
        &p.pg,
        "holed",
        &[("WALDEN_HOLE_GRACE", "1")],
    );
    assert_recovery_stops(&mut pg, &["hole", &missing]);

    // The same hole, but the upload lands while wal-fetch waits for it.
    let mut pg = restore_unstarted(
        &work,
        &archive,
        &p.pg,
        "late",
        &[("WALDEN_HOLE_GRACE", "120")],
    );
    pg.start();
    wait_for("wal-fetch to wait for the missing segment", LONG, || {
        pg.log_text()
            .contains("waiting for an upload in flight")
            .then_some(())
    });
    // Lands atomically, as a storage upload does.
    let landing = work.path().join("landing");
    std::fs::copy(&saved, &landing).expect("copy the upload");
    walden_e2e::sys::chown_pg(&landing);
    std::fs::rename(&landing, &object).expect("the upload lands");
    wait_for("recovery to end", LONG, || {
        (pg.try_sql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f") || !pg.is_running())
            .then_some(())
    });
    assert!(pg.is_running(), "recovery failed:\n{}", pg.log_text());
    assert_eq!(batches_in(&pg), (0..6).collect());
}

/// Item 2: without `00000002.history`, recovery would take timeline 1 to
/// its end and then pick timeline 2 again, colliding with archived WAL.
#[test]
fn a_missing_history_file_stops_recovery() {
    let work = Workdir::new("nohistory");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let (p, _) = segmented(&work, &archive, 4);
    let t = rfc3339(
        &p.pg,
        &format!("'{}'::timestamptz", p.batches[1].commit_time),
    );
    // A fork archiving its timeline 2 into the same archive.
    let mut fork = restore_into(&work, &archive, &p.pg, "fork", &["--target-time", &t], true);
    let last = fork.switch_wal();
    fork.wait_archived(&last, LONG);
    fork.stop();
    let history = archive.object_path("wal/00000002.history.zst");
    assert!(history.exists(), "the fork archived its history file");
    std::fs::remove_file(&history).expect("lose the history file");

    let mut pg = restore_unstarted(
        &work,
        &archive,
        &p.pg,
        "restored",
        &[("WALDEN_HOLE_GRACE", "1")],
    );
    assert_recovery_stops(&mut pg, &["hole", "00000002.history"]);
}

/// Items 3 and 11: segment 5's object stored under segment 4's name (its
/// checksum is fine), or a truncated segment, is refused by wal-fetch (direct
/// and through the daemon) and named by verify (exit 2); PostgreSQL never
/// reads it as the end of WAL.
#[test]
fn a_segment_under_another_name_or_truncated_is_refused() {
    let work = Workdir::new("misplaced");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let (p, segments) = segmented(&work, &archive, 5);
    let (victim, intruder) = (&segments[2], &segments[3]);
    std::fs::copy(
        archive.object_path(&seg_key(intruder)),
        archive.object_path(&seg_key(victim)),
    )
    .expect("misplace the object");

    let dest = work.path().join("fetched");
    let out = archive.walden_output(&["wal-fetch", victim, dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(254), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("another segment") && stderr(&out).contains(victim.as_str()),
        "{}",
        stderr(&out)
    );
    assert!(!dest.exists(), "the wrong bytes reached the destination");

    let daemon = Daemon::start(work.path(), "d", archive.env());
    let mut thin = std::process::Command::new(walden_e2e::walden_bin());
    thin.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(daemon.client_env())
        .args(["wal-fetch", victim, dest.to_str().unwrap()]);
    let out = thin.output().expect("thin wal-fetch");
    assert_eq!(out.status.code(), Some(254), "{}", stderr(&out));
    assert!(stderr(&out).contains("another segment"), "{}", stderr(&out));
    drop(daemon);

    let out = archive.walden_output(&["verify", "--wal"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("WrongContent") && stdout.contains(victim.as_str()),
        "{stdout}"
    );

    let mut pg = restore_unstarted(&work, &archive, &p.pg, "restored", &[]);
    assert_recovery_stops(&mut pg, &["another segment", victim]);

    // A truncated segment stored by hand: refused the same way.
    let victim = &segments[1];
    let truncated = truncated_object(&archive, victim, &work);
    std::fs::copy(&truncated, archive.object_path(&seg_key(victim))).expect("truncate");
    let out = archive.walden_output(&["wal-fetch", victim, dest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(254), "{}", stderr(&out));
    assert!(stderr(&out).contains("8192 bytes"), "{}", stderr(&out));
    let out = archive.walden_output(&["verify", "--wal"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("8192 bytes"));
}

/// The sealed object of the first 8 KiB of `name`'s real content.
fn truncated_object(archive: &Archive, name: &str, work: &Workdir) -> PathBuf {
    let dir = work.path().join("trunc");
    std::fs::create_dir_all(&dir).unwrap();
    let full = dir.join(name);
    ok(
        archive.walden_output(&["wal-fetch", name, full.to_str().unwrap()]),
        "fetch the real segment",
    );
    let bytes = std::fs::read(&full).unwrap();
    let other = Archive::new(StorageKind::File, work.path(), "trunc-archive");
    block_on(async {
        let storage = other.storage().await;
        let body = walden::object::Sealer::new(
            std::io::Cursor::new(bytes[..8192].to_vec()),
            walden::object::SealOptions::default(),
        );
        storage
            .create(&seg_key(name), Box::pin(body))
            .await
            .unwrap();
    });
    other.object_path(&seg_key(name))
}

/// Items 11 and 12: a truncated segment and garbage history or backup
/// history files are refused by wal-push before anything is stored; a
/// garbage history stored behind walden's back is named by verify (exit 2).
#[test]
fn files_that_are_not_what_their_names_say_are_refused_at_push() {
    let work = Workdir::new("badpush");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let (p, segments) = segmented(&work, &archive, 1);
    let dir = work.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let full = dir.join("full");
    ok(
        archive.walden_output(&["wal-fetch", &segments[0], full.to_str().unwrap()]),
        "fetch",
    );
    // 8 KiB with a valid header, named as a segment 100 later (never archived).
    let mut short = std::fs::read(&full).unwrap()[..8192].to_vec();
    let n = u32::from_str_radix(&segments[0][16..], 16).unwrap() + 100;
    let later = format!("{}{n:08X}", &segments[0][..16]);
    let addr = u64::from_le_bytes(short[8..16].try_into().unwrap()) + (100 << 24);
    short[8..16].copy_from_slice(&addr.to_le_bytes());
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (later, short, "it is 8192 bytes"),
        ("00000005.history".into(), Vec::new(), "names no parent"),
        (
            "00000006.history".into(),
            b"this is not a history\n".to_vec(),
            "not a valid timeline history",
        ),
        (
            format!("{}.00000028.backup", segments[0]),
            b"garbage".to_vec(),
            "not a valid backup history",
        ),
    ];
    let before = block_on(archive.keys());
    for (name, content, needle) in &cases {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        let out = archive.walden_output(&["wal-push", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{name}: {}", stderr(&out));
    }
    assert_eq!(
        block_on(archive.keys()),
        before,
        "a refused push stored something"
    );

    // Stored behind walden's back: verify names it with exit 2, not 1.
    block_on(async {
        let storage = archive.storage().await;
        let body = walden::object::Sealer::new(
            std::io::Cursor::new(b"garbage\n".to_vec()),
            walden::object::SealOptions::default(),
        );
        storage
            .create("wal/00000007.history.zst", Box::pin(body))
            .await
            .unwrap();
    });
    let out = archive.walden_output(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{}", stderr(&out));
    assert!(stdout.contains("00000007.history"), "{stdout}");
    drop(p);
}
