//! Walking PGDATA (and tablespaces) for a base backup, skipping what
//! PostgreSQL documents as unnecessary in a backup: WAL, runtime state,
//! temporary files, and the main forks of unlogged relations.
//!
//! The walk streams: one directory is read at a time and entries go straight
//! into a bounded channel, so memory does not grow with the number of files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tokio::sync::mpsc;

use crate::catalog::Tablespace;

/// What to do with a path under PGDATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Include,
    Skip,
    /// Keep the directory itself (PostgreSQL needs it to exist), skip its contents.
    IncludeEmpty,
}

/// Files never copied, wherever they are.
const SKIP_NAMES: &[&str] = &["pg_internal.init"];
/// Files never copied at the top of PGDATA.
const SKIP_TOP_FILES: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
    "backup_manifest",
    "postgresql.auto.conf.tmp",
    "current_logfiles.tmp",
    // The restore marker describes how this directory was restored; a backup
    // of it is a new origin (restore::marker).
    crate::restore::marker::MARKER,
    "walden.restore.json.tmp",
];
/// Directories whose contents are runtime state, recreated by PostgreSQL.
const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Decides for a path relative to PGDATA (`/`-separated), by name alone.
pub fn decide(rel: &str, is_dir: bool) -> Decision {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.starts_with("pgsql_tmp") || SKIP_NAMES.contains(&name) {
        return Decision::Skip;
    }
    let top = !rel.contains('/');
    if top && !is_dir && SKIP_TOP_FILES.contains(&name) {
        return Decision::Skip;
    }
    if top && is_dir && EMPTY_DIRS.contains(&name) {
        return Decision::IncludeEmpty;
    }
    Decision::Include
}

/// For a relation file name (`16384`, `16384_fsm`, `16384.2`), its relfilenode
/// and whether it is the init fork.
fn relation_file(name: &str) -> Option<(&str, bool)> {
    let base = name.split('.').next().unwrap_or(name);
    let (node, fork) = match base.split_once('_') {
        Some((n, f)) => (n, Some(f)),
        None => (base, None),
    };
    if node.is_empty() || !node.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match fork {
        None | Some("fsm") | Some("vm") => Some((node, false)),
        Some("init") => Some((node, true)),
        Some(_) => None,
    }
}

/// An unlogged relation's forks other than `_init` are reset at recovery:
/// skip them when the init fork exists beside them.
fn is_unlogged_data(dir: &Path, name: &str) -> bool {
    match relation_file(name) {
        Some((node, false)) => dir.join(format!("{node}_init")).exists(),
        _ => false,
    }
}

/// Whether a directory holds relation files (a database directory).
fn is_database_dir(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    matches!(parts.as_slice(), ["base", _]) || matches!(parts.as_slice(), ["pg_tblspc", _, _, _])
}

/// One thing to put in the backup.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    /// Path inside the backup: relative to PGDATA; tablespaces under `pg_tblspc/<oid>/`.
    pub name: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub mtime: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File { size: u64 },
    Dir,
}

fn entry(path: &Path, name: String, meta: &fs::Metadata) -> Entry {
    use std::os::unix::fs::PermissionsExt;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let kind = if meta.is_dir() {
        EntryKind::Dir
    } else {
        EntryKind::File { size: meta.len() }
    };
    Entry {
        path: path.to_path_buf(),
        name,
        kind,
        mode: meta.permissions().mode() & 0o7777,
        mtime,
    }
}

/// Walks PGDATA, sending entries into `tx`; returns the tablespaces found.
/// Runs on a blocking thread. Files that vanish during the walk are skipped,
/// as PostgreSQL allows (WAL replay recreates them).
pub fn walk(pgdata: &Path, tx: mpsc::Sender<Entry>) -> std::io::Result<Vec<Tablespace>> {
    let mut tablespaces = Vec::new();
    // (directory on disk, its name inside the backup)
    let mut stack: Vec<(PathBuf, String)> = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("reading directory {}: {e}", dir.display()),
                ))
            }
        };
        let in_db_dir = is_database_dir(&rel_dir);
        for item in entries {
            let item = item?;
            let file_name = item.file_name();
            let Some(fname) = file_name.to_str() else {
                tracing::warn!(path = %item.path().display(), "skipping a file whose name is not UTF-8");
                continue;
            };
            let rel = if rel_dir.is_empty() {
                fname.to_string()
            } else {
                format!("{rel_dir}/{fname}")
            };
            let path = item.path();
            let link = fs::symlink_metadata(&path);
            let Ok(link) = link else { continue };
            let is_tablespace_link = rel_dir == "pg_tblspc" && link.file_type().is_symlink();
            // Follow symlinks (pg_wal or tablespaces may live elsewhere).
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    ))
                }
            };
            if is_tablespace_link {
                if let Ok(oid) = fname.parse::<u32>() {
                    let target = fs::read_link(&path)?;
                    tablespaces.push(Tablespace {
                        oid,
                        location: target.display().to_string(),
                    });
                }
            }
            let decision = decide(&rel, meta.is_dir());
            if decision == Decision::Skip
                || (!meta.is_dir() && in_db_dir && is_unlogged_data(&dir, fname))
            {
                continue;
            }
            if !meta.is_dir() && !meta.is_file() {
                continue;
            }
            if tx.blocking_send(entry(&path, rel.clone(), &meta)).is_err() {
                return Err(std::io::Error::other("backup upload stopped"));
            }
            if meta.is_dir() {
                if decision == Decision::IncludeEmpty {
                    if rel == "pg_wal" {
                        // PostgreSQL needs pg_wal/archive_status to exist at startup.
                        let status = path.join("archive_status");
                        if let Ok(m) = fs::metadata(&status) {
                            let _ = tx.blocking_send(entry(
                                &status,
                                "pg_wal/archive_status".into(),
                                &m,
                            ));
                        }
                    }
                } else {
                    stack.push((path, rel));
                }
            }
        }
    }
    Ok(tablespaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_postgres_documentation() {
        use Decision::*;
        let cases = [
            ("postmaster.pid", false, Skip),
            ("postmaster.opts", false, Skip),
            ("backup_label", false, Skip),
            ("tablespace_map", false, Skip),
            ("postgresql.conf", false, Include),
            ("postgresql.auto.conf", false, Include),
            ("global/pg_control", false, Include),
            ("global/pg_internal.init", false, Skip),
            ("base/1/pg_internal.init", false, Skip),
            ("base/pgsql_tmp", true, Skip),
            ("base/16384/pgsql_tmp123.0", false, Skip),
            ("pg_tblspc/16500/PG_15_202209061/pgsql_tmp", true, Skip),
            ("pg_wal", true, IncludeEmpty),
            ("pg_replslot", true, IncludeEmpty),
            ("pg_stat_tmp", true, IncludeEmpty),
            ("pg_subtrans", true, IncludeEmpty),
            ("pg_stat", true, Include),
            ("pg_xact", true, Include),
            ("base/1/pg_wal", true, Include),
            ("base/1/backup_label", false, Include),
            ("base/1/1259", false, Include),
            ("walden.restore.json", false, Skip),
            ("walden.restore.json.tmp", false, Skip),
            ("base/1/walden.restore.json", false, Include),
        ];
        for (rel, is_dir, want) in cases {
            assert_eq!(decide(rel, is_dir), want, "{rel}");
        }
    }

    #[test]
    fn relation_files_are_recognised() {
        assert_eq!(relation_file("16384"), Some(("16384", false)));
        assert_eq!(relation_file("16384_fsm"), Some(("16384", false)));
        assert_eq!(relation_file("16384_vm"), Some(("16384", false)));
        assert_eq!(relation_file("16384.12"), Some(("16384", false)));
        assert_eq!(relation_file("16384_init"), Some(("16384", true)));
        assert_eq!(relation_file("PG_VERSION"), None);
        assert_eq!(relation_file("pg_filenode.map"), None);
    }

    #[test]
    fn walk_skips_runtime_state_and_unlogged_data() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in [
            "PG_VERSION",
            "postmaster.pid",
            "global/pg_control",
            "base/5/100",
            "base/5/100_fsm",
            "base/5/200",
            "base/5/200_init",
            "base/5/200.1",
            "base/5/200_vm",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/000000010000000000000001.done",
            "pg_stat_tmp/global.stat",
        ] {
            let p = d.join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, b"x").unwrap();
        }
        let (tx, mut rx) = mpsc::channel(1000);
        let root = d.to_path_buf();
        let ts = std::thread::spawn(move || walk(&root, tx))
            .join()
            .unwrap()
            .unwrap();
        assert!(ts.is_empty());
        let mut names = Vec::new();
        while let Ok(e) = rx.try_recv() {
            names.push(e.name);
        }
        names.sort();
        assert_eq!(
            names,
            [
                "PG_VERSION",
                "base",
                "base/5",
                "base/5/100",
                "base/5/100_fsm",
                "base/5/200_init",
                "global",
                "global/pg_control",
                "pg_stat_tmp",
                "pg_wal",
                "pg_wal/archive_status"
            ]
        );
    }
}
