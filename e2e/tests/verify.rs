//! `walden verify` on a real archive (PostgreSQL 15 archiving through walden):
//! it passes on a healthy archive and names, by object or segment, a flipped
//! byte in a part, a missing part, a missing WAL segment in the middle, and a
//! timeline that cannot be followed (missing first segment, missing history).

use std::path::PathBuf;

use walden::wal::{SegmentName, WalFile};
use walden_e2e::ledger::{block_on, Primary};
use walden_e2e::{Archive, StorageKind, Workdir};

/// Runs `verify --json`; returns (exit code, problems as (kind, object)).
fn verify(archive: &Archive, extra: &[&str]) -> (Option<i32>, Vec<(String, String)>) {
    let mut args = vec!["verify", "--json"];
    args.extend_from_slice(extra);
    let out = archive.walden_output(&args);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let problems = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["kind"].as_str().expect("kind").to_string(),
                p["object"].as_str().expect("object").to_string(),
            )
        })
        .collect();
    assert_eq!(
        report["ok"].as_bool(),
        Some(out.status.success()),
        "exit status and ok disagree"
    );
    (out.status.code(), problems)
}

/// Moves a file away and back, so each damage is undone before the next.
struct Aside {
    path: PathBuf,
    saved: PathBuf,
}

impl Aside {
    fn take(path: PathBuf) -> Self {
        let saved = path.with_extension("aside");
        std::fs::rename(&path, &saved).expect("move aside");
        Self { path, saved }
    }
}

impl Drop for Aside {
    fn drop(&mut self) {
        let _ = std::fs::rename(&self.saved, &self.path);
    }
}

#[test]
fn verify_passes_a_healthy_archive_and_names_every_kind_of_damage() {
    let work = Workdir::new("verify");
    let archive = Archive::new(StorageKind::File, work.path(), "db");
    let mut p = Primary::start(&work, &archive, "primary");
    p.pg.pgbench(&["-i", "-s", "3", "-q"]);
    let m = p.backup(&archive, &["--part-size-mb", "1"]);
    for b in 0..6 {
        p.commit_batch(b, "verify");
        p.pg.switch_wal();
    }
    p.archive_everything();
    let id = m["id"].as_str().expect("id").to_string();
    let start = SegmentName::parse(m["start_wal"].as_str().expect("start_wal")).expect("segment");
    let parts: Vec<String> = m["parts"]
        .as_array()
        .expect("parts")
        .iter()
        .map(|p| format!("backups/{id}/{}", p["name"].as_str().expect("name")))
        .collect();
    assert!(parts.len() > 2, "want several parts: {parts:?}");

    let (code, problems) = verify(&archive, &[]);
    assert_eq!((code, problems), (Some(0), vec![]), "healthy archive");
    let text = archive.walden_output(&["verify"]);
    assert!(text.status.success());
    assert!(String::from_utf8_lossy(&text.stdout).starts_with("timeline 1:"));

    // A flipped byte in the middle of a part.
    let victim = archive.object_path(&parts[1]);
    let original = std::fs::read(&victim).expect("read part");
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x01;
    std::fs::write(&victim, &bad).expect("write part");
    let (code, problems) = verify(&archive, &[]);
    assert_eq!(code, Some(2));
    assert_eq!(problems, [("corrupt".to_string(), parts[1].clone())]);
    // --backup checks that backup too; --wal skips parts.
    assert_eq!(verify(&archive, &["--backup", &id]).0, Some(2));
    assert_eq!(verify(&archive, &["--wal"]), (Some(0), vec![]));
    std::fs::write(&victim, &original).expect("restore part");

    // A missing part.
    {
        let _aside = Aside::take(archive.object_path(&parts[2]));
        let (code, problems) = verify(&archive, &[]);
        assert_eq!(code, Some(2));
        assert_eq!(problems, [("missingPart".to_string(), parts[2].clone())]);
    }

    // A missing WAL segment in the middle, after the backup's start.
    let keys = block_on(archive.keys());
    let segments: Vec<SegmentName> = keys
        .iter()
        .filter_map(|k| match WalFile::from_object_key(k) {
            Some(WalFile::Segment(s)) if s >= start => Some(s),
            _ => None,
        })
        .collect();
    assert!(segments.len() > 4, "{segments:?}");
    let middle = segments[segments.len() / 2];
    {
        let _aside = Aside::take(archive.object_path(&WalFile::Segment(middle).object_key()));
        let (code, problems) = verify(&archive, &[]);
        assert_eq!(code, Some(2));
        assert_eq!(problems, [("walGap".to_string(), middle.to_string())]);
    }
    assert_eq!(verify(&archive, &[]), (Some(0), vec![]), "undone");

    // A second timeline branching in the last segment: copies of timeline 1's last
    // two segments stand in for it (verify checks names and checksums, not content).
    let last = *segments.last().expect("segments");
    let before_last = segments[segments.len() - 2];
    let switch_lsn = before_last.start_lsn(16 << 20) + 0x100;
    let history = format!(
        "1\t{:X}/{:X}\tno recovery target specified\n",
        switch_lsn >> 32,
        switch_lsn & 0xFFFF_FFFF
    );
    let storage = block_on(archive.storage());
    block_on(async {
        use tokio::io::AsyncReadExt;
        let mut sealed = Vec::new();
        walden::object::Sealer::new(
            std::io::Cursor::new(history.clone().into_bytes()),
            walden::object::SealOptions::default(),
        )
        .read_to_end(&mut sealed)
        .await
        .expect("seal");
        storage
            .create(
                "wal/00000002.history.zst",
                Box::pin(std::io::Cursor::new(sealed)),
            )
            .await
            .expect("history");
    });
    let tl2 = |s: SegmentName| SegmentName { timeline: 2, ..s };
    for s in [before_last, last] {
        let from = archive.object_path(&WalFile::Segment(s).object_key());
        let to = archive.object_path(&WalFile::Segment(tl2(s)).object_key());
        std::fs::create_dir_all(to.parent().expect("folder")).expect("mkdir");
        std::fs::copy(from, to).expect("copy segment");
    }
    assert_eq!(verify(&archive, &[]), (Some(0), vec![]), "healthy branch");
    {
        let _aside =
            Aside::take(archive.object_path(&WalFile::Segment(tl2(before_last)).object_key()));
        let (code, problems) = verify(&archive, &[]);
        assert_eq!(code, Some(2));
        assert_eq!(
            problems,
            [("timelineGap".to_string(), tl2(before_last).to_string())]
        );
    }
    {
        let _aside = Aside::take(archive.object_path("wal/00000002.history.zst"));
        let (code, problems) = verify(&archive, &[]);
        assert_eq!(code, Some(2));
        assert_eq!(
            problems,
            [("timelineGap".to_string(), "00000002.history".to_string())]
        );
    }
    // A corrupt WAL object is named too.
    let wal_victim = archive.object_path(&WalFile::Segment(middle).object_key());
    let original = std::fs::read(&wal_victim).expect("read segment");
    let mut bad = original.clone();
    let at = bad.len() / 3;
    bad[at] ^= 0x80;
    std::fs::write(&wal_victim, &bad).expect("write segment");
    let (code, problems) = verify(&archive, &["--wal"]);
    assert_eq!(code, Some(2));
    assert_eq!(
        problems,
        [("corrupt".to_string(), WalFile::Segment(middle).object_key())]
    );
    std::fs::write(&wal_victim, &original).expect("restore segment");
    assert_eq!(verify(&archive, &[]), (Some(0), vec![]));
    // An unknown backup id is an error of the command (1), not a finding (2).
    let out = archive.walden_output(&["verify", "--backup", "19990101T000000Z"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("available: "));
}
