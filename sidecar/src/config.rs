//! Settings every command shares, from flags and their environment variables.

use std::sync::Arc;
use std::time::Duration;
use walden_contract::pod::env as wenv;

use clap::Args;

use crate::object::SealOptions;
use crate::retry::RetryPolicy;
use crate::storage::{self, ReadOnly, S3Settings, Storage, StorageError};

/// Storage, compression and retry settings (flags override the variables).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where the archive lives: s3://bucket/prefix or file:///path
    #[arg(long, env = wenv::STORAGE, value_name = "URL", global = true)]
    pub storage: Option<String>,

    /// S3 endpoint for S3-compatible servers, e.g. http://127.0.0.1:9000
    #[arg(long, env = wenv::S3_ENDPOINT, value_name = "URL", global = true)]
    pub s3_endpoint: Option<String>,

    /// Use path-style S3 addressing (most S3-compatible servers need it)
    #[arg(long, env = wenv::S3_PATH_STYLE, global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub s3_path_style: bool,

    /// Size of the parts of a multipart S3 upload, in MiB (at least 5)
    #[arg(
        long,
        env = "WALDEN_S3_PART_SIZE_MB",
        default_value_t = 5,
        value_name = "MIB",
        global = true
    )]
    pub s3_part_size_mb: usize,

    /// zstd compression level (1 = fastest, 19 = smallest)
    #[arg(long, env = wenv::COMPRESSION_LEVEL, default_value_t = walden_contract::pod::DEFAULT_COMPRESSION_LEVEL, value_name = "LEVEL",
          value_parser = clap::value_parser!(i32).range(1..=22), global = true)]
    pub compression_level: i32,

    /// Retries of a storage operation after a transient error (network, timeout, 5xx)
    #[arg(
        long,
        env = "WALDEN_RETRIES",
        default_value_t = 4,
        value_name = "N",
        global = true
    )]
    pub retries: u32,

    /// Delay before the first retry in milliseconds; doubles each time, at most 10 s
    #[arg(
        long,
        env = "WALDEN_RETRY_DELAY_MS",
        default_value_t = 200,
        value_name = "MS",
        global = true
    )]
    pub retry_delay_ms: u64,

    /// File holding the archive's encryption key (an age X25519 identity,
    /// AGE-SECRET-KEY-1...); WAL segments and backup parts are then encrypted
    #[arg(
        long,
        env = wenv::ENCRYPTION_KEY_FILE,
        value_name = "FILE",
        global = true
    )]
    pub encryption_key_file: Option<std::path::PathBuf>,

    /// Seconds a wal-fetch of a segment missing from the middle of the archive
    /// waits for it (an upload in flight) before failing recovery as a hole
    #[arg(
        long,
        env = "WALDEN_HOLE_GRACE",
        default_value_t = crate::wal::DEFAULT_HOLE_GRACE.as_secs(),
        value_name = "SECONDS",
        global = true
    )]
    pub hole_grace: u64,

    /// Refuse every write to storage (forks and followers reading a source archive)
    #[arg(long, env = wenv::READ_ONLY, global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub read_only: bool,
}

impl Settings {
    /// These settings as the variables they are read from, for child
    /// processes (`backup-push`, `backup-list`, `retain` run by the daemon):
    /// a daemon configured by flags hands its children exactly what it
    /// resolved. `None` means "unset" (the child must not inherit one).
    pub fn to_env(&self) -> Vec<(&'static str, Option<String>)> {
        let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
        vec![
            ("WALDEN_STORAGE", self.storage.clone()),
            ("WALDEN_S3_ENDPOINT", self.s3_endpoint.clone()),
            ("WALDEN_S3_PATH_STYLE", Some(self.s3_path_style.to_string())),
            (
                "WALDEN_S3_PART_SIZE_MB",
                Some(self.s3_part_size_mb.to_string()),
            ),
            (
                "WALDEN_COMPRESSION_LEVEL",
                Some(self.compression_level.to_string()),
            ),
            ("WALDEN_RETRIES", Some(self.retries.to_string())),
            (
                "WALDEN_RETRY_DELAY_MS",
                Some(self.retry_delay_ms.to_string()),
            ),
            (
                "WALDEN_ENCRYPTION_KEY_FILE",
                path(&self.encryption_key_file),
            ),
            ("WALDEN_READ_ONLY", Some(self.read_only.to_string())),
        ]
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: self.retries,
            base_delay: Duration::from_millis(self.retry_delay_ms),
            max_delay: Duration::from_secs(10),
        }
    }

    /// Options of a wal-fetch PostgreSQL asked for (holes checked).
    pub fn fetch_options(&self) -> crate::wal::FetchOptions {
        crate::wal::FetchOptions {
            retry: self.retry_policy(),
            hole_grace: Some(Duration::from_secs(self.hole_grace)),
        }
    }

    pub fn seal_options(&self) -> SealOptions {
        SealOptions {
            level: self.compression_level,
            workers: 0,
        }
    }

    pub fn s3_settings(&self) -> S3Settings {
        S3Settings {
            endpoint: self.s3_endpoint.clone(),
            path_style: self.s3_path_style,
            part_size: self.s3_part_size_mb.saturating_mul(1 << 20),
            ..S3Settings::default()
        }
    }

    /// Opens the configured storage (read-only when asked).
    pub async fn open_storage(&self) -> Result<Arc<dyn Storage>, StorageError> {
        let url = self.storage.as_deref().filter(|s| !s.is_empty()).ok_or_else(|| {
            StorageError::config(
                "no storage configured: set WALDEN_STORAGE or --storage to s3://bucket/prefix or file:///path".into(),
            )
        })?;
        let keys = match self.encryption_key_file.as_deref() {
            Some(path) => Some(
                crate::crypt::Keyring::load(path)
                    .map_err(|e| StorageError::config(e.to_string()))?,
            ),
            None => None,
        };
        let inner =
            crate::crypt::Encrypted::open(storage::open(url, &self.s3_settings()).await?, keys)
                .await?;
        Ok(if self.read_only {
            Arc::new(ReadOnly(inner))
        } else {
            inner
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    /// What `to_env` hands a child parses back to the same settings.
    #[test]
    fn settings_survive_the_trip_through_the_environment() {
        let from_flags = Cli::parse_from([
            "walden",
            "--storage",
            "s3://bucket/db",
            "--s3-endpoint",
            "http://127.0.0.1:9",
            "--s3-path-style",
            "--compression-level",
            "7",
            "--retries",
            "9",
            "--retry-delay-ms",
            "5",
            "--encryption-key-file",
            "/k",
            "--read-only",
        ])
        .settings;
        let mut args = vec!["walden".to_string()];
        for (name, value) in from_flags.to_env() {
            let flag = name
                .trim_start_matches("WALDEN_")
                .to_ascii_lowercase()
                .replace('_', "-");
            match value.as_deref() {
                Some("true") => args.push(format!("--{flag}")),
                Some("false") | None => {}
                Some(v) => args.push(format!("--{flag}={v}")),
            }
        }
        let back = Cli::parse_from(args).settings;
        assert_eq!(format!("{back:?}"), format!("{from_flags:?}"));
        let unset = Cli::parse_from(["walden"]).settings.to_env();
        assert!(unset.contains(&("WALDEN_STORAGE", None)));
    }
}
