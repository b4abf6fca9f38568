//! Local files replaced whole: a temporary file next to the target is
//! written and fsynced, renamed over it, and the directory is fsynced, so a
//! crash leaves the old content or the new one, never a torn file. WAL that
//! `wal-fetch` writes for PostgreSQL does not come here: it is a hot path,
//! and PostgreSQL reads it at once, whatever a crash would have left.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Which step failed, on which path.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct WriteError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary file [`replace_with`] writes next to `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{name}.tmp"))
}

/// Makes the entries of `dir` (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("fsync", dir))
}

/// Replaces `path` with what `fill` writes, with permissions `mode`. On an
/// error the temporary file is removed and `path` is as it was.
pub fn replace_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(at("create", &tmp))?;
        // The mode given at creation passes through the umask; set it exactly.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(at("chmod", &tmp))?;
        fill(&mut file).map_err(at("write", &tmp))?;
        file.sync_all().map_err(at("fsync", &tmp))?;
        std::fs::rename(&tmp, path).map_err(at("rename into place", path))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))
    })();
    if result.is_err() {
        // Only the temporary file this call created; never `path`.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Replaces `path` with `bytes` (see [`replace_with`]).
pub fn replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    replace_with(path, mode, |f| f.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn replaces_the_whole_file_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"old content, longer than the new one").unwrap();
        replace(&path, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(mode_of(&path), 0o600);
        replace(&path, b"again", 0o755).unwrap();
        assert_eq!(mode_of(&path), 0o755);
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        std::fs::write(&path, b"old").unwrap();
        let err = replace_with(&path, 0o600, |f| {
            f.write_all(b"half")?;
            Err(io::Error::other("disk on fire"))
        })
        .unwrap_err();
        assert_eq!(err.op, "write");
        assert_eq!(err.path, temp_path(&path));
        assert!(err.to_string().contains("disk on fire"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("state.json");
        let err = replace(&path, b"x", 0o600).unwrap_err();
        assert_eq!(err.op, "create");
        assert!(
            err.to_string()
                .contains(&temp_path(&path).display().to_string()),
            "{err}"
        );
    }
}
