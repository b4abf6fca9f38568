//! Client-side encryption end to end (PostgreSQL 15 archiving through walden
//! to a real S3-compatible server): backup, WAL and restore round trip
//! exactly; no stored data object holds the plaintext (not even after zstd
//! decompression); a wrong or missing key fails clearly; listing and
//! retention work without the key.

use std::path::Path;

use walden::crypt::Keyring;
use walden::storage::Download;
use walden_e2e::ledger::{batches_in, block_on, ok, restore_and_start, Primary};
use walden_e2e::sys::chown_pg;
use walden_e2e::{Archive, StorageKind, Workdir};

const MARKER: &str = "WALDEN-PLAINTEXT-MARKER-4f1c9e";

fn key_file(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, Keyring::generate_key_file()).expect("write key");
    chown_pg(&path);
    path.display().to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn encrypted_archive_round_trips_hides_plaintext_and_needs_the_right_key() {
    let work = Workdir::new("encrypt");
    let mut archive = Archive::new(StorageKind::S3, work.path(), "db");
    let key = key_file(work.path(), "walden.key");
    let wrong = key_file(work.path(), "other.key");
    archive
        .extra_env
        .push(("WALDEN_ENCRYPTION_KEY_FILE".into(), key.clone()));

    let mut p = Primary::start(&work, &archive, "primary");
    p.commit_batch(0, MARKER);
    let m = p.backup(&archive, &[]);
    let id = m["id"].as_str().expect("id").to_string();
    p.commit_batch(1, MARKER);
    p.pg.switch_wal();
    p.commit_batch(2, MARKER);
    p.archive_everything();

    // walden.json names the key by its fingerprint, never the key itself.
    let identity: serde_json::Value = serde_json::from_slice(
        &std::fs::read(archive.object_path("walden.json")).expect("walden.json"),
    )
    .expect("json");
    let fingerprint = Keyring::load(Path::new(&key))
        .expect("key")
        .fingerprint()
        .to_string();
    assert_eq!(identity["encryption_key_fingerprint"], fingerprint.as_str());
    assert_eq!(
        m["encryption"],
        fingerprint.as_str(),
        "backup.json records the key fingerprint"
    );
    let key_text = std::fs::read_to_string(&key).expect("key");
    let secret = key_text
        .lines()
        .find(|l| l.starts_with("AGE-SECRET"))
        .expect("secret");
    let all_keys = block_on(archive.keys());
    for k in &all_keys {
        let bytes = std::fs::read(archive.object_path(k)).expect("object");
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{k} holds the key"
        );
    }

    // No data object holds the marker, raw or decompressed as a sealed object would be.
    let data: Vec<&String> = all_keys
        .iter()
        .filter(|k| walden::crypt::is_data_key(k))
        .collect();
    assert!(
        data.iter().any(|k| k.starts_with("wal/"))
            && data.iter().any(|k| k.starts_with("backups/"))
    );
    let mut decryptable_with_marker = 0;
    for k in &data {
        let bytes = std::fs::read(archive.object_path(k)).expect("object");
        assert!(
            bytes.starts_with(b"age-encryption.org/v1\n"),
            "{k} is not encrypted"
        );
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "{k} holds plaintext"
        );
        let size = bytes.len() as u64;
        let raw = Download {
            body: Box::pin(std::io::Cursor::new(bytes)),
            size,
        };
        let mut out = Vec::new();
        assert!(
            block_on(walden::object::unseal(k, raw, &mut out)).is_err(),
            "{k} decompresses without the key"
        );
        // Control: through the key, the same object yields the plaintext.
        let storage = block_on(async {
            let keys = Keyring::load(Path::new(&key)).expect("key");
            walden::crypt::Encrypted::open(archive.storage().await, Some(keys))
                .await
                .expect("open")
        });
        let mut plain = Vec::new();
        block_on(async {
            let d = storage.get(k).await.expect("get");
            walden::object::unseal(k, d, &mut plain)
                .await
                .expect("unseal with the key")
        });
        if plain.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) {
            decryptable_with_marker += 1;
        }
    }
    assert!(
        decryptable_with_marker > 0,
        "the marker should be in some decrypted object"
    );

    // Without the key: listing and a retention plan work, data does not.
    let nokey = |args: &[&str]| {
        let mut cmd = archive.walden(args);
        cmd.env_remove("WALDEN_ENCRYPTION_KEY_FILE");
        cmd.output().expect("walden")
    };
    let list = ok(
        nokey(&["backup-list", "--json"]),
        "backup-list without the key",
    );
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    assert_eq!(list["backups"][0]["id"], id.as_str());
    ok(
        nokey(&["retain", "--full", "1", "--dry-run"]),
        "retain --dry-run without the key",
    );
    let dest = work.pg_dir("fetched");
    let out = nokey(&[
        "wal-fetch",
        m["start_wal"].as_str().expect("start_wal"),
        dest.join("seg").to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(254), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("WALDEN_ENCRYPTION_KEY_FILE"),
        "{}",
        stderr(&out)
    );

    // A wrong key is refused by name, before anything is written.
    let dest = work.pg_dir("wrong-key");
    let mut cmd = archive.walden_pg(&p.pg, &["restore", dest.to_str().expect("utf-8")]);
    cmd.env("WALDEN_ENCRYPTION_KEY_FILE", &wrong);
    let out = cmd.output().expect("restore");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("wrong encryption key"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains(&fingerprint), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&dest).expect("dest").count(), 0);

    // With the key: verify passes and a restore holds every batch exactly.
    let out = archive.walden_output(&["verify"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
    let mut restored = restore_and_start(&work, &archive, &p.pg, "restored", &[]);
    assert_eq!(batches_in(&restored), [0, 1, 2].into_iter().collect());
    assert_eq!(
        restored.sql(&format!(
            "SELECT count(*) FROM ledger WHERE note LIKE '{MARKER}%'"
        )),
        "150"
    );
    restored.stop();
}
