//! `walden`: the command line PostgreSQL and operators call.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walden::client::{self, ClientArgs, FetchOutcome};
use walden::config::Settings;
use walden::daemon::DaemonArgs;
use walden::wal::{self, FetchOptions, PushOptions};

/// Exit status of `wal-fetch` when the file is definitively not in the archive:
/// PostgreSQL then ends archive recovery (or, on a standby, tries streaming).
const EXIT_NOT_FOUND: u8 = 1;
/// Exit status of `wal-fetch` for every other failure. PostgreSQL treats a
/// status above 125 as fatal and aborts recovery instead of ending it early
/// at the wrong point (safety invariant 4).
const EXIT_FETCH_FAILED: u8 = 254;

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
                    tracing::error!("wal-push {}: {e:#}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Command::WalFetch { name, dest, .. } => {
            let storage = match settings.open_storage().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("wal-fetch {name}: {e}");
                    return ExitCode::from(EXIT_FETCH_FAILED);
                }
            };
            let opts = FetchOptions {
                retry: settings.retry_policy(),
            };
            match wal::fetch(storage.as_ref(), &name, &dest, &opts).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) if e.is_not_found() => {
                    tracing::info!("wal-fetch {name}: {e}");
                    ExitCode::from(EXIT_NOT_FOUND)
                }
                Err(e) => {
                    tracing::error!(
                        "wal-fetch {name}: {e}; stopping recovery rather than ending it early"
                    );
                    ExitCode::from(EXIT_FETCH_FAILED)
                }
            }
        }
        Command::Daemon(args) => match walden::daemon::run(settings, args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("daemon: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Install { dir } => match install(&dir) {
            Ok(dest) => {
                tracing::info!("installed {}", dest.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("install into {}: {e:#}", dir.display());
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
            Some(match client::fetch(&opts, name, dest) {
                Ok(FetchOutcome::Restored { .. }) => ExitCode::SUCCESS,
                Ok(FetchOutcome::NotFound) => {
                    tracing::info!("wal-fetch {name}: not in the archive");
                    ExitCode::from(EXIT_NOT_FOUND)
                }
                Err(e) => {
                    tracing::error!(
                        "wal-fetch {name}: {e}; stopping recovery rather than ending it early"
                    );
                    ExitCode::from(EXIT_FETCH_FAILED)
                }
            })
        }
        _ => None,
    }
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
