//! `restore` and `restore-test` (the restore proof).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use walden::config::Settings;
use walden::restore::{
    self, marker::IfRestored, proof, settings::RecoverySettings, Outcome, RestoreOptions,
};
use walden_contract::pod::env as wenv;

use super::output::{
    default_parallelism, fail, human, needs_env, parse_mapping, write_termination_log,
};

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The new data directory (must be empty or absent)
    pub dest: PathBuf,
    /// Backup id, or LATEST for the newest that fits the target
    #[arg(long, value_name = "ID|LATEST")]
    pub backup: Option<String>,
    /// Recover up to this time, e.g. 2026-11-24T01:30:00Z (a time zone is required)
    #[arg(long, value_name = "TIME", group = "target")]
    pub target_time: Option<String>,
    /// Recover up to this WAL position, e.g. 0/3000060
    #[arg(long, value_name = "LSN", group = "target")]
    pub target_lsn: Option<String>,
    /// Recover up to this restore point (pg_create_restore_point)
    #[arg(long, value_name = "NAME", group = "target")]
    pub target_name: Option<String>,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
    /// Timeline to follow: latest, current, or a number
    #[arg(long, default_value = "latest", value_name = "TIMELINE")]
    pub target_timeline: String,
    /// What to do at the target
    #[arg(long, default_value = "promote", value_parser = ["promote", "pause", "shutdown"])]
    pub target_action: String,
    /// Set up a standby (follower) instead of a one-off recovery
    #[arg(long)]
    pub standby: bool,
    /// primary_conninfo for a streaming standby
    #[arg(long, value_name = "CONNINFO", requires = "standby")]
    pub primary_conninfo: Option<String>,
    /// Restore the tablespace at OLDDIR into NEWDIR (repeatable)
    #[arg(long, value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
    pub tablespace_mapping: Vec<(String, String)>,
    /// restore_command to write [default: this walden binary with the storage settings]
    #[arg(long, value_name = "COMMAND")]
    pub restore_command: Option<String>,
    /// Parts downloaded and unpacked at once
    #[arg(long, env = "WALDEN_RESTORE_PARALLELISM", default_value_t = default_parallelism(), value_name = "N")]
    pub parallelism: usize,
    /// A non-empty DEST: fail, or skip when it holds a finished restore of the same
    /// source and target (a half-finished one is redone; anything else is refused)
    #[arg(
        long,
        env = wenv::RESTORE_IF_RESTORED,
        value_enum,
        default_value = "fail"
    )]
    pub if_restored: IfRestored,
    /// Also write the outcome here: the reason of a failure, or "restored backup ID"
    /// (Kubernetes' terminationMessagePath, read by the operator)
    #[arg(long, env = wenv::TERMINATION_LOG, value_name = "PATH")]
    pub termination_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ProofArgs {
    /// The restored data directory
    #[arg(long, env = "PGDATA", value_name = "DIR")]
    pub pgdata: PathBuf,
    /// Private directory for the server's socket and the proof's files
    #[arg(long, env = wenv::RESTORE_TEST_SOCKET_DIR, value_name = "DIR")]
    pub socket_dir: PathBuf,
    /// Role the checks run as (the source's superuser)
    #[arg(long, env = wenv::RESTORE_TEST_USER, default_value = "postgres")]
    pub user: String,
    /// Database the checks run in
    #[arg(long, env = wenv::RESTORE_TEST_DATABASE, default_value = "postgres")]
    pub database: String,
    /// SQL checks, a JSON array of {"name": ..., "sql": ...}
    #[arg(
        long,
        env = wenv::RESTORE_TEST_CHECKS,
        default_value = "[]",
        value_name = "JSON"
    )]
    pub checks: String,
    /// Run pg_amcheck on every database
    #[arg(long, env = wenv::RESTORE_TEST_AMCHECK, default_value_t = true, action = clap::ArgAction::Set)]
    pub amcheck: bool,
    /// Directory of postgres and pg_amcheck [default: found on PATH]
    #[arg(long, env = "WALDEN_PG_BIN", value_name = "DIR")]
    pub pg_bin: Option<PathBuf>,
    /// Seconds recovery may take
    #[arg(
        long,
        env = wenv::RESTORE_TEST_TIMEOUT,
        default_value_t = 3600,
        value_name = "SECONDS"
    )]
    pub timeout: u64,
    /// Also write the report here (Kubernetes' terminationMessagePath, read by the operator)
    #[arg(long, env = wenv::TERMINATION_LOG, value_name = "PATH")]
    pub termination_log: Option<PathBuf>,
}

pub async fn restore(settings: &Settings, args: RestoreArgs) -> ExitCode {
    let RestoreArgs {
        dest,
        backup,
        target_time,
        target_lsn,
        target_name,
        target_exclusive,
        target_timeline,
        target_action,
        standby,
        primary_conninfo,
        tablespace_mapping,
        restore_command,
        parallelism,
        if_restored,
        termination_log,
    } = args;
    let result = async {
        let target = restore::target_from(
            target_time.as_deref(),
            target_lsn.as_deref(),
            target_name.as_deref(),
        )
        .map_err(anyhow::Error::msg)?;
        restore::settings::check_timeline(&target_timeline).map_err(anyhow::Error::msg)?;
        let storage = settings.open_storage().await?;
        let restore_command = match restore_command {
            Some(c) => c,
            None => restore::default_restore_command(
                &std::env::current_exe()?,
                &storage.url(),
                settings.s3_endpoint.as_deref(),
                settings.s3_path_style,
                settings.encryption_key_file.as_deref(),
            ),
        };
        let opts = RestoreOptions {
            dest,
            backup,
            recovery: RecoverySettings {
                restore_command,
                target,
                inclusive: !target_exclusive,
                timeline: target_timeline,
                action: target_action,
                standby,
                primary_conninfo,
            },
            tablespace_mapping,
            parallelism,
            retry: settings.retry_policy(),
            if_restored,
        };
        restore::restore(storage, &opts)
            .await
            .map_err(anyhow::Error::from)
            .map(|r| (r, opts))
    }
    .await;
    match result {
        Ok((Outcome::AlreadyRestored { marker, adopted }, opts)) => {
            if let (Some(path), Some(id)) = (&termination_log, &marker.restored_backup) {
                write_termination_log(
                    path,
                    &format!("restored backup {id} earlier; this run stepped aside"),
                );
            }
            println!(
                "{} already holds this restore ({} from {}{}); nothing to do{}",
                opts.dest.display(),
                marker.identity.target,
                marker.identity.source,
                marker
                    .restored_backup
                    .map(|b| format!(", backup {b}"))
                    .unwrap_or_default(),
                if adopted {
                    " (restored before markers existed: marker written)"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Ok((Outcome::Restored(r), opts)) => {
            if let Some(path) = &termination_log {
                write_termination_log(
                    path,
                    &format!(
                        "restored backup {} to {}",
                        r.backup.id, opts.recovery.target
                    ),
                );
            }
            for line in &r.cleared.removed {
                eprintln!("walden restore: removed from the backup, so only this restore's recovery settings apply: {line}");
            }
            for line in &r.cleared.overridden {
                eprintln!("walden restore: postgresql.conf sets {line}; overridden in postgresql.auto.conf");
            }
            let needs = needs_env(settings);
            println!(
                "restored backup {} into {}: {} files, {} in {:.1}s; {} written, recovery target: {}. Start it with: pg_ctl -D {} start{}",
                r.backup.id,
                opts.dest.display(),
                r.files,
                human(r.bytes),
                r.seconds,
                opts.recovery.signal_file(),
                opts.recovery.target,
                opts.dest.display(),
                needs
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            if let Some(path) = &termination_log {
                write_termination_log(path, &format!("restore: {e:#}"));
            }
            fail("restore", e)
        }
    }
}

pub async fn restore_test(args: ProofArgs) -> ExitCode {
    let ProofArgs {
        pgdata,
        socket_dir,
        user,
        database,
        checks,
        amcheck,
        pg_bin,
        timeout,
        termination_log,
    } = args;
    let checks = match proof::parse_checks(&checks) {
        Ok(c) => c,
        Err(e) => return fail("restore-test", anyhow::anyhow!(e)),
    };
    let opts = proof::Options {
        pgdata,
        socket_dir,
        port: 5432,
        user,
        database,
        checks,
        amcheck,
        pg_bin,
        timeout: Duration::from_secs(timeout),
    };
    let report = proof::run(&opts).await;
    let line = proof::to_line(&report);
    if let Some(path) = &termination_log {
        write_termination_log(path, &line);
    }
    println!("{line}");
    if report.passed {
        ExitCode::SUCCESS
    } else {
        tracing::error!("restore-test: {}", report.message);
        ExitCode::FAILURE
    }
}
