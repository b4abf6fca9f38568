//! What every command shares: exit statuses, error reports, sizes for humans.

use std::path::Path;
use std::process::ExitCode;

use walden::config::Settings;

/// Exit status of `wal-fetch` when the file is definitively not in the archive:
/// PostgreSQL then ends archive recovery (or, on a standby, tries streaming).
pub const EXIT_NOT_FOUND: u8 = 1;
/// Exit status of `wal-fetch` for every other failure. PostgreSQL treats a
/// status above 125 as fatal and aborts recovery instead of ending it early
/// at the wrong point (safety invariant 4).
pub const EXIT_FETCH_FAILED: u8 = 254;
/// Exit status of `verify` when it ran and found problems (1: it could not run).
pub const EXIT_PROBLEMS_FOUND: u8 = 2;

/// A name as given when it is short, else its start and length.
pub fn short(name: &str) -> String {
    if name.len() <= 80 {
        name.to_string()
    } else {
        walden::restore::settings::echo(name)
    }
}

pub fn fail(what: &str, e: anyhow::Error) -> ExitCode {
    tracing::error!("{what}: {}", error_chain(&e));
    ExitCode::FAILURE
}

/// An error and its causes, each cause once: a message that already quotes
/// its source (`{path}: {source}`) is not followed by the source again.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out
}

/// What the server started on a restored directory needs besides the
/// restore_command: the key file for an encrypted archive, credentials for S3.
pub fn needs_env(settings: &Settings) -> String {
    let mut needs = Vec::new();
    if let Some(k) = &settings.encryption_key_file {
        needs.push(format!(
            "the restore_command reads the encryption key from {} (the server's OS user must be able to read it)",
            k.display()
        ));
    }
    if settings
        .storage
        .as_deref()
        .is_some_and(|u| u.starts_with("s3://"))
    {
        needs.push("S3 credentials (AWS_*) in the server's environment".into());
    }
    if needs.is_empty() {
        String::new()
    } else {
        format!("; {}", needs.join("; "))
    }
}

/// Kubernetes shows at most 4096 bytes of a termination message.
pub fn write_termination_log(path: &Path, message: &str) {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    if let Err(e) = std::fs::write(path, &message[..end]) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the termination log");
    }
}

pub fn default_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
}

pub fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if a.starts_with('/') && b.starts_with('/') => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err(format!("{s:?} is not OLDDIR=NEWDIR with absolute paths")),
    }
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
