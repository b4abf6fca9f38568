//! The command line: clap's types, one file per group of commands, and the
//! dispatch. The engine (`walden::*`) knows nothing of it.

mod backup;
mod maintenance;
mod output;
mod restore;
mod wal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walden::client::{self, ClientArgs, FetchOutcome};
use walden::config::Settings;
use walden::daemon::DaemonArgs;

pub use output::EXIT_FETCH_FAILED;
use output::{error_chain, short, EXIT_NOT_FOUND};

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
pub struct Cli {
    #[command(flatten)]
    pub settings: Settings,

    /// Log format on stderr: text or json (WALDEN_LOG sets the level filter, e.g. debug)
    #[arg(long, env = "WALDEN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
    BackupPush(backup::PushArgs),
    /// List base backups and the recoverable window
    BackupList(backup::ListArgs),
    /// Restore a base backup into an empty directory, set up to recover to a target
    #[command(
        long_about = "Restore a base backup into an empty directory, ready for `pg_ctl start`.\n\n\
        Picks the newest backup that can reach the target (or the one given with --backup), downloads and \
        unpacks its parts in parallel, verifies every checksum, and writes the recovery settings: \
        recovery.signal (or standby.signal with --standby), restore_command using walden wal-fetch, \
        recovery_target_* and recovery_target_timeline. Without a target, recovery replays the whole archive."
    )]
    Restore(restore::RestoreArgs),
    /// Prove a restore: start PostgreSQL on what `walden restore` wrote, follow recovery to its end, run pg_amcheck and SQL checks
    #[command(
        long_about = "Prove a restored data directory (the operator's scheduled restore proofs).\n\n\
        Starts PostgreSQL on DIR (written by walden restore) on a private unix socket only, with archiving \
        off, waits until recovery ends, records where it ended (LSN and time), runs pg_amcheck on every \
        database (heap and btree indexes) and each SQL check (its last row must be one true value), stops \
        the server, and prints one JSON report. Exit status: 0 the proof passed; 1 it failed (the report \
        says why: a hole, a corrupt segment, a target not in the archive, a failed check)."
    )]
    RestoreTest(restore::ProofArgs),
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
    Retain(maintenance::RetainArgs),
    /// Check checksums, complete backups and WAL continuity across timelines
    #[command(long_about = "Check that the archive is whole and intact.\n\n\
        Streams every backup part and WAL file through its checksum (bounded memory), checks that every \
        part a backup lists exists with its recorded size and checksum, and that WAL is continuous from \
        each backup's start to the end of the archive along every timeline that passes through it \
        (gaps and missing timeline switches are named by segment). Exit status: 0 healthy, 2 problems \
        found, 1 the check could not run.")]
    Verify(maintenance::VerifyArgs),
    /// Copy this walden binary into a directory (used by the init container of pods)
    Install {
        /// Directory to copy the binary into, as <dir>/walden
        dir: PathBuf,
    },
}

pub async fn run(cli: Cli) -> ExitCode {
    let settings = cli.settings;
    match cli.command {
        Command::WalPush { path, .. } => wal::push(&settings, &path).await,
        Command::WalFetch { name, dest, .. } => wal::fetch(&settings, &name, &dest).await,
        Command::Daemon(args) => match walden::daemon::run(settings, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("daemon: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        },
        Command::BackupPush(args) => backup::push(&settings, args).await,
        Command::BackupList(args) => backup::list(&settings, args).await,
        Command::Restore(args) => restore::restore(&settings, args).await,
        Command::RestoreTest(args) => restore::restore_test(args).await,
        Command::Retain(args) => maintenance::retain(&settings, args).await,
        Command::Verify(args) => maintenance::verify(&settings, args).await,
        Command::Install { dir } => maintenance::install(&dir),
    }
}

/// The thin-client path: with WALDEN_SOCKET set, wal-push and wal-fetch ask
/// the daemon and never touch storage themselves (see [`walden::client`]).
pub fn delegate(command: &Command) -> Option<ExitCode> {
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
