//! Issue 12, items 4, 14 and 16: a running backup is never taken for an
//! abandoned one, `backup-push` never writes `backup.json` for parts that are
//! gone, refuses a stale copy of the data directory, and what failed or
//! interrupted writes leave behind is cleaned up. Every restore is proven by
//! its rows.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use walden_e2e::ledger::{batches_in, block_on, ok, restore_and_start, Primary, LONG};
use walden_e2e::sys::{chown_pg, wait_for};
use walden_e2e::{walden_bin, Archive, StorageKind, Workdir};

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Backup folders in the archive (with or without backup.json).
fn folders(archive: &Archive) -> Vec<String> {
    let mut v: Vec<String> = block_on(archive.keys())
        .iter()
        .filter_map(|k| k.strip_prefix("backups/")?.split_once('/'))
        .map(|(id, _)| id.to_string())
        .collect();
    v.dedup();
    v
}

/// Makes the primary's archive_command fail while `gate` exists, so that a
/// backup waits for its last WAL segment for as long as the test wants.
fn gate_archiving(primary: &Primary, gate: &Path) {
    primary.pg.set(&[(
        "archive_command",
        format!(
            "'test ! -e {} && {} wal-push %p'",
            gate.display(),
            walden_bin().display()
        ),
    )]);
    primary.pg.sql("SELECT pg_reload_conf()");
}

/// Removes the gate and commits `batch`: the new WAL wakes PostgreSQL's
/// archiver at once (after failures it otherwise waits up to a minute).
fn open_gate(primary: &mut Primary, gate: &Path, batch: u32) {
    std::fs::remove_file(gate).expect("open the gate");
    primary.commit_batch(batch, "after the gate opened");
    primary.archive_everything();
}

/// `.backup` history files in pg_wal: pg_backup_stop writes one (and removes
/// archived older ones).
fn backup_history_files(primary: &Primary) -> Vec<String> {
    std::fs::read_dir(primary.pg.data.join("pg_wal"))
        .expect("pg_wal")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".backup"))
        .collect()
}

/// Starts `backup-push` and returns once it has stopped the backup (all its
/// parts are stored) and waits for its WAL, which the closed gate holds back.
fn start_waiting_backup(work: &Workdir, archive: &Archive, primary: &Primary, name: &str) -> Child {
    let before = backup_history_files(primary);
    let log = std::fs::File::create(work.path().join(format!("{name}.log"))).expect("log");
    let child = archive
        .walden_pg(&primary.pg, &["backup-push", "--json", "--wal-wait", "600"])
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn backup-push");
    wait_for(
        &format!("backup {name} to stop and wait for its WAL"),
        LONG,
        || {
            backup_history_files(primary)
                .iter()
                .any(|n| !before.contains(n))
                .then_some(())
        },
    );
    child
}

#[test]
fn retention_never_deletes_a_running_backup_and_a_backup_never_lists_missing_parts() {
    let work = Workdir::new("backup-lease");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut primary = Primary::start(&work, &archive, "primary");
    let gate = work.path().join("gate");
    gate_archiving(&primary, &gate);
    for b in 1..=3 {
        primary.commit_batch(b, "before the backups");
    }
    primary.archive_everything();

    // A: a CLI backup-push that has stored its parts and waits for its WAL.
    std::fs::write(&gate, b"closed").expect("gate");
    let a = start_waiting_backup(&work, &archive, &primary, "a");
    let a_folder = folders(&archive);
    assert_eq!(a_folder.len(), 1, "{a_folder:?}");
    let a_id = a_folder[0].clone();
    // B: an overlapping backup (the daemon's, say) finishes first.
    let b = primary.backup(&archive, &["--no-archive-check"]);
    assert_ne!(b["id"].as_str(), Some(a_id.as_str()));
    // Retention, as the daemon runs it after each backup.
    let plan = json(&ok(
        archive.walden_output(&["retain", "--full", "1", "--json"]),
        "retain",
    ));
    let a_parts: Vec<String> = block_on(archive.keys())
        .into_iter()
        .filter(|k| k.starts_with(&format!("backups/{a_id}/part-")))
        .collect();
    assert!(
        !a_parts.is_empty(),
        "retention deleted the parts of the running backup {a_id}: {plan}"
    );
    assert!(
        plan["inProgressBackups"]
            .as_array()
            .is_some_and(|v| v.iter().any(|i| i == a_id.as_str())),
        "{plan}"
    );

    // The gate opens: A completes, and restoring it to the end gives every row.
    open_gate(&mut primary, &gate, 4);
    let a_out = a.wait_with_output().expect("wait for A");
    let a_manifest = json(&ok(a_out, "backup A"));
    assert_eq!(a_manifest["id"], a_id.as_str());
    let restored = restore_and_start(
        &work,
        &archive,
        &primary.pg,
        "restored-a",
        &["--backup", &a_id],
    );
    assert_eq!(batches_in(&restored), (1..=4).collect());
    drop(restored);

    // C: a part disappears while C waits (whoever deleted it): C must fail
    // loudly and never write backup.json.
    std::fs::write(&gate, b"closed").expect("gate");
    let before = folders(&archive);
    let c = start_waiting_backup(&work, &archive, &primary, "c");
    let c_id = folders(&archive)
        .into_iter()
        .find(|f| !before.contains(f))
        .expect("C's folder");
    let part = archive.object_path(&format!("backups/{c_id}/part-00001.tar.zst"));
    std::fs::remove_file(&part).expect("delete one of C's parts");
    open_gate(&mut primary, &gate, 5);
    let c_out = c.wait_with_output().expect("wait for C");
    let c_err = std::fs::read_to_string(work.path().join("c.log")).unwrap_or_default();
    assert!(
        !c_out.status.success(),
        "backup-push C succeeded with a part missing:\n{}",
        String::from_utf8_lossy(&c_out.stdout)
    );
    assert!(c_err.contains("part-00001.tar.zst"), "{c_err}");
    assert!(
        !archive.backup_ids().contains(&c_id),
        "{:?}",
        archive.backup_ids()
    );
    assert!(
        !archive
            .object_path(&format!("backups/{c_id}/backup.json"))
            .exists(),
        "backup.json written for a backup whose part is gone"
    );
}

#[test]
fn backup_push_refuses_a_stale_copy_of_the_data_directory() {
    let work = Workdir::new("stale-copy");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut primary = Primary::start(&work, &archive, "primary");
    primary.commit_batch(1, "before the copy");
    primary.archive_everything();
    primary.pg.stop();
    let copy = work.path().join("stale-copy");
    ok(
        Command::new("cp")
            .arg("-a")
            .arg(&primary.pg.data)
            .arg(&copy)
            .output()
            .expect("cp"),
        "cp -a",
    );
    primary.pg.start();
    primary.commit_batch(2, "after the copy");
    primary.archive_everything();

    let out = archive
        .walden_pg(
            &primary.pg,
            &["backup-push", "--pgdata", copy.to_str().expect("utf-8")],
        )
        .output()
        .expect("backup-push");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "backup-push of a stale copy succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("is not the data directory of the server"),
        "{err}"
    );
    assert!(archive.backup_ids().is_empty());
    assert!(folders(&archive).is_empty(), "{:?}", folders(&archive));

    // The live directory still backs up, and restores with every row.
    let m = primary.backup(&archive, &[]);
    let id = m["id"].as_str().expect("id").to_string();
    primary.commit_batch(3, "after the backup");
    primary.archive_everything();
    let restored = restore_and_start(&work, &archive, &primary.pg, "restored", &["--backup", &id]);
    assert_eq!(batches_in(&restored), (1..=3).collect());
}

/// Sets a file's modification time `ago` into the past (storage time, as listings report it).
fn age(path: &Path, ago: Duration) {
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.set_modified(SystemTime::now() - ago).expect("set mtime");
}

#[test]
fn failed_and_interrupted_writes_leave_nothing_behind() {
    let work = Workdir::new("leftovers");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut primary = Primary::start(&work, &archive, "primary");
    primary.commit_batch(1, "first");
    primary.archive_everything();

    // A backup that fails (a file it cannot read) deletes what it stored.
    let unreadable = primary.pg.data.join("walden-test-unreadable");
    std::fs::write(&unreadable, vec![7u8; 1 << 20]).expect("write");
    std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    let out = archive
        .walden_pg(&primary.pg, &["backup-push", "--part-size-mb", "1"])
        .output()
        .expect("backup-push");
    std::fs::remove_file(&unreadable).expect("rm");
    assert!(!out.status.success(), "backup-push read a file mode 000");
    assert!(
        folders(&archive).is_empty(),
        "a failed backup left {:?}",
        block_on(archive.keys())
    );

    let m = primary.backup(&archive, &[]);
    let kept = m["id"].as_str().expect("id").to_string();

    // A backup killed mid-way leaves its folder; so does a killed upload its
    // temporary file. Once they are older than the grace period, retention
    // removes them; younger ones stay (they may still be written).
    let gate = work.path().join("gate");
    gate_archiving(&primary, &gate);
    std::fs::write(&gate, b"closed").expect("gate");
    let mut killed = start_waiting_backup(&work, &archive, &primary, "killed");
    killed.kill().expect("kill");
    let _ = killed.wait();
    open_gate(&mut primary, &gate, 2);
    let killed_id = folders(&archive)
        .into_iter()
        .find(|f| *f != kept)
        .expect("the killed backup's folder");
    for o in std::fs::read_dir(archive.object_path(&format!("backups/{killed_id}"))).expect("ls") {
        age(&o.expect("entry").path(), Duration::from_secs(3600));
    }
    let wal_dir = std::fs::read_dir(archive.dir.join("wal"))
        .expect("wal")
        .filter_map(|e| e.ok())
        .find(|e| e.path().is_dir())
        .expect("a WAL folder")
        .path();
    let stale_tmp = wal_dir.join(".walden-tmp-000000010000000000000099.zst.1.2");
    let fresh_tmp = wal_dir.join(".walden-tmp-000000010000000000000098.zst.3.4");
    std::fs::write(&stale_tmp, b"half an upload").expect("tmp");
    std::fs::write(&fresh_tmp, b"an upload in flight").expect("tmp");
    chown_pg(&stale_tmp);
    age(&stale_tmp, Duration::from_secs(3600));

    let plan = json(&ok(
        archive.walden_output(&["retain", "--full", "1", "--json"]),
        "retain",
    ));
    assert_eq!(
        plan["abandonedBackups"],
        serde_json::json!([killed_id]),
        "{plan}"
    );
    assert!(!stale_tmp.exists(), "a stale temporary was left: {plan}");
    assert!(fresh_tmp.exists(), "a fresh temporary was removed");
    assert_eq!(folders(&archive), std::slice::from_ref(&kept));
    primary.commit_batch(3, "after the cleanup");
    primary.archive_everything();
    let restored = restore_and_start(
        &work,
        &archive,
        &primary.pg,
        "restored",
        &["--backup", &kept],
    );
    assert_eq!(batches_in(&restored), (1..=3).collect());
}

/// s3s-fs answers 501 to ListMultipartUploads: retention says so and carries on.
#[test]
fn retention_carries_on_where_multipart_uploads_cannot_be_listed() {
    let work = Workdir::new("leftovers-s3");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut primary = Primary::start(&work, &archive, "primary");
    primary.commit_batch(1, "first");
    primary.archive_everything();
    primary.backup(&archive, &[]);
    let out = ok(
        archive.walden_output(&["retain", "--full", "1"]),
        "retain on S3",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot list leftovers of interrupted writes"),
        "{err}"
    );
    assert_eq!(archive.backup_ids().len(), 1);
}
