//! Base backups and point-in-time restore, exact to the transaction, against
//! real PostgreSQL 15 and a real S3-compatible server.
//!
//! A `ledger` table gets batches of rows, one transaction per batch, with
//! commit timestamps tracked by PostgreSQL itself; segment switches separate
//! some batches, not others; base backups are taken before and in the middle.
//! Every restore is started with plain `pg_ctl start` and checked batch by batch.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use walden_e2e::ledger::{
    batches_in, block_on, ok, restore_and_start, restore_into, rfc3339, Primary, LONG,
};
use walden_e2e::sys::{run_measured, wait_for};
use walden_e2e::{Archive, PgCluster, StorageKind, Workdir};

/// A time halfway between two commit timestamps, in RFC 3339.
fn between(pg: &PgCluster, a: &str, b: &str) -> String {
    rfc3339(
        pg,
        &format!("'{a}'::timestamptz + ('{b}'::timestamptz - '{a}'::timestamptz) / 2"),
    )
}

fn as_rfc3339(pg: &PgCluster, t: &str) -> String {
    rfc3339(pg, &format!("'{t}'::timestamptz"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn set(v: &[u32]) -> BTreeSet<u32> {
    v.iter().copied().collect()
}

fn backup_push(archive: &Archive, p: &Primary, extra: &[&str]) -> String {
    p.backup(archive, extra)["id"]
        .as_str()
        .expect("id in manifest")
        .to_string()
}

#[test]
fn point_in_time_restores_are_exact_to_the_transaction() {
    let work = Workdir::new("pitr");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    let backup_a = backup_push(&archive, &p, &[]);
    for b in 0..9u32 {
        p.commit_batch(b, "row");
        if b == 3 {
            p.pg.switch_wal();
        }
        if b == 4 {
            // A second backup in the middle of the history.
            let backup_b = backup_push(&archive, &p, &[]);
            assert_ne!(backup_b, backup_a);
        }
        if b == 6 {
            p.pg.sql("SELECT pg_create_restore_point('after-batch-6')");
        }
    }
    p.archive_everything();
    let ids = archive.backup_ids();
    assert_eq!(ids.len(), 2, "two backups listed: {ids:?}");
    let t = |i: usize| p.batches[i].commit_time.clone();

    // (name, restore arguments, batches expected)
    let mid_1_2 = between(&p.pg, &t(1), &t(2));
    let mid_5_6 = between(&p.pg, &t(5), &t(6)); // 5 and 6 share a segment
    let at_7 = as_rfc3339(&p.pg, &t(7));
    let cases: Vec<(&str, Vec<String>, BTreeSet<u32>)> = vec![
        (
            "time between batches 1 and 2 (first backup)",
            vec!["--target-time".into(), mid_1_2],
            set(&[0, 1]),
        ),
        (
            "time between batches 5 and 6, one segment",
            vec!["--target-time".into(), mid_5_6],
            set(&[0, 1, 2, 3, 4, 5]),
        ),
        (
            "time of batch 7's commit, inclusive",
            vec!["--target-time".into(), at_7.clone()],
            set(&[0, 1, 2, 3, 4, 5, 6, 7]),
        ),
        (
            "time of batch 7's commit, exclusive",
            vec!["--target-time".into(), at_7, "--target-exclusive".into()],
            set(&[0, 1, 2, 3, 4, 5, 6]),
        ),
        (
            "LSN after batch 2",
            vec!["--target-lsn".into(), p.batches[2].lsn_after.clone()],
            set(&[0, 1, 2]),
        ),
        (
            "LSN after batch 5",
            vec!["--target-lsn".into(), p.batches[5].lsn_after.clone()],
            set(&[0, 1, 2, 3, 4, 5]),
        ),
        (
            "named restore point",
            vec!["--target-name".into(), "after-batch-6".into()],
            set(&[0, 1, 2, 3, 4, 5, 6]),
        ),
        ("end of the archive", vec![], (0..9).collect()),
    ];
    for (i, (what, args, expected)) in cases.into_iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut restored = restore_and_start(&work, &archive, &p.pg, &format!("r{i}"), &args);
        assert_eq!(batches_in(&restored), expected, "{what}");
        restored.stop();
    }
}

#[test]
fn bad_restore_requests_fail_clearly_and_write_nothing() {
    let work = Workdir::new("badrestore");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.commit_batch(0, "row");
    let before_backup = as_rfc3339(&p.pg, &p.batches[0].commit_time);
    let id = backup_push(&archive, &p, &[]);
    p.commit_batch(1, "row");
    p.archive_everything();
    let keys_before = block_on(archive.keys());

    let nonempty = work.pg_dir("nonempty");
    std::fs::write(nonempty.join("precious"), "keep me").unwrap();
    let available = format!("available: {id}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--target-time".into(), before_backup],
            "no backup can reach",
        ),
        (
            vec!["--backup".into(), "20000101T000000Z".into()],
            &available,
        ),
        (
            vec!["--target-time".into(), "tomorrow at noon".into()],
            "not a time",
        ),
        (
            vec!["--target-time".into(), "2026-11-24 01:30:00".into()],
            "no time zone",
        ),
        (vec!["--target-lsn".into(), "0/zz".into()], "not an LSN"),
    ];
    for (i, (args, needle)) in cases.iter().enumerate() {
        let dest = work.pg_dir(&format!("bad{i}"));
        let mut full = vec!["restore", dest.to_str().unwrap()];
        full.extend(args.iter().map(String::as_str));
        let out = archive.walden_pg(&p.pg, &full).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: expected {needle:?} in {}",
            stderr(&out)
        );
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            0,
            "{args:?}: wrote into the destination"
        );
    }
    let out = archive
        .walden_pg(&p.pg, &["restore", nonempty.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is not empty"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(nonempty.join("precious")).unwrap(),
        "keep me"
    );
    assert_eq!(std::fs::read_dir(&nonempty).unwrap().count(), 1);
    // Two targets at once are refused by the command line itself.
    let dest = work.pg_dir("two-targets");
    let out = archive
        .walden_pg(
            &p.pg,
            &[
                "restore",
                dest.to_str().unwrap(),
                "--target-lsn",
                "0/1",
                "--target-name",
                "x",
            ],
        )
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(
        block_on(archive.keys()),
        keys_before,
        "a failed restore changed the archive"
    );
}

#[test]
fn corrupt_backup_part_fails_the_restore_and_leaves_nothing_startable() {
    let work = Workdir::new("corruptpart");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.commit_batch(0, "row");
    let id = backup_push(&archive, &p, &["--part-size-mb", "1"]);
    p.archive_everything();
    let parts: Vec<PathBuf> = std::fs::read_dir(archive.object_path(&format!("backups/{id}")))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("part-"))
        .collect();
    assert!(parts.len() > 1, "expected several parts, got {parts:?}");
    let victim = &parts[parts.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();
    let dest = work.pg_dir("restore");
    let out = archive
        .walden_pg(&p.pg, &["restore", dest.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert!(
        !dest.join("global/pg_control").exists(),
        "a failed restore left a startable directory"
    );
    assert_eq!(
        std::fs::read_dir(&dest).unwrap().count(),
        0,
        "a failed restore left files behind"
    );
}

#[test]
fn timelines_restore_exactly_on_either_side_of_a_promotion() {
    let work = Workdir::new("timelines");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    backup_push(&archive, &p, &[]);
    for b in 0..4 {
        p.commit_batch(b, "row");
    }
    p.archive_everything();
    let branch_at = between(&p.pg, &p.batches[1].commit_time, &p.batches[2].commit_time);
    let tl1_late = between(&p.pg, &p.batches[2].commit_time, &p.batches[3].commit_time);
    p.pg.stop();

    // Restore to a point on timeline 1, promote, and keep archiving into the same prefix.
    let restored = restore_into(
        &work,
        &archive,
        &p.pg,
        "fork",
        &["--target-time", &branch_at],
        true,
    );
    assert_eq!(batches_in(&restored), set(&[0, 1]));
    assert_eq!(
        restored.sql("SELECT timeline_id FROM pg_control_checkpoint()"),
        "2"
    );
    let mut fork = Primary {
        pg: restored,
        batches: Vec::new(),
    };
    for b in 100..103 {
        fork.commit_batch(b, "row");
    }
    fork.archive_everything();
    let keys = block_on(archive.keys());
    assert!(
        keys.iter().any(|k| k == "wal/00000002.history.zst"),
        "history file not archived: {keys:?}"
    );
    assert!(
        keys.iter().any(|k| k.starts_with("wal/00000002")
            && k.ends_with(".zst")
            && !k.contains("history")),
        "no timeline-2 WAL: {keys:?}"
    );
    let tl2_point = between(
        &fork.pg,
        &fork.batches[1].commit_time,
        &fork.batches[2].commit_time,
    );
    let mut fork_pg = fork.pg;
    fork_pg.stop();

    let mut on_tl2 = restore_and_start(
        &work,
        &archive,
        &fork_pg,
        "on-tl2",
        &["--target-time", &tl2_point],
    );
    assert_eq!(
        batches_in(&on_tl2),
        set(&[0, 1, 100, 101]),
        "restore to a point on timeline 2"
    );
    on_tl2.stop();
    let mut on_tl1 = restore_and_start(
        &work,
        &archive,
        &fork_pg,
        "on-tl1",
        &["--target-time", &tl1_late, "--target-timeline", "1"],
    );
    assert_eq!(
        batches_in(&on_tl1),
        set(&[0, 1, 2]),
        "restore to a point on timeline 1 after the branch"
    );
    on_tl1.stop();
}

#[test]
fn killed_backup_is_never_listed_and_does_not_disturb_archiving() {
    let work = Workdir::new("killbackup");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.pg.pgbench(&["-i", "-s", "5", "-q"]);
    let first = backup_push(&archive, &p, &[]);
    let (archived_before, failed_before) = p.pg.archiver_counts();

    let mut child = archive
        .walden_pg(
            &p.pg,
            &["backup-push", "--part-size-mb", "1", "--parallelism", "1"],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once it has stored some parts but cannot have finished (it has ~80 parts to go).
    let parts_dir = archive.dir.join("backups");
    wait_for("the killed backup to store a part", LONG, || {
        let ids = std::fs::read_dir(&parts_dir).ok()?;
        ids.flatten()
            .filter(|e| e.file_name().to_string_lossy() != first)
            .any(|e| {
                std::fs::read_dir(e.path())
                    .map(|d| d.count() > 1)
                    .unwrap_or(false)
            })
            .then_some(())
    });
    child.kill().unwrap();
    child.wait().unwrap();

    assert_eq!(
        archive.backup_ids(),
        vec![first.clone()],
        "a killed backup was listed"
    );
    p.commit_batch(0, "row");
    p.archive_everything();
    let (archived_after, failed_after) = p.pg.archiver_counts();
    assert!(archived_after > archived_before);
    assert_eq!(
        failed_after, failed_before,
        "archiving failed after the killed backup"
    );
    let second = backup_push(&archive, &p, &[]);
    assert_eq!(archive.backup_ids(), vec![first, second]);
}

/// Peak memory of backup-push and restore, on a database with many small
/// files and on a larger one: bounded by fixed buffers, not by data size or
/// file count. The figures are printed for the record; the bound is generous.
#[test]
fn backup_and_restore_memory_stays_bounded() {
    let work = Workdir::new("memory");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let pg = Primary::start(&work, &archive, "primary").pg;
    let mut figures = Vec::new();
    let measure = |label: &str, figures: &mut Vec<String>| {
        let mut cmd = archive.walden_pg(&pg, &["backup-push"]);
        let (out, backup_kib) = run_measured(&mut cmd);
        ok(out, "backup-push");
        let dest = work.pg_dir(&format!("restore-{label}"));
        let mut cmd = archive.walden_pg(&pg, &["restore", dest.to_str().unwrap()]);
        let (out, restore_kib) = run_measured(&mut cmd);
        ok(out, "restore");
        let size = dir_size(&dest);
        let files = count_files(&dest);
        figures.push(format!(
            "{label}: {files} files, {} MiB: backup-push peak {} MiB, restore peak {} MiB",
            size >> 20,
            backup_kib / 1024,
            restore_kib / 1024
        ));
        for kib in [backup_kib, restore_kib] {
            assert!(kib < 256 * 1024, "{label}: peak RSS {kib} KiB");
        }
        std::fs::remove_dir_all(&dest).unwrap();
    };
    pg.sql("DO $$ BEGIN FOR i IN 1..3000 LOOP EXECUTE format('CREATE TABLE small_%s (id int PRIMARY KEY, v text)', i); END LOOP; END $$");
    measure("many small files", &mut figures);
    pg.pgbench(&["-i", "-s", "20", "-q"]);
    measure("larger database", &mut figures);
    eprintln!("memory figures:\n  {}", figures.join("\n  "));
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn count_files(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|d| {
            d.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => count_files(&e.path()),
                    _ => 1,
                })
                .sum()
        })
        .unwrap_or(0)
}
