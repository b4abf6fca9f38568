//! A real S3-compatible server (s3s-fs) on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::sys::{free_port, wait_for_port, ACCESS_KEY, BUCKET, SECRET_KEY};

/// The s3s-fs binary: `$WALDEN_S3S_FS`, the CI cache, or `PATH`.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WALDEN_S3S_FS") {
        return PathBuf::from(p);
    }
    let cached = Path::new("/var/tmp/walden-ci/tools/bin/s3s-fs");
    if cached.exists() {
        return cached.to_path_buf();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("s3s-fs not found: run `bash .ci/run` or `bash e2e/install-deps.sh` to install it")
    })
}

/// s3s-fs serving `root` (one directory per bucket) with the test credentials.
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub root: PathBuf,
}

impl S3Server {
    pub fn start(root: &Path) -> Self {
        std::fs::create_dir_all(root.join(BUCKET)).expect("create bucket dir");
        let mut s = Self {
            child: None,
            port: free_port(),
            root: root.to_path_buf(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.root.with_extension("log")).expect("s3 log");
        let child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(30));
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server (storage outage); `restart` brings it back on the same port and data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Where s3s-fs keeps an object's bytes (it stores objects as plain files).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
