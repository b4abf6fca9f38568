//! An archive for a test: `file://` in a directory, or `s3://` on s3s-fs
//! (optionally behind the fault proxy), with the environment that points
//! `walden` at it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use walden::storage::{self, S3Settings, Storage};

use crate::proxy::FaultProxy;
use crate::s3::S3Server;
use crate::sys::{aws_env, chown_pg, walden_bin, BUCKET};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    File,
    S3,
}

pub struct Archive {
    pub kind: StorageKind,
    pub url: String,
    /// Directory holding the objects (file root, or the s3s-fs bucket's prefix directory).
    pub dir: PathBuf,
    pub s3: Option<S3Server>,
    pub proxy: Option<FaultProxy>,
    /// The S3 server's own endpoint, for the test's direct reads (no proxy).
    pub direct_endpoint: Option<String>,
    /// More settings every `walden` of this archive gets (e.g. the encryption key file).
    pub extra_env: Vec<(String, String)>,
}

impl Archive {
    /// A fresh archive under `work`; S3 archives get a fault proxy in front.
    pub fn new(kind: StorageKind, work: &Path, name: &str) -> Self {
        match kind {
            StorageKind::File => {
                let dir = work.join(format!("archive-{name}"));
                std::fs::create_dir_all(&dir).expect("archive dir");
                chown_pg(&dir);
                Self {
                    kind,
                    url: format!("file://{}", dir.display()),
                    dir,
                    s3: None,
                    proxy: None,
                    direct_endpoint: None,
                    extra_env: Vec::new(),
                }
            }
            StorageKind::S3 => {
                let server = S3Server::start(&work.join(format!("s3-{name}")));
                let proxy = FaultProxy::start(server.port);
                let dir = server.root.join(BUCKET).join(name);
                Self {
                    kind,
                    url: format!("s3://{BUCKET}/{name}"),
                    dir,
                    direct_endpoint: Some(server.endpoint()),
                    s3: Some(server),
                    proxy: Some(proxy),
                    extra_env: Vec::new(),
                }
            }
        }
    }

    /// The environment `walden` needs to reach this archive (through the proxy for S3).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = aws_env();
        env.push(("WALDEN_STORAGE".into(), self.url.clone()));
        // Small retry budget: fault tests stay quick, and retries still happen.
        env.push(("WALDEN_RETRIES".into(), "2".into()));
        env.push(("WALDEN_RETRY_DELAY_MS".into(), "50".into()));
        if let Some(p) = &self.proxy {
            env.push(("WALDEN_S3_ENDPOINT".into(), p.endpoint()));
            env.push(("WALDEN_S3_PATH_STYLE".into(), "true".into()));
        }
        env.extend(self.extra_env.iter().cloned());
        env
    }

    /// The archive at `prefix` in this one's bucket (an S3 archive), on the
    /// same server and proxy: valid while `self` lives.
    pub fn at_prefix(&self, prefix: &str) -> Archive {
        let server = self.s3.as_ref().expect("an S3 archive");
        let mut extra_env = self.extra_env.clone();
        if let Some(p) = &self.proxy {
            extra_env.push(("WALDEN_S3_ENDPOINT".into(), p.endpoint()));
            extra_env.push(("WALDEN_S3_PATH_STYLE".into(), "true".into()));
        }
        Archive {
            kind: StorageKind::S3,
            url: format!("s3://{BUCKET}/{prefix}"),
            dir: server.root.join(BUCKET).join(prefix),
            s3: None,
            proxy: None,
            direct_endpoint: self.direct_endpoint.clone(),
            extra_env,
        }
    }

    pub fn proxy(&self) -> &FaultProxy {
        self.proxy.as_ref().expect("S3 archives have a fault proxy")
    }

    /// `walden <args>` with this archive's environment.
    pub fn walden(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(walden_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(self.env())
            .args(args);
        cmd
    }

    /// `walden <args>` as the PostgreSQL OS user, with libpq settings for `pg`
    /// (how backup-push and restore run next to a server).
    pub fn walden_pg(&self, pg: &crate::PgCluster, args: &[&str]) -> Command {
        let mut cmd = crate::sys::as_pg(walden_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(self.env())
            .envs(pg.libpq_env())
            .args(args);
        cmd
    }

    pub fn walden_output(&self, args: &[&str]) -> Output {
        self.walden(args).output().expect("run walden")
    }

    /// Ids of the backups `walden backup-list --json` lists.
    pub fn backup_ids(&self) -> Vec<String> {
        let out = crate::ledger::ok(
            self.walden_output(&["backup-list", "--json"]),
            "backup-list",
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("backup-list JSON");
        v["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["id"].as_str().expect("id").to_string())
            .collect()
    }

    /// The archive opened in-process (direct to the S3 server, not through the proxy).
    pub async fn storage(&self) -> Arc<dyn Storage> {
        crate::sys::init_process_env();
        let s3 = S3Settings {
            endpoint: self.direct_endpoint.clone(),
            path_style: true,
            ..S3Settings::default()
        };
        storage::open(&self.url, &s3)
            .await
            .expect("open archive storage")
    }

    /// Keys of every stored object, sorted.
    pub async fn keys(&self) -> Vec<String> {
        self.storage()
            .await
            .list("")
            .await
            .expect("list archive")
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    /// Segment names stored in the archive (WAL segments only, not history
    /// or backup-history files), whatever their timeline folder.
    pub fn stored_segments(&self) -> std::collections::BTreeSet<String> {
        crate::ledger::block_on(self.keys())
            .into_iter()
            .filter_map(|k| {
                let name = k
                    .strip_prefix("wal/")?
                    .split('/')
                    .nth(1)?
                    .strip_suffix(".zst")?;
                (name.len() == 24).then(|| name.to_string())
            })
            .collect()
    }

    /// The file holding an object's bytes on disk (both backends store plain files).
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }
}
