//! The command line as a DBA meets it: help, exit codes for bad usage.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the report

use std::process::Command;

fn walden(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_walden"))
        .args(args)
        .env_remove("WALDEN_STORAGE")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run walden")
}

#[test]
fn help_explains_how_to_wire_postgres() {
    let out = walden(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "archive_command = 'walden wal-push %p'",
        "restore_command = 'walden wal-fetch %f %p'",
        "WALDEN_STORAGE",
    ] {
        assert!(text.contains(needle), "--help lacks {needle:?}:\n{text}");
    }
    let fetch = walden(&["wal-fetch", "--help"]);
    let text = String::from_utf8_lossy(&fetch.stdout);
    assert!(
        text.contains("254") && text.contains("not in the archive"),
        "{text}"
    );
}

#[test]
fn usage_errors_of_wal_fetch_are_fatal_for_recovery_not_absent() {
    // exit 1 would tell PostgreSQL "file absent" and end recovery early.
    let out = walden(&["wal-fetch", "000000010000000000000001"]);
    assert_eq!(out.status.code(), Some(254));
    let out = walden(&["wal-fetch", "--no-such-flag", "a", "b"]);
    assert_eq!(out.status.code(), Some(254));
    let out = walden(&["wal-push"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn boolean_settings_accept_the_usual_spellings() {
    for value in ["1", "true", "yes", "on", "0", "false", "no", "off"] {
        let out = Command::new(env!("CARGO_BIN_EXE_walden"))
            .args(["wal-push", "/nonexistent/000000010000000000000001"])
            .env("WALDEN_STORAGE", "file:///nonexistent-walden-test")
            .env("WALDEN_READ_ONLY", value)
            .env("WALDEN_S3_PATH_STYLE", value)
            .output()
            .expect("run walden");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("invalid value"), "{value}: {err}");
        assert_eq!(out.status.code(), Some(1), "{value}: {err}");
    }
}

#[test]
fn install_copies_an_executable_binary() {
    let dir = tempfile::tempdir().unwrap();
    let out = walden(&["install", dir.path().to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let copied = dir.path().join("walden");
    let v = Command::new(&copied).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("walden "));
    let missing = walden(&["install", "/nonexistent/dir"]);
    assert_eq!(missing.status.code(), Some(1));
}
