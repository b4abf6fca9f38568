//! `backup-push` and `backup-list`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use walden::backup::{self, BackupOptions};
use walden::catalog;
use walden::config::Settings;

use super::output::{default_parallelism, fail, human};

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The server's data directory on disk [default: the server's data_directory]
    #[arg(long, env = "PGDATA", value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// libpq connection string, e.g. "host=127.0.0.1 port=5432 user=postgres"
    #[arg(long, env = "WALDEN_PG_CONNINFO", value_name = "CONNINFO")]
    pub pg_conninfo: Option<String>,
    /// Parts built and uploaded at once
    #[arg(long, env = "WALDEN_BACKUP_PARALLELISM", default_value_t = default_parallelism(), value_name = "N")]
    pub parallelism: usize,
    /// Uncompressed size at which a part is closed, in MiB
    #[arg(
        long,
        env = "WALDEN_BACKUP_PART_SIZE_MB",
        default_value_t = 256,
        value_name = "MIB"
    )]
    pub part_size_mb: u64,
    /// How long to wait for the backup's last WAL segment to be archived, in seconds
    #[arg(
        long,
        env = "WALDEN_BACKUP_WAL_WAIT",
        default_value_t = 300,
        value_name = "SECONDS"
    )]
    pub wal_wait: u64,
    /// Do not check that the backup's WAL reached this archive (only when WAL is
    /// archived somewhere else: such a backup cannot be restored from this archive alone)
    #[arg(long, env = "WALDEN_BACKUP_NO_ARCHIVE_CHECK", value_parser = clap::builder::BoolishValueParser::new())]
    pub no_archive_check: bool,
    /// Print the new backup's manifest as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// The backup's id [default: its start time, e.g. 20261203T030000Z]; the daemon
    /// passes its job id, so the API, the operator's status and Events name the
    /// backup in storage. An id already in the archive is refused.
    #[arg(long, env = "WALDEN_BACKUP_ID", value_name = "ID")]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Stable JSON output: {"backups":[...],"window":{...}}
    #[arg(long)]
    pub json: bool,
}

pub async fn push(settings: &Settings, args: PushArgs) -> ExitCode {
    let PushArgs {
        pgdata,
        pg_conninfo,
        parallelism,
        part_size_mb,
        wal_wait,
        no_archive_check,
        json,
        id,
    } = args;
    let result = async {
        if let Some(id) = &id {
            backup::check_id(id).map_err(anyhow::Error::msg)?;
        }
        let storage = settings.open_storage().await?;
        let opts = BackupOptions {
            id,
            pgdata,
            conninfo: pg_conninfo,
            part_size: part_size_mb.max(1) << 20,
            parallelism,
            seal: settings.seal_options(),
            wal_wait: (!no_archive_check).then(|| Duration::from_secs(wal_wait)),
        };
        backup::push(storage, &opts)
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    match result {
        Ok(m) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&m).unwrap_or_default());
            } else {
                println!(
                    "backup {} complete: {} files, {} read, {} stored in {} parts, LSN {} .. {}",
                    m.id,
                    m.file_count,
                    human(m.logical_size),
                    human(m.stored_size),
                    m.parts.len(),
                    m.start_lsn,
                    m.stop_lsn
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail("backup-push", e),
    }
}

pub async fn list(settings: &Settings, args: ListArgs) -> ExitCode {
    let ListArgs { json } = args;
    match backup_list(settings, json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("backup-list", e),
    }
}

/// The stable JSON of `backup-list --json`.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BackupListJson {
    backups: Vec<BackupJson>,
    damaged: Vec<catalog::DamagedBackup>,
    window: Option<catalog::RecoveryWindow>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BackupJson {
    id: String,
    start_time: chrono::DateTime<chrono::Utc>,
    stop_time: chrono::DateTime<chrono::Utc>,
    start_lsn: String,
    stop_lsn: String,
    timeline: u32,
    logical_size: u64,
    stored_size: u64,
    files: u64,
    parts: usize,
    pg_version_num: u32,
}

async fn backup_list(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let storage = settings.open_storage().await?;
    let catalog::Catalog { backups, damaged } = catalog::scan_backups(storage.as_ref()).await?;
    if backups.is_empty() && damaged.is_empty() {
        // A mistyped URL must say so, not look like an archive without backups.
        walden::repo::require(storage.as_ref()).await?;
    }
    let window = catalog::recovery_window(storage.as_ref(), &backups).await?;
    if json {
        let out = BackupListJson {
            backups: backups
                .iter()
                .map(|b| BackupJson {
                    id: b.id.clone(),
                    start_time: b.start_time,
                    stop_time: b.stop_time,
                    start_lsn: b.start_lsn.to_string(),
                    stop_lsn: b.stop_lsn.to_string(),
                    timeline: b.timeline,
                    logical_size: b.logical_size,
                    stored_size: b.stored_size,
                    files: b.file_count,
                    parts: b.parts.len(),
                    pg_version_num: b.pg_version_num,
                })
                .collect(),
            damaged,
            window,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for d in &damaged {
        println!("DAMAGED backup {}: {}: {}", d.id, d.object, d.reason);
    }
    if backups.is_empty() {
        println!("no base backups in {}", storage.url());
    } else {
        println!(
            "{:<20} {:<25} {:<25} {:>12} {:>12} {:>3} {:>10} {:>10}",
            "ID", "START", "STOP", "START LSN", "STOP LSN", "TL", "SIZE", "STORED"
        );
        for b in &backups {
            println!(
                "{:<20} {:<25} {:<25} {:>12} {:>12} {:>3} {:>10} {:>10}",
                b.id,
                b.start_time.format("%Y-%m-%d %H:%M:%S%.3fZ"),
                b.stop_time.format("%Y-%m-%d %H:%M:%S%.3fZ"),
                b.start_lsn.to_string(),
                b.stop_lsn.to_string(),
                b.timeline,
                human(b.logical_size),
                human(b.stored_size)
            );
        }
    }
    match window {
        Some(w) => {
            println!(
            "recoverable: from {} (LSN {}) to the end of the archive, last segment {} archived {}",
            w.first_point.to_rfc3339(),
            w.first_lsn,
            w.last_archived_wal.as_deref().unwrap_or("none yet"),
            w.last_archived_time.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into())
        )
        }
        None => println!("recoverable window: none (no base backup)"),
    }
    Ok(())
}
