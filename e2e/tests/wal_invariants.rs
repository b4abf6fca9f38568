//! The safety invariants of `wal-push` / `wal-fetch`, each proven by injecting
//! its fault, on real WAL segments made by `initdb` and a real S3 server.

use std::path::{Path, PathBuf};
use std::process::Output;

use walden_e2e::ledger::block_on;
use walden_e2e::sys::{as_pg, pg_bin, run, BUCKET};
use walden_e2e::{Archive, StorageKind, Workdir};

const SEG1: &str = "000000010000000000000001";

/// A fresh cluster's first WAL segment: a real segment with its own system identifier.
fn real_segment(work: &Workdir, name: &str) -> PathBuf {
    let data = work.pg_dir(name);
    run(as_pg(pg_bin("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--no-sync"]));
    data.join("pg_wal").join(SEG1)
}

/// A copy of `src` under `<work>/<dir>/<name>` with one byte changed at `flip` (if any).
fn copy_as(work: &Workdir, src: &Path, dir: &str, name: &str, flip: Option<usize>) -> PathBuf {
    let d = work.path().join(dir);
    std::fs::create_dir_all(&d).expect("mkdir");
    let mut bytes = std::fs::read(src).expect("read segment");
    if let Some(at) = flip {
        bytes[at] ^= 0xFF;
    }
    let p = d.join(name);
    std::fs::write(&p, bytes).expect("write copy");
    p
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn push(archive: &Archive, path: &Path) -> Output {
    archive.walden_output(&["wal-push", path.to_str().expect("utf-8")])
}

fn fetch(archive: &Archive, name: &str, dest: &Path) -> Output {
    archive.walden_output(&["wal-fetch", name, dest.to_str().expect("utf-8")])
}

fn assert_ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        stderr(o)
    );
}

fn wal_keys(archive: &Archive) -> Vec<String> {
    block_on(archive.keys())
        .into_iter()
        .filter(|k| k.starts_with("wal/"))
        .collect()
}

/// Fetches `name` and returns its bytes.
fn fetched(archive: &Archive, work: &Workdir, name: &str) -> Vec<u8> {
    let dest = work
        .path()
        .join(format!("fetched-{name}-{}", fastrand_suffix()));
    assert_ok(&fetch(archive, name, &dest), "wal-fetch");
    std::fs::read(&dest).expect("read fetched")
}

fn fastrand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

const KINDS: [StorageKind; 2] = [StorageKind::File, StorageKind::S3];

/// Invariant 3: a segment of another database is refused; the archive is untouched.
#[test]
fn segment_of_another_database_is_refused() {
    let work = Workdir::new("sysid");
    let a = real_segment(&work, "a");
    let b = real_segment(&work, "b");
    for kind in KINDS {
        let archive = Archive::new(kind, work.path(), &format!("sysid-{kind:?}").to_lowercase());
        assert_ok(&push(&archive, &a), "push of the first database");
        let out = push(&archive, &b);
        assert_eq!(code(&out), 1, "{kind:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("system identifier") && err.contains("must never share a prefix"),
            "{kind:?}: {err}"
        );
        assert_eq!(
            fetched(&archive, &work, SEG1),
            std::fs::read(&a).unwrap(),
            "{kind:?}: archive changed"
        );
    }
}

/// Invariant 2: identical re-push succeeds; different content under the same name fails loudly.
#[test]
fn identical_repush_succeeds_and_conflicting_repush_fails() {
    let work = Workdir::new("repush");
    let a = real_segment(&work, "a");
    let conflicting = copy_as(&work, &a, "other", SEG1, Some(1 << 20));
    for kind in KINDS {
        let archive = Archive::new(
            kind,
            work.path(),
            &format!("repush-{kind:?}").to_lowercase(),
        );
        assert_ok(&push(&archive, &a), "first push");
        let again = push(&archive, &a);
        assert_ok(&again, "identical re-push");
        assert!(
            stderr(&again).contains("AlreadyArchived"),
            "{}",
            stderr(&again)
        );
        let out = push(&archive, &conflicting);
        assert_eq!(
            code(&out),
            1,
            "{kind:?}: conflicting re-push must fail: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("refusing to overwrite") && err.contains("different content"),
            "{err}"
        );
        assert_eq!(
            fetched(&archive, &work, SEG1),
            std::fs::read(&a).unwrap(),
            "{kind:?}: archive was overwritten"
        );
    }
}

/// Invariant 2 under a race: writers of two contents at once leave exactly one
/// content stored, and only its writers succeed.
#[test]
fn concurrent_conflicting_writers_leave_one_winner() {
    let work = Workdir::new("race");
    let a = real_segment(&work, "a");
    let b = copy_as(&work, &a, "other", SEG1, Some(1 << 20));
    for round in 0..3 {
        let archive = Archive::new(StorageKind::File, work.path(), &format!("race{round}"));
        let children: Vec<_> = (0..8)
            .map(|i| {
                let path = if i % 2 == 0 { &a } else { &b };
                (
                    i % 2,
                    archive
                        .walden(&["wal-push", path.to_str().unwrap()])
                        .spawn()
                        .expect("spawn"),
                )
            })
            .collect();
        let results: Vec<(usize, bool)> = children
            .into_iter()
            .map(|(v, c)| (v, c.wait_with_output().expect("wait").status.success()))
            .collect();
        let stored = fetched(&archive, &work, SEG1);
        let winner = if stored == std::fs::read(&a).unwrap() {
            0
        } else {
            1
        };
        assert_eq!(
            stored,
            std::fs::read(if winner == 0 { &a } else { &b }).unwrap()
        );
        for (variant, ok) in results {
            assert_eq!(
                ok,
                variant == winner,
                "round {round}: variant {variant} push success={ok}, winner {winner}"
            );
        }
    }
}

/// Every byte read back is verified: a corrupt object is an error and `<dest>` is never written.
#[test]
fn corrupt_object_is_detected_and_dest_is_never_written() {
    let work = Workdir::new("corrupt");
    let a = real_segment(&work, "a");
    for kind in KINDS {
        let archive = Archive::new(
            kind,
            work.path(),
            &format!("corrupt-{kind:?}").to_lowercase(),
        );
        assert_ok(&push(&archive, &a), "push");
        let object = archive.object_path(&format!("wal/0000000100000000/{SEG1}.zst"));
        let original = std::fs::read(&object).expect("stored object");
        let dest_dir = work.path().join(format!("dest-{kind:?}"));
        std::fs::create_dir_all(&dest_dir).unwrap();
        let damaged: Vec<(&str, Vec<u8>)> = vec![
            ("flipped byte", {
                let mut b = original.clone();
                b[original.len() / 2] ^= 0x01;
                b
            }),
            ("truncated", original[..original.len() - 100].to_vec()),
            ("checksum trailer damaged", {
                let mut b = original.clone();
                let n = b.len();
                b[n - 5] ^= 0x80;
                b
            }),
        ];
        for (what, bytes) in damaged {
            std::fs::write(&object, &bytes).unwrap();
            let dest = dest_dir.join("RECOVERYXLOG");
            let out = fetch(&archive, SEG1, &dest);
            assert_eq!(code(&out), 254, "{kind:?} {what}: {}", stderr(&out));
            assert!(
                stderr(&out).contains("corrupt"),
                "{kind:?} {what}: {}",
                stderr(&out)
            );
            assert!(
                !dest.exists(),
                "{kind:?} {what}: dest written from a corrupt object"
            );
            let leftovers: Vec<_> = std::fs::read_dir(&dest_dir).unwrap().collect();
            assert!(
                leftovers.is_empty(),
                "{kind:?} {what}: temporary files left: {leftovers:?}"
            );
        }
        std::fs::write(&object, &original).unwrap();
        assert_eq!(fetched(&archive, &work, SEG1), std::fs::read(&a).unwrap());
    }
}

/// Invariant 4: exit 1 only when the file is definitively absent.
#[test]
fn absent_files_exit_1_and_a_missing_repository_is_an_error() {
    let work = Workdir::new("absent");
    let a = real_segment(&work, "a");
    for kind in KINDS {
        let archive = Archive::new(
            kind,
            work.path(),
            &format!("absent-{kind:?}").to_lowercase(),
        );
        assert_ok(&push(&archive, &a), "push");
        for name in [
            "000000010000000000000002",
            "00000002.history",
            "000000020000000000000001",
        ] {
            let dest = work.path().join(format!("absent-{kind:?}-{name}"));
            let out = fetch(&archive, name, &dest);
            assert_eq!(code(&out), 1, "{kind:?} {name}: {}", stderr(&out));
            assert!(!dest.exists());
        }
        // A prefix with no repository at all is a configuration error, not "absent".
        let mut wrong =
            archive.walden(&["wal-fetch", SEG1, work.path().join("x").to_str().unwrap()]);
        let wrong_url = match kind {
            StorageKind::File => format!("file://{}/nothing-here", work.path().display()),
            StorageKind::S3 => format!("s3://{BUCKET}/no-such-prefix"),
        };
        let out = wrong.env("WALDEN_STORAGE", wrong_url).output().unwrap();
        assert_eq!(code(&out), 254, "{kind:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("no Walden repository"),
            "{}",
            stderr(&out)
        );
    }
}

/// Invariant 4: storage errors are retried, then reported above 125 — never as "absent".
#[test]
fn storage_errors_during_fetch_exit_above_125() {
    let work = Workdir::new("fetch-errors");
    let a = real_segment(&work, "a");
    let mut archive = Archive::new(StorageKind::S3, work.path(), "db");
    assert_ok(&push(&archive, &a), "push");
    let dest = work.path().join("RECOVERYXLOG");

    archive.proxy().fail_with_503();
    let out = fetch(&archive, SEG1, &dest);
    assert_eq!(code(&out), 254, "HTTP 503: {}", stderr(&out));
    assert!(
        stderr(&out).contains("retrying"),
        "503 was not retried: {}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("503"), "{}", stderr(&out));

    archive.proxy().drop_connections();
    let out = fetch(&archive, SEG1, &dest);
    assert_eq!(code(&out), 254, "dropped connections: {}", stderr(&out));

    archive.proxy().pass();
    archive.s3.as_mut().unwrap().stop();
    let out = fetch(&archive, SEG1, &dest);
    assert_eq!(code(&out), 254, "server down: {}", stderr(&out));
    assert!(!dest.exists());
    archive.s3.as_mut().unwrap().restart();

    let out = archive
        .walden(&["wal-fetch", SEG1, dest.to_str().unwrap()])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    assert_eq!(code(&out), 254, "wrong credentials: {}", stderr(&out));
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("retrying"),
        "a 403 is not transient: {}",
        stderr(&out)
    );

    for (var, value, needle) in [
        ("WALDEN_STORAGE", "", "no storage configured"),
        ("WALDEN_STORAGE", "ftp://x/y", "scheme"),
    ] {
        let out = archive
            .walden(&["wal-fetch", SEG1, dest.to_str().unwrap()])
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(code(&out), 254, "{var}={value}: {}", stderr(&out));
        assert!(stderr(&out).contains(needle), "{}", stderr(&out));
    }
    // A misconfigured restore_command must not read as "absent" either.
    let out = archive.walden(&["wal-fetch", SEG1]).output().unwrap();
    assert_eq!(code(&out), 254, "usage error: {}", stderr(&out));
    assert!(!dest.exists());

    assert_eq!(
        fetched(&archive, &work, SEG1),
        std::fs::read(&a).unwrap(),
        "healthy again"
    );
}

/// Invariant 1: storage errors during a push fail it, and nothing half-written is stored.
#[test]
fn storage_errors_during_push_fail_and_store_nothing() {
    let work = Workdir::new("push-errors");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    archive.proxy().fail_with_503();
    let out = push(&archive, &a);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("retrying"), "{}", stderr(&out));
    assert!(
        block_on(archive.keys()).is_empty(),
        "objects stored by a failed push"
    );
    archive.proxy().drop_connections();
    assert_eq!(code(&push(&archive, &a)), 1);
    archive.proxy().pass();
    assert_ok(&push(&archive, &a), "push after the outage");
    assert_eq!(fetched(&archive, &work, SEG1), std::fs::read(&a).unwrap());

    let out = archive
        .walden(&["wal-push", a.to_str().unwrap()])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1, "wrong credentials: {}", stderr(&out));
    let out = archive
        .walden(&["wal-push", a.to_str().unwrap()])
        .env("WALDEN_STORAGE", "")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("no storage configured"),
        "{}",
        stderr(&out)
    );
}

/// Files that are not what their name says are refused before anything is stored.
#[test]
fn renamed_or_foreign_files_are_refused() {
    let work = Workdir::new("foreign");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let renamed = copy_as(&work, &a, "renamed", "000000010000000000000005", None);
    let out = push(&archive, &renamed);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("renamed or recycled"),
        "{}",
        stderr(&out)
    );
    let text = work.path().join("text").join(SEG1);
    std::fs::create_dir_all(text.parent().unwrap()).unwrap();
    std::fs::write(
        &text,
        "not a WAL segment at all, just some text that is long enough",
    )
    .unwrap();
    let out = push(&archive, &text);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("page magic"), "{}", stderr(&out));
    let odd = copy_as(&work, &a, "odd", "notwal", None);
    let out = push(&archive, &odd);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("not a WAL file name"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        code(&push(&archive, &work.path().join("missing").join(SEG1))),
        1
    );
    assert!(wal_keys(&archive).is_empty(), "refused files were stored");
}

/// A reader refuses a storage format it does not know.
#[test]
fn unknown_repository_format_is_refused() {
    let work = Workdir::new("format");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    std::fs::write(
        archive.dir.join("walden.json"),
        r#"{"format": 2, "system_identifier": "1"}"#,
    )
    .unwrap();
    let out = push(&archive, &a);
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("format 2"), "{}", stderr(&out));
    let out = fetch(&archive, SEG1, &work.path().join("dest"));
    assert_eq!(code(&out), 254);
    assert!(stderr(&out).contains("format 2"), "{}", stderr(&out));
}

/// Invariant 6 at the storage layer: WALDEN_READ_ONLY refuses every write; reads work.
#[test]
fn read_only_mode_never_writes() {
    let work = Workdir::new("readonly");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let out = archive
        .walden(&["wal-push", a.to_str().unwrap()])
        .env("WALDEN_READ_ONLY", "true")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    assert!(
        block_on(archive.keys()).is_empty(),
        "a read-only push wrote objects"
    );
    assert_ok(&push(&archive, &a), "normal push");
    let before = block_on(archive.keys());
    let dest = work.path().join("ro-dest");
    let out = archive
        .walden(&["wal-fetch", SEG1, dest.to_str().unwrap()])
        .env("WALDEN_READ_ONLY", "1")
        .output()
        .unwrap();
    assert_ok(&out, "read-only fetch");
    let other = copy_as(&work, &a, "ro2", "000000010000000000000001.partial", None);
    let out = archive
        .walden(&["wal-push", other.to_str().unwrap()])
        .env("WALDEN_READ_ONLY", "1")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert_eq!(
        block_on(archive.keys()),
        before,
        "read-only mode changed the archive"
    );
}

/// History, partial and backup-history files are archived and restored too.
#[test]
fn history_partial_and_backup_files_round_trip() {
    let work = Workdir::new("files");
    let a = real_segment(&work, "a");
    let dir = work.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let history = dir.join("00000002.history");
    std::fs::write(&history, "1\t0/3000000\tno recovery target specified\n").unwrap();
    let label = dir.join("000000010000000000000001.00000028.backup");
    std::fs::write(
        &label,
        "START WAL LOCATION: 0/1000028 (file 000000010000000000000001)\n\
         STOP WAL LOCATION: 0/1000100 (file 000000010000000000000001)\n",
    )
    .unwrap();
    let partial = copy_as(&work, &a, "files", "000000010000000000000001.partial", None);
    for kind in KINDS {
        let archive = Archive::new(kind, work.path(), &format!("files-{kind:?}").to_lowercase());
        assert_ok(&push(&archive, &a), "segment");
        for f in [&history, &label, &partial] {
            assert_ok(&push(&archive, f), &f.display().to_string());
            let name = f.file_name().unwrap().to_str().unwrap();
            assert_eq!(
                fetched(&archive, &work, name),
                std::fs::read(f).unwrap(),
                "{kind:?} {name}"
            );
        }
        assert_eq!(
            wal_keys(&archive),
            vec![
                format!("wal/0000000100000000/{SEG1}.00000028.backup.zst"),
                format!("wal/0000000100000000/{SEG1}.partial.zst"),
                format!("wal/0000000100000000/{SEG1}.zst"),
                "wal/00000002.history.zst".to_string(),
            ]
        );
    }
}

/// Objects larger than one part go up as multipart uploads and come back intact.
#[test]
fn large_objects_use_multipart_upload_and_round_trip() {
    let work = Workdir::new("multipart");
    let a = real_segment(&work, "a");
    // The real header page, then 16 MiB of incompressible bytes: compressed size stays ~16 MiB.
    let mut bytes = std::fs::read(&a).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in bytes[8192..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let dir = work.path().join("big");
    std::fs::create_dir_all(&dir).unwrap();
    let seg = dir.join(SEG1);
    std::fs::write(&seg, &bytes).unwrap();
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let out = archive
        .walden(&["wal-push", seg.to_str().unwrap()])
        .env("WALDEN_S3_PART_SIZE_MB", "5")
        .output()
        .unwrap();
    assert_ok(&out, "multipart push");
    let stored =
        std::fs::metadata(archive.object_path(&format!("wal/0000000100000000/{SEG1}.zst")))
            .unwrap()
            .len();
    assert!(
        stored > 15 << 20,
        "stored {stored} bytes: the content should not have compressed"
    );
    assert_eq!(fetched(&archive, &work, SEG1), bytes);
}

/// Invariant 1 on `file://`: exit 0 comes only after the object's data is
/// fsynced, the object is linked into place, and its directory is fsynced.
/// Observed with strace on the real binary.
#[test]
fn file_push_fsyncs_object_then_directory_before_success() {
    let work = Workdir::new("fsync");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    // Create the repository first so the traced push is a plain segment upload.
    let label = work
        .path()
        .join("l")
        .join("000000010000000000000001.00000028.backup");
    std::fs::create_dir_all(label.parent().unwrap()).unwrap();
    assert_ok(&push(&archive, &a), "first push");
    std::fs::write(
        &label,
        "START WAL LOCATION: 0/1000028 (file 000000010000000000000001)\n\
         STOP WAL LOCATION: 0/1000100 (file 000000010000000000000001)\n",
    )
    .unwrap();
    let trace = work.path().join("trace");
    let mut cmd = std::process::Command::new("strace");
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=openat,fsync,fdatasync,link,linkat",
        "-o",
    ])
    .arg(&trace);
    cmd.arg(walden_e2e::walden_bin())
        .args(["wal-push", label.to_str().unwrap()]);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .envs(archive.env());
    let out = cmd
        .output()
        .expect("strace is needed for this test (bash .ci/run installs it)");
    assert_ok(&out, "traced push");
    let lines: Vec<String> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let fd_of = |line: &str| {
        line.rsplit("= ")
            .next()
            .and_then(|fd| fd.trim().parse::<i32>().ok())
    };
    let pos = |pred: &dyn Fn(&str) -> bool| lines.iter().position(|l| pred(l));
    let open_tmp = pos(&|l: &str| {
        l.contains("openat(") && l.contains(".walden-tmp-") && l.contains("O_CREAT")
    })
    .expect("temporary file opened");
    let tmp_fd = fd_of(&lines[open_tmp]).expect("fd");
    let fsync_tmp = (open_tmp..lines.len())
        .find(|&i| lines[i].contains(&format!("fsync({tmp_fd})")))
        .expect("temporary file fsynced");
    let link =
        pos(&|l: &str| l.contains("link") && l.contains(".backup.zst") && l.ends_with("= 0"))
            .expect("object linked into place");
    assert!(
        fsync_tmp < link,
        "data fsynced after the link:\n{}",
        lines.join("\n")
    );
    let dir = archive.dir.join("wal/0000000100000000");
    let open_dir = (link..lines.len())
        .find(|&i| {
            lines[i].contains(&format!("\"{}\"", dir.display())) && lines[i].contains("O_RDONLY")
        })
        .expect("directory opened after the link");
    let dir_fd = fd_of(&lines[open_dir]).expect("fd");
    assert!(
        (open_dir..lines.len()).any(|i| lines[i].contains(&format!("fsync({dir_fd})"))),
        "directory not fsynced after the link:\n{}",
        lines.join("\n")
    );
}

/// Images without `ca-certificates` (the postgres image the binary is copied
/// into): a plain http:// endpoint works, an https:// one fails with a clear
/// configuration error instead of the SDK's panic.
#[test]
fn s3_without_ca_roots_works_over_http_and_explains_https() {
    let work = Workdir::new("noroots");
    let a = real_segment(&work, "a");
    let archive = Archive::new(StorageKind::S3, work.path(), "noroots");
    let empty = work.path().join("no-roots.pem");
    std::fs::write(&empty, "").unwrap();
    let no_roots = |cmd: &mut std::process::Command| {
        cmd.env("SSL_CERT_FILE", &empty)
            .env("SSL_CERT_DIR", work.path().join("no-such-dir"));
    };
    let mut cmd = archive.walden(&["wal-push", a.to_str().unwrap()]);
    no_roots(&mut cmd);
    let out = cmd.output().expect("run walden");
    assert_ok(&out, "push over http without CA roots");
    assert_eq!(fetched(&archive, &work, SEG1), std::fs::read(&a).unwrap());

    let https = archive.proxy().endpoint().replace("http://", "https://");
    let mut cmd = archive.walden(&["wal-fetch", SEG1, work.path().join("x").to_str().unwrap()]);
    no_roots(&mut cmd);
    let out = cmd
        .env("WALDEN_S3_ENDPOINT", &https)
        .output()
        .expect("run walden");
    let err = stderr(&out);
    assert!(
        !err.contains("panicked") && ![0, 101].contains(&code(&out)),
        "exit {}: {err}",
        code(&out)
    );
    assert!(err.contains("no CA certificates found"), "{err}");
    assert!(!work.path().join("x").exists(), "wrote the destination");
}
