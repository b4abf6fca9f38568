//! Safety invariants 1–4 (design §4) of `wal::push` and `wal::fetch`, on
//! in-memory storage with the fault injected: fast enough to run on every
//! change, next to the end-to-end tests that prove the same against real
//! PostgreSQL and S3.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::header::sample_segment;
use super::{fetch, push, FetchOptions, PushOptions, PushResult, WalError};
use crate::retry::RetryPolicy;
use crate::storage::memory::MemoryStorage;
use crate::storage::Storage;

const SEG: u32 = 16 << 20;
const NAME: &str = "000000010000000000000001";

fn quick() -> RetryPolicy {
    RetryPolicy {
        retries: 2,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
    }
}

fn push_opts() -> PushOptions {
    PushOptions {
        retry: quick(),
        ..PushOptions::default()
    }
}

fn fetch_opts() -> FetchOptions {
    FetchOptions {
        retry: quick(),
        hole_grace: None,
    }
}

/// Segment 1 of timeline 1 of database `sysid`, marked with `tag`, in `dir`.
fn segment(dir: &Path, sysid: u64, tag: &[u8]) -> PathBuf {
    let path = dir.join(NAME);
    std::fs::write(&path, sample_segment(sysid, 1, 0x0100_0000, SEG, tag)).expect("write");
    path
}

fn stored_key(s: &MemoryStorage) -> String {
    s.keys()
        .into_iter()
        .find(|k| k.contains(NAME))
        .expect("the segment is stored")
}

#[tokio::test]
async fn a_push_returns_only_once_stored_and_a_retry_of_the_same_content_is_no_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    let path = segment(dir.path(), 7, b"one");
    s.fail_creates(2);
    let pushed = push(&s, &path, &push_opts())
        .await
        .expect("push after two faults");
    assert_eq!(pushed.result, PushResult::Stored);
    let key = stored_key(&s);
    assert!(s.object(&key).is_some());
    let again = push(&s, &path, &push_opts()).await.expect("second push");
    assert_eq!(again.result, PushResult::AlreadyArchived);
}

#[tokio::test]
async fn a_push_that_cannot_store_fails_and_reports_nothing_archived() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    let path = segment(dir.path(), 7, b"one");
    s.fail_creates(1000);
    let err = push(&s, &path, &push_opts())
        .await
        .expect_err("storage is down");
    assert!(err.is_transient(), "{err}");
    assert!(
        !s.keys().iter().any(|k| k.contains(NAME)),
        "a segment was stored though the push failed: {:?}",
        s.keys()
    );
}

#[tokio::test]
async fn different_content_under_an_archived_name_is_refused_and_the_archive_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    push(&s, &segment(dir.path(), 7, b"one"), &push_opts())
        .await
        .expect("first push");
    let key = stored_key(&s);
    let before = s.object(&key);
    let err = push(&s, &segment(dir.path(), 7, b"two"), &push_opts())
        .await
        .expect_err("a different segment under the same name");
    assert!(matches!(err, WalError::Conflict { .. }), "{err}");
    assert_eq!(s.object(&key), before, "the stored segment changed");
}

/// Another writer stores the name between the push's check and its upload:
/// the push compares what is there rather than trusting it.
#[tokio::test]
async fn a_writer_that_wins_the_race_with_other_content_is_a_conflict_not_a_success() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    push(&s, &segment(dir.path(), 7, b"first"), &push_opts())
        .await
        .expect("a first segment makes the repository");
    let winner = s.object(&stored_key(&s)).expect("stored");
    s.delete(&[stored_key(&s)]).await.expect("delete");

    let other = tempfile::tempdir().expect("tempdir");
    s.race_next_create_with(winner.clone());
    let err = push(&s, &segment(other.path(), 7, b"second"), &push_opts())
        .await
        .expect_err("the racing writer stored different content");
    assert!(matches!(err, WalError::Conflict { .. }), "{err}");
    assert_eq!(s.object(&stored_key(&s)), Some(winner.clone()));

    s.race_next_create_with(winner);
    let same = push(&s, &segment(dir.path(), 7, b"first"), &push_opts())
        .await
        .expect("the racing writer stored the same content");
    assert_eq!(same.result, PushResult::AlreadyArchived);
}

#[tokio::test]
async fn a_second_database_is_refused_on_the_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    push(&s, &segment(dir.path(), 7, b"one"), &push_opts())
        .await
        .expect("first push");
    let keys = s.keys();
    let other = tempfile::tempdir().expect("tempdir");
    let err = push(&s, &segment(other.path(), 8, b"one"), &push_opts())
        .await
        .expect_err("another database");
    assert!(err.to_string().contains("system identifier 8"), "{err}");
    assert_eq!(
        s.keys(),
        keys,
        "something was stored for the second database"
    );
}

#[tokio::test]
async fn fetch_returns_the_exact_bytes_and_refuses_a_damaged_object_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    let path = segment(dir.path(), 7, b"one");
    push(&s, &path, &push_opts()).await.expect("push");
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("RECOVERYXLOG");
    fetch(&s, NAME, &dest, &fetch_opts()).await.expect("fetch");
    assert!(std::fs::read(&dest).expect("fetched") == std::fs::read(&path).expect("local"));
    std::fs::remove_file(&dest).expect("rm");

    let key = stored_key(&s);
    let mut damaged = s.object(&key).expect("stored");
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xFF;
    s.replace(&key, damaged);
    let err = fetch(&s, NAME, &dest, &fetch_opts())
        .await
        .expect_err("a damaged object");
    assert!(
        !err.is_not_found(),
        "a damaged object must not look absent: {err}"
    );
    assert!(!dest.exists(), "a damaged segment was handed to PostgreSQL");
}

#[tokio::test]
async fn a_missing_segment_is_not_found_and_a_read_fault_is_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = MemoryStorage::default();
    push(&s, &segment(dir.path(), 7, b"one"), &push_opts())
        .await
        .expect("push");
    let out = tempfile::tempdir().expect("tempdir");
    let dest = out.path().join("RECOVERYXLOG");
    let next = "000000010000000000000002";
    let err = fetch(&s, next, &dest, &fetch_opts())
        .await
        .expect_err("never archived");
    assert!(err.is_not_found(), "{err}");
    s.fail_gets(1000);
    let err = fetch(&s, NAME, &dest, &fetch_opts())
        .await
        .expect_err("storage down");
    assert!(
        !err.is_not_found(),
        "a read failure must not end recovery: {err}"
    );
    assert!(!dest.exists());
}
