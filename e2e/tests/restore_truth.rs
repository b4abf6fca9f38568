//! Restores that must never stop short: inherited recovery settings, restore
//! points older than the newest backup, damaged manifests and bad input.
//! Every case is replayed by real PostgreSQL 15 and checked row by row.

use std::collections::BTreeSet;

use std::time::Duration;
use walden_e2e::ledger::{batches_in, ok, restore_and_start, restore_fork, rfc3339, Primary, LONG};

use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, StorageKind, Workdir};

fn set(v: &[u32]) -> BTreeSet<u32> {
    v.iter().copied().collect()
}

/// A time halfway between two commit timestamps, in RFC 3339.
fn between(p: &Primary, a: usize, b: usize) -> String {
    let (a, b) = (&p.batches[a].commit_time, &p.batches[b].commit_time);
    rfc3339(
        &p.pg,
        &format!("'{a}'::timestamptz + ('{b}'::timestamptz - '{a}'::timestamptz) / 2"),
    )
}

/// Issue 12 item 1: fork at a target → promote → protect the fork in a new
/// prefix → write → backup → write → restore that prefix to its end. The
/// backup carries the fork's old `recovery_target_*` in postgresql.auto.conf;
/// the last restore must still replay every row.
#[test]
fn a_protected_fork_restores_to_its_end_whatever_target_made_it() {
    let work = Workdir::new("forkcycle");
    let source = Archive::new(StorageKind::File, work.path(), "source");
    let mut p = Primary::start(&work, &source, "primary");
    p.backup(&source, &[]);
    for b in 0..5u32 {
        p.commit_batch(b, "row");
        if b == 2 {
            p.pg.sql("SELECT pg_create_restore_point('after-batch-2')");
        }
    }
    p.archive_everything();

    let targets: Vec<(&str, Vec<String>)> = vec![
        ("time", vec!["--target-time".into(), between(&p, 2, 3)]),
        (
            "lsn",
            vec!["--target-lsn".into(), p.batches[2].lsn_after.clone()],
        ),
        ("name", vec!["--target-name".into(), "after-batch-2".into()]),
    ];
    for (kind, args) in targets {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let prefix = Archive::new(StorageKind::File, work.path(), &format!("fork-{kind}"));
        let (fork, _) = restore_fork(
            &work,
            &source,
            &p.pg,
            &format!("fork-{kind}"),
            &args,
            &prefix,
        );
        assert_eq!(
            batches_in(&fork),
            set(&[0, 1, 2]),
            "{kind}: the fork itself"
        );

        let mut fork = Primary {
            pg: fork,
            batches: Vec::new(),
        };
        fork.commit_batch(10, "fork");
        fork.commit_batch(11, "fork");
        fork.backup(&prefix, &[]);
        fork.commit_batch(12, "fork");
        fork.commit_batch(13, "fork");
        fork.archive_everything();

        let dest = work.pg_dir(&format!("again-{kind}"));
        let out = ok(
            prefix
                .walden_pg(&fork.pg, &["restore", dest.to_str().expect("utf-8")])
                .output()
                .expect("restore"),
            "restore of the fork's prefix",
        );
        let auto = std::fs::read_to_string(dest.join("postgresql.auto.conf")).expect("auto.conf");
        let restored = restore_started(&work, &prefix, dest);
        assert_eq!(
            batches_in(&restored),
            set(&[0, 1, 2, 10, 11, 12, 13]),
            "{kind}: every row of the fork; postgresql.auto.conf:\n{auto}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("removed from the backup") && stderr.contains("recovery_target_"),
            "{kind}: the restore names the inherited target it removed:\n{stderr}"
        );
    }
}

/// Starts a restored directory with archiving off and waits for promotion.
fn restore_started(
    work: &Workdir,
    archive: &Archive,
    dest: std::path::PathBuf,
) -> walden_e2e::PgCluster {
    let mut pg = walden_e2e::PgCluster::adopt(work.path(), dest);
    pg.set(&[("archive_mode", "off".into())]);
    pg.with_env(archive.env()).start();
    pg.wait_promoted(LONG);
    pg
}

/// Item 1, the other half: `postgresql.conf` itself names a target (an
/// operator's leftover); a restore to the end of the archive overrides it.
#[test]
fn a_target_left_in_postgresql_conf_does_not_stop_a_restore_to_the_end() {
    let work = Workdir::new("confleft");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.commit_batch(0, "row");
    p.pg.sql("SELECT pg_create_restore_point('early')");
    p.commit_batch(1, "row");
    p.pg.set(&[("recovery_target_name", "'early'".into())]);
    p.backup(&archive, &[]);
    p.commit_batch(2, "row");
    p.commit_batch(3, "row");
    p.archive_everything();
    let restored = restore_and_start(&work, &archive, &p.pg, "restored", &[]);
    assert_eq!(batches_in(&restored), set(&[0, 1, 2, 3]));
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Item 13: a restore point made before the newest backup started. The
/// newest backup cannot reach it (PostgreSQL: "recovery ended before
/// configured recovery target was reached"); the oldest backup can.
#[test]
fn a_restore_point_older_than_the_newest_backup_is_reached() {
    let work = Workdir::new("rpold");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.backup(&archive, &[]);
    p.commit_batch(0, "row");
    p.commit_batch(1, "row");
    p.pg.sql("SELECT pg_create_restore_point('before-batch-2')");
    p.commit_batch(2, "row");
    p.backup(&archive, &[]);
    p.commit_batch(3, "row");
    p.archive_everything();
    let restored = restore_and_start(
        &work,
        &archive,
        &p.pg,
        "restored",
        &["--target-name", "before-batch-2"],
    );
    assert_eq!(batches_in(&restored), set(&[0, 1]));
}

/// Item 17: one truncated backup.json damages only its own backup: it is
/// listed as damaged, verify exits 2 naming it, retention keeps it, and a
/// restore uses the other backup.
#[test]
fn a_damaged_manifest_affects_only_its_backup() {
    let work = Workdir::new("damaged");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    let good = p.backup(&archive, &[])["id"].as_str().unwrap().to_string();
    p.commit_batch(0, "row");
    let bad = p.backup(&archive, &[])["id"].as_str().unwrap().to_string();
    p.commit_batch(1, "row");
    p.archive_everything();
    let manifest = archive.object_path(&format!("backups/{bad}/backup.json"));
    let text = std::fs::read(&manifest).unwrap();
    std::fs::remove_file(&manifest).unwrap();
    std::fs::write(&manifest, &text[..text.len() / 2]).unwrap();

    let out = ok(
        archive.walden_output(&["backup-list", "--json"]),
        "backup-list",
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["backups"][0]["id"], good.as_str());
    assert_eq!(list["damaged"][0]["id"], bad.as_str(), "{list}");
    let out = ok(archive.walden_output(&["backup-list"]), "backup-list");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("DAMAGED backup {bad}")));

    let out = archive.walden_output(&["verify"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}{}", stderr(&out));
    assert!(
        stdout.contains(&format!("backups/{bad}/backup.json")),
        "{stdout}"
    );

    let bad_keys = |a: &Archive| {
        walden_e2e::ledger::block_on(a.keys())
            .into_iter()
            .filter(|k| k.starts_with(&format!("backups/{bad}/")))
            .count()
    };
    let before = bad_keys(&archive);
    let out = ok(archive.walden_output(&["retain", "--full", "1"]), "retain");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("damaged backup folder {bad}")),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        bad_keys(&archive),
        before,
        "retention deleted the damaged backup"
    );

    let restored = restore_and_start(&work, &archive, &p.pg, "restored", &[]);
    assert_eq!(batches_in(&restored), set(&[0, 1]));
}

/// Item 18: bad input gets a clear, specific error before anything is
/// written; OS errors are printed once; long values are not echoed whole.
#[test]
fn bad_input_gets_one_clear_error_and_writes_nothing() {
    let work = Workdir::new("messages");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.backup(&archive, &[]);
    p.commit_batch(0, "row");
    p.archive_everything();
    let long = "n".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--target-name", "two\nlines"], "control character"),
        (vec!["--target-name", &long], "longer than 63 bytes"),
        (
            vec!["--target-timeline", "abc"],
            "not latest, current or a timeline number",
        ),
        (
            vec!["--target-timeline", "0"],
            "not latest, current or a timeline number",
        ),
        (
            vec!["--target-time", "2099-01-01T00:00:00Z"],
            "after the end of the archive",
        ),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let dest = work.pg_dir(&format!("bad{i}"));
        let mut full = vec!["restore", dest.to_str().unwrap()];
        full.extend(args.iter().copied());
        let out = archive.walden_pg(&p.pg, &full).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in {err}"
        );
        assert!(
            err.len() < 1000,
            "{args:?}: the message echoes too much: {} bytes",
            err.len()
        );
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            0,
            "{args:?} wrote"
        );
    }

    let out = archive.walden_output(&["wal-fetch", &long, "/tmp/never-written"]);
    assert_eq!(out.status.code(), Some(254));
    assert!(stderr(&out).len() < 1000, "{} bytes", stderr(&out).len());

    // A mistyped URL is not an empty archive.
    let typo = format!("file://{}/no-such-archive", work.path().display());
    for args in [vec!["backup-list"], vec!["restore", "/tmp/never-restored"]] {
        let out = archive
            .walden(&args)
            .env("WALDEN_STORAGE", &typo)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("no Walden repository at"),
            "{args:?}: {}",
            stderr(&out)
        );
    }

    // An OS error is printed once.
    let file = work.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = archive.walden_output(&["restore", file.to_str().unwrap()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}

/// Item 18: an encrypted restore writes a restore_command that carries the
/// key file setting, so the restored server needs nothing else to replay.
#[test]
fn an_encrypted_restore_starts_without_extra_settings() {
    let work = Workdir::new("encrestore");
    let mut archive = Archive::new(StorageKind::File, work.path(), "db");
    let key = work.path().join("walden.key");
    std::fs::write(&key, walden::crypt::Keyring::generate_key_file()).unwrap();
    walden_e2e::sys::chown_pg(&key);
    archive.extra_env.push((
        "WALDEN_ENCRYPTION_KEY_FILE".into(),
        key.display().to_string(),
    ));
    let mut p = Primary::start(&work, &archive, "primary");
    p.backup(&archive, &[]);
    p.commit_batch(0, "row");
    p.commit_batch(1, "row");
    p.archive_everything();
    let dest = work.pg_dir("restored");
    let out = ok(
        archive
            .walden_pg(&p.pg, &["restore", dest.to_str().unwrap()])
            .output()
            .unwrap(),
        "restore",
    );
    let mut pg = walden_e2e::PgCluster::adopt(work.path(), dest);
    pg.set(&[("archive_mode", "off".into())]);
    // Only what a plain server has: no walden settings in its environment.
    let _ = pg.with_env(Vec::new()).try_start(Duration::from_secs(60));
    wait_for("recovery to end", LONG, || {
        (pg.try_sql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f") || !pg.is_running())
            .then_some(())
    });
    assert!(pg.is_running(), "recovery failed:\n{}", pg.log_text());
    assert_eq!(batches_in(&pg), set(&[0, 1]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("encryption key"),
        "the hint names the key: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
