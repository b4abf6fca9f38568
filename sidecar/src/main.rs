//! `walden`: the command line PostgreSQL and operators call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use walden_contract::pod::env as wenv;

use clap::{Parser, Subcommand};
use std::time::Duration;

use walden::backup::{self, BackupOptions};
use walden::catalog;
use walden::client::{self, ClientArgs, FetchOutcome};
use walden::config::Settings;
use walden::daemon::DaemonArgs;
use walden::restore::{
    self, marker::IfRestored, proof, settings::RecoverySettings, Outcome, RestoreOptions,
};
use walden::wal::{self, PushOptions};
use walden::{retention, verify};

/// Exit status of `wal-fetch` when the file is definitively not in the archive:
/// PostgreSQL then ends archive recovery (or, on a standby, tries streaming).
const EXIT_NOT_FOUND: u8 = 1;
/// Exit status of `wal-fetch` for every other failure. PostgreSQL treats a
/// status above 125 as fatal and aborts recovery instead of ending it early
/// at the wrong point (safety invariant 4).
const EXIT_FETCH_FAILED: u8 = 254;
/// Exit status of `verify` when it ran and found problems (1: it could not run).
const EXIT_PROBLEMS_FOUND: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "walden",
    version,
    about = "Continuous protection for PostgreSQL: WAL archiving, base backups and restores to object storage",
    long_about = "Continuous protection for PostgreSQL: WAL archiving, base backups and restores to object storage.\n\n\
        Settings come from flags or the environment (WALDEN_STORAGE, WALDEN_S3_ENDPOINT, ...; AWS_* for S3 \
        credentials and region). In postgresql.conf:\n\n  \
        archive_mode = on\n  \
        archive_command = 'walden wal-push %p'\n  \
        restore_command = 'walden wal-fetch %f %p'"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,

    /// Log format on stderr: text or json (WALDEN_LOG sets the level filter, e.g. debug)
    #[arg(long, env = "WALDEN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    log_format: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Archive one WAL file: use as archive_command = 'walden wal-push %p'
    #[command(
        long_about = "Archive one WAL file; PostgreSQL's archive_command = 'walden wal-push %p'.\n\n\
        Exits 0 only once the file is durably stored (or the archive already holds identical content). \
        Exits non-zero if storage fails, if the segment belongs to another database than the archive, \
        or if the archive holds different content under the same name; PostgreSQL then keeps the file \
        and retries, so nothing is lost."
    )]
    WalPush {
        /// Path of the WAL file (%p), relative to the data directory or absolute
        path: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Restore one WAL file: use as restore_command = 'walden wal-fetch %f %p'
    #[command(
        long_about = "Restore one WAL file; PostgreSQL's restore_command = 'walden wal-fetch %f %p'.\n\n\
        Exit status: 0 restored and verified; 1 the file is not in the archive (PostgreSQL then ends \
        recovery or switches to streaming); 254 anything else (storage unreachable after retries, wrong \
        credentials, a corrupt object), which makes PostgreSQL stop recovery rather than end it early \
        at the wrong point."
    )]
    WalFetch {
        /// Name of the WAL file PostgreSQL wants (%f)
        name: String,
        /// Where to write it (%p), relative to the data directory or absolute
        dest: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Run the sidecar: unix socket for wal-push/wal-fetch, parallel archiving, prefetch, HTTP API
    #[command(long_about = "Run the sidecar daemon.\n\n\
        wal-push and wal-fetch delegate to it when WALDEN_SOCKET is set. On a push it also uploads the \
        next .ready segments in parallel and remembers what it stored (WALDEN_STATE_DIR), so PostgreSQL's \
        next calls return at once; on a fetch it downloads the next segments of the same timeline ahead. \
        The HTTP API (WALDEN_LISTEN) serves /healthz, /metrics and, with the bearer token of \
        WALDEN_TOKEN_FILE, /v1/status, /v1/backups and /v1/promote. SIGTERM lets running uploads finish.")]
    Daemon(DaemonArgs),
    /// Take a base backup of a running server (pg_backup_start/stop over libpq)
    #[command(
        long_about = "Take a hot base backup of a running PostgreSQL server.\n\n\
        Connects with the libpq settings (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE) or --pg-conninfo, \
        runs pg_backup_start, streams the data directory as compressed tar parts to storage in parallel, \
        runs pg_backup_stop, waits until the WAL that makes the backup consistent is archived, and only \
        then writes backup.json: a backup is listed only when it can be restored. Must run where the \
        data directory is mounted (read-only is enough)."
    )]
    BackupPush {
        /// The server's data directory on disk [default: the server's data_directory]
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: Option<PathBuf>,
        /// libpq connection string, e.g. "host=127.0.0.1 port=5432 user=postgres"
        #[arg(long, env = "WALDEN_PG_CONNINFO", value_name = "CONNINFO")]
        pg_conninfo: Option<String>,
        /// Parts built and uploaded at once
        #[arg(long, env = "WALDEN_BACKUP_PARALLELISM", default_value_t = default_parallelism(), value_name = "N")]
        parallelism: usize,
        /// Uncompressed size at which a part is closed, in MiB
        #[arg(
            long,
            env = "WALDEN_BACKUP_PART_SIZE_MB",
            default_value_t = 256,
            value_name = "MIB"
        )]
        part_size_mb: u64,
        /// How long to wait for the backup's last WAL segment to be archived, in seconds
        #[arg(
            long,
            env = "WALDEN_BACKUP_WAL_WAIT",
            default_value_t = 300,
            value_name = "SECONDS"
        )]
        wal_wait: u64,
        /// Do not check that the backup's WAL reached this archive (only when WAL is
        /// archived somewhere else: such a backup cannot be restored from this archive alone)
        #[arg(long, env = "WALDEN_BACKUP_NO_ARCHIVE_CHECK", value_parser = clap::builder::BoolishValueParser::new())]
        no_archive_check: bool,
        /// Print the new backup's manifest as JSON on stdout
        #[arg(long)]
        json: bool,
        /// The backup's id [default: its start time, e.g. 20261203T030000Z]; the daemon
        /// passes its job id, so the API, the operator's status and Events name the
        /// backup in storage. An id already in the archive is refused.
        #[arg(long, env = "WALDEN_BACKUP_ID", value_name = "ID")]
        id: Option<String>,
    },
    /// List base backups and the recoverable window
    BackupList {
        /// Stable JSON output: {"backups":[...],"window":{...}}
        #[arg(long)]
        json: bool,
    },
    /// Restore a base backup into an empty directory, set up to recover to a target
    #[command(
        long_about = "Restore a base backup into an empty directory, ready for `pg_ctl start`.\n\n\
        Picks the newest backup that can reach the target (or the one given with --backup), downloads and \
        unpacks its parts in parallel, verifies every checksum, and writes the recovery settings: \
        recovery.signal (or standby.signal with --standby), restore_command using walden wal-fetch, \
        recovery_target_* and recovery_target_timeline. Without a target, recovery replays the whole archive."
    )]
    Restore {
        /// The new data directory (must be empty or absent)
        dest: PathBuf,
        /// Backup id, or LATEST for the newest that fits the target
        #[arg(long, value_name = "ID|LATEST")]
        backup: Option<String>,
        /// Recover up to this time, e.g. 2026-11-24T01:30:00Z (a time zone is required)
        #[arg(long, value_name = "TIME", group = "target")]
        target_time: Option<String>,
        /// Recover up to this WAL position, e.g. 0/3000060
        #[arg(long, value_name = "LSN", group = "target")]
        target_lsn: Option<String>,
        /// Recover up to this restore point (pg_create_restore_point)
        #[arg(long, value_name = "NAME", group = "target")]
        target_name: Option<String>,
        /// Stop just before the target instead of just after it
        #[arg(long)]
        target_exclusive: bool,
        /// Timeline to follow: latest, current, or a number
        #[arg(long, default_value = "latest", value_name = "TIMELINE")]
        target_timeline: String,
        /// What to do at the target
        #[arg(long, default_value = "promote", value_parser = ["promote", "pause", "shutdown"])]
        target_action: String,
        /// Set up a standby (follower) instead of a one-off recovery
        #[arg(long)]
        standby: bool,
        /// primary_conninfo for a streaming standby
        #[arg(long, value_name = "CONNINFO", requires = "standby")]
        primary_conninfo: Option<String>,
        /// Restore the tablespace at OLDDIR into NEWDIR (repeatable)
        #[arg(long, value_name = "OLDDIR=NEWDIR", value_parser = parse_mapping)]
        tablespace_mapping: Vec<(String, String)>,
        /// restore_command to write [default: this walden binary with the storage settings]
        #[arg(long, value_name = "COMMAND")]
        restore_command: Option<String>,
        /// Parts downloaded and unpacked at once
        #[arg(long, env = "WALDEN_RESTORE_PARALLELISM", default_value_t = default_parallelism(), value_name = "N")]
        parallelism: usize,
        /// A non-empty DEST: fail, or skip when it holds a finished restore of the same
        /// source and target (a half-finished one is redone; anything else is refused)
        #[arg(
            long,
            env = wenv::RESTORE_IF_RESTORED,
            value_enum,
            default_value = "fail"
        )]
        if_restored: IfRestored,
        /// Also write the outcome here: the reason of a failure, or "restored backup ID"
        /// (Kubernetes' terminationMessagePath, read by the operator)
        #[arg(long, env = wenv::TERMINATION_LOG, value_name = "PATH")]
        termination_log: Option<PathBuf>,
    },
    /// Prove a restore: start PostgreSQL on what `walden restore` wrote, follow recovery to its end, run pg_amcheck and SQL checks
    #[command(
        long_about = "Prove a restored data directory (the operator's scheduled restore proofs).\n\n\
        Starts PostgreSQL on DIR (written by walden restore) on a private unix socket only, with archiving \
        off, waits until recovery ends, records where it ended (LSN and time), runs pg_amcheck on every \
        database (heap and btree indexes) and each SQL check (its last row must be one true value), stops \
        the server, and prints one JSON report. Exit status: 0 the proof passed; 1 it failed (the report \
        says why: a hole, a corrupt segment, a target not in the archive, a failed check)."
    )]
    RestoreTest {
        /// The restored data directory
        #[arg(long, env = "PGDATA", value_name = "DIR")]
        pgdata: PathBuf,
        /// Private directory for the server's socket and the proof's files
        #[arg(long, env = wenv::RESTORE_TEST_SOCKET_DIR, value_name = "DIR")]
        socket_dir: PathBuf,
        /// Role the checks run as (the source's superuser)
        #[arg(long, env = wenv::RESTORE_TEST_USER, default_value = "postgres")]
        user: String,
        /// Database the checks run in
        #[arg(long, env = wenv::RESTORE_TEST_DATABASE, default_value = "postgres")]
        database: String,
        /// SQL checks, a JSON array of {"name": ..., "sql": ...}
        #[arg(
            long,
            env = wenv::RESTORE_TEST_CHECKS,
            default_value = "[]",
            value_name = "JSON"
        )]
        checks: String,
        /// Run pg_amcheck on every database
        #[arg(long, env = wenv::RESTORE_TEST_AMCHECK, default_value_t = true, action = clap::ArgAction::Set)]
        amcheck: bool,
        /// Directory of postgres and pg_amcheck [default: found on PATH]
        #[arg(long, env = "WALDEN_PG_BIN", value_name = "DIR")]
        pg_bin: Option<PathBuf>,
        /// Seconds recovery may take
        #[arg(
            long,
            env = wenv::RESTORE_TEST_TIMEOUT,
            default_value_t = 3600,
            value_name = "SECONDS"
        )]
        timeout: u64,
        /// Also write the report here (Kubernetes' terminationMessagePath, read by the operator)
        #[arg(long, env = wenv::TERMINATION_LOG, value_name = "PATH")]
        termination_log: Option<PathBuf>,
    },
    /// Delete backups beyond a retention policy and the WAL no retained backup needs
    #[command(
        long_about = "Delete backups beyond a retention policy and the WAL no retained backup needs.\n\n\
        --full N keeps the newest N backups (with --window too: whatever either keeps); --window DURATION (e.g. 7d, 36h) keeps every point of the last \
        DURATION restorable: every backup that finished inside it, plus the newest one that finished before \
        it on each timeline that can hold a point of it. WAL stays from the oldest retained backup's start \
        on, on its timeline and every later one; history files always stay. Backups are ordered by their \
        position in the WAL history (system, timeline, LSN), not by name. Each backup.json is deleted \
        before its parts, so an interrupted run leaves a consistent archive; run it again to finish.",
        group(clap::ArgGroup::new("policy").required(true).multiple(true).args(["full", "window"]))
    )]
    Retain {
        /// Keep the newest N full backups
        #[arg(long, env = wenv::RETENTION_FULL, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        full: Option<u64>,
        /// Keep every point of the last DURATION restorable (e.g. 7d, 36h, 1d12h, 90m)
        #[arg(long, env = wenv::RETENTION_WINDOW, value_name = "DURATION", value_parser = walden::retention::parse_duration)]
        window: Option<chrono::Duration>,
        /// Backup folders without backup.json are deleted only once nothing in them was stored
        /// for this long (a running backup renews its lease every 30 s)
        #[arg(long, env = "WALDEN_RETENTION_GRACE", value_name = "DURATION", default_value = retention::DEFAULT_GRACE,
              value_parser = walden::retention::parse_duration)]
        grace: chrono::Duration,
        /// Print what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        /// Stable JSON output on stdout (the plan, plus "deleted": the number of objects deleted)
        #[arg(long)]
        json: bool,
    },
    /// Check checksums, complete backups and WAL continuity across timelines
    #[command(long_about = "Check that the archive is whole and intact.\n\n\
        Streams every backup part and WAL file through its checksum (bounded memory), checks that every \
        part a backup lists exists with its recorded size and checksum, and that WAL is continuous from \
        each backup's start to the end of the archive along every timeline that passes through it \
        (gaps and missing timeline switches are named by segment). Exit status: 0 healthy, 2 problems \
        found, 1 the check could not run.")]
    Verify {
        /// Only this backup and the WAL it needs
        #[arg(long, value_name = "ID")]
        backup: Option<String>,
        /// Only WAL: checksums of every WAL file and continuity (skip backup parts)
        #[arg(long)]
        wal: bool,
        /// Objects checked at once
        #[arg(long, default_value_t = default_parallelism(), value_name = "N")]
        parallelism: usize,
        /// Stable JSON output on stdout: {"ok":..,"problems":[..],..}
        #[arg(long)]
        json: bool,
    },
    /// Copy this walden binary into a directory (used by the init container of pods)
    Install {
        /// Directory to copy the binary into, as <dir>/walden
        dir: PathBuf,
    },
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALDEN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

/// True when the command line asks for `wal-fetch`, even if it fails to parse.
fn is_wal_fetch() -> bool {
    std::env::args().skip(1).any(|a| a == "wal-fetch")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let usage_error = e.use_stderr();
            // A misconfigured restore_command must not look like "file not found".
            return if usage_error && is_wal_fetch() {
                ExitCode::from(EXIT_FETCH_FAILED)
            } else {
                ExitCode::from(e.exit_code() as u8)
            };
        }
    };
    init_logging(&cli.log_format);
    if let Some(code) = delegate(&cli.command) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walden: cannot start the async runtime: {e}");
            return ExitCode::from(if is_wal_fetch() { EXIT_FETCH_FAILED } else { 1 });
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let settings = cli.settings;
    match cli.command {
        Command::WalPush { path, .. } => {
            let result = async {
                let storage = settings.open_storage().await?;
                let opts = PushOptions {
                    seal: settings.seal_options(),
                    retry: settings.retry_policy(),
                };
                wal::push(storage.as_ref(), &path, &opts)
                    .await
                    .map_err(anyhow::Error::from)
            }
            .await;
            match result {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("wal-push {}: {}", path.display(), error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::WalFetch { name, dest, .. } => {
            let shown = short(&name);
            let storage = match settings.open_storage().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("wal-fetch {shown}: {e}");
                    return ExitCode::from(EXIT_FETCH_FAILED);
                }
            };
            let opts = settings.fetch_options();
            match wal::fetch(storage.as_ref(), &name, &dest, &opts).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) if e.is_not_found() => {
                    tracing::info!("wal-fetch {shown}: {e}");
                    ExitCode::from(EXIT_NOT_FOUND)
                }
                Err(e) => {
                    tracing::error!(
                        "wal-fetch {shown}: {e}; stopping recovery rather than ending it early"
                    );
                    ExitCode::from(EXIT_FETCH_FAILED)
                }
            }
        }
        Command::Daemon(args) => match walden::daemon::run(settings, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("daemon: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::BackupPush {
            pgdata,
            pg_conninfo,
            parallelism,
            part_size_mb,
            wal_wait,
            no_archive_check,
            json,
            id,
        } => {
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
                            m.id, m.file_count, human(m.logical_size), human(m.stored_size), m.parts.len(), m.start_lsn, m.stop_lsn
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail("backup-push", e),
            }
        }
        Command::BackupList { json } => match backup_list(&settings, json).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("backup-list", e),
        },
        Command::Restore {
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
        } => {
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
                    let needs = needs_env(&settings);
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
        Command::RestoreTest {
            pgdata,
            socket_dir,
            user,
            database,
            checks,
            amcheck,
            pg_bin,
            timeout,
            termination_log,
        } => {
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
        Command::Retain {
            full,
            window,
            grace,
            dry_run,
            json,
        } => {
            let policy = match (full, window) {
                (Some(n), Some(w)) => retention::Policy::Both {
                    full: n as usize,
                    window: w,
                },
                (Some(n), None) => retention::Policy::Full(n as usize),
                (None, Some(w)) => retention::Policy::Window(w),
                (None, None) => {
                    return fail("retain", anyhow::anyhow!("--full or --window is required"))
                }
            };
            match retain(&settings, policy, grace, dry_run, json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail("retain", e),
            }
        }
        Command::Verify {
            backup,
            wal,
            parallelism,
            json,
        } => {
            let opts = verify::VerifyOptions {
                backup,
                backups: !wal,
                wal_checksums: true,
                parallelism,
            };
            match run_verify(&settings, &opts, json).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(EXIT_PROBLEMS_FOUND),
                Err(e) => fail("verify", e),
            }
        }
        Command::Install { dir } => match install(&dir) {
            Ok(dest) => {
                tracing::info!("installed {}", dest.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("install into {}: {}", dir.display(), error_chain(&e));
                ExitCode::FAILURE
            }
        },
    }
}

/// The thin-client path: with WALDEN_SOCKET set, wal-push and wal-fetch ask
/// the daemon and never touch storage themselves (see [`walden::client`]).
fn delegate(command: &Command) -> Option<ExitCode> {
    match command {
        Command::WalPush { path, client } => {
            let opts = client.options()?;
            Some(match client::push(&opts, path) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("wal-push {}: {e}", path.display());
                    ExitCode::FAILURE
                }
            })
        }
        Command::WalFetch { name, dest, client } => {
            let opts = client.options()?;
            let shown = short(name);
            Some(match client::fetch(&opts, name, dest) {
                Ok(FetchOutcome::Restored { .. }) => ExitCode::SUCCESS,
                Ok(FetchOutcome::NotFound) => {
                    tracing::info!("wal-fetch {shown}: not in the archive");
                    ExitCode::from(EXIT_NOT_FOUND)
                }
                Err(e) => {
                    tracing::error!(
                        "wal-fetch {shown}: {e}; stopping recovery rather than ending it early"
                    );
                    ExitCode::from(EXIT_FETCH_FAILED)
                }
            })
        }
        _ => None,
    }
}

/// A name as given when it is short, else its start and length.
fn short(name: &str) -> String {
    if name.len() <= 80 {
        name.to_string()
    } else {
        restore::settings::echo(name)
    }
}

fn fail(what: &str, e: anyhow::Error) -> ExitCode {
    tracing::error!("{what}: {}", error_chain(&e));
    ExitCode::FAILURE
}

/// An error and its causes, each cause once: a message that already quotes
/// its source (`{path}: {source}`) is not followed by the source again.
fn error_chain(e: &anyhow::Error) -> String {
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
fn needs_env(settings: &Settings) -> String {
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
fn write_termination_log(path: &Path, message: &str) {
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    if let Err(e) = std::fs::write(path, &message[..end]) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the termination log");
    }
}

fn default_parallelism() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
}

fn parse_mapping(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((a, b)) if a.starts_with('/') && b.starts_with('/') => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err(format!("{s:?} is not OLDDIR=NEWDIR with absolute paths")),
    }
}

fn human(bytes: u64) -> String {
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

/// The stable JSON of `retain --json`: the plan plus what was done.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RetainJson<'a> {
    dry_run: bool,
    deleted: usize,
    #[serde(flatten)]
    plan: &'a retention::Plan,
}

async fn retain(
    settings: &Settings,
    policy: retention::Policy,
    grace: chrono::Duration,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let storage = settings.open_storage().await?;
    let plan = retention::plan_for(storage.as_ref(), policy, chrono::Utc::now(), grace).await?;
    if !json {
        let verb = if dry_run { "would delete" } else { "deleting" };
        println!(
            "retention in {}: {}{}",
            storage.url(),
            plan.policy,
            if dry_run {
                " (dry run: nothing is deleted)"
            } else {
                ""
            }
        );
        for k in &plan.kept_backups {
            println!("  keep    backup {} ({})", k.id, k.reason);
        }
        for id in &plan.deleted_backups {
            println!("  {verb} backup {id}");
        }
        for id in &plan.abandoned_backups {
            println!("  {verb} abandoned backup folder {id} (no backup.json, nothing stored in it for {})", retention::format_duration(grace));
        }
        for id in &plan.damaged_backups {
            println!("  keep    damaged backup folder {id} (its backup.json cannot be read; left for a person to look at)");
        }
        for id in &plan.in_progress_backups {
            println!(
                "  keep    backup folder {id} (no backup.json yet, recently written: in progress)"
            );
        }
        for (tli, seg) in &plan.wal_kept_from {
            println!("  keep    WAL of timeline {tli} from {seg} on (and every later timeline)");
        }
        println!("  {verb} {} WAL object(s)", plan.deleted_wal_objects);
        for t in &plan.stale_temporaries {
            println!("  {verb} leftover of an interrupted write: {}", t.key);
        }
    }
    let deleted = if dry_run {
        0
    } else {
        retention::execute(storage.as_ref(), &plan, &settings.retry_policy()).await?
    };
    if json {
        let out = RetainJson {
            dry_run,
            deleted,
            plan: &plan,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if dry_run {
        println!(
            "would delete {} object(s), {}",
            plan.delete.len(),
            human(plan.deleted_bytes)
        );
    } else {
        println!("deleted {deleted} object(s), {}", human(plan.deleted_bytes));
    }
    Ok(())
}

/// Runs the checks and prints the report; `Ok(false)` when problems were found.
async fn run_verify(
    settings: &Settings,
    opts: &verify::VerifyOptions,
    json: bool,
) -> anyhow::Result<bool> {
    let storage = settings.open_storage().await?;
    let report = verify::verify(storage.as_ref(), opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &report.timelines {
            let from = match (t.parent, t.switchpoint) {
                (Some(p), Some(s)) => format!(", branched from timeline {p} at {s}"),
                _ => String::new(),
            };
            println!(
                "timeline {}: {} segment(s) {} .. {}{from}",
                t.timeline,
                t.segments,
                t.first_segment.as_deref().unwrap_or("-"),
                t.last_segment.as_deref().unwrap_or("-")
            );
        }
        for p in &report.problems {
            println!("PROBLEM {:?} {}: {}", p.kind, p.object, p.message);
        }
        println!(
            "{}: {} backup(s), {} part(s), {} WAL object(s), {} checked; {} problem(s)",
            if report.ok { "OK" } else { "FAILED" },
            report.backups_checked,
            report.parts_checked,
            report.wal_objects_checked,
            human(report.bytes_checked),
            report.problems.len()
        );
    }
    Ok(report.ok)
}

/// Copies the running binary to `<dir>/walden` atomically, executable by all.
fn install(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    use std::os::unix::fs::PermissionsExt;
    let me = std::env::current_exe().context("locating the running walden binary")?;
    let dest = dir.join("walden");
    let tmp = dir.join(".walden.tmp");
    std::fs::copy(&me, &tmp)
        .with_context(|| format!("copying {} to {}", me.display(), tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("making {} executable", tmp.display()))?;
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}
