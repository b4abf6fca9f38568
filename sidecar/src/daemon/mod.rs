//! `walden daemon`: the sidecar. One process holding the storage client,
//! serving PostgreSQL's `wal-push`/`wal-fetch` over a unix socket (with
//! parallel archiving and prefetch) and the operator's HTTP API.

pub mod archiver;
pub mod auth;
pub mod backup;
pub mod continuity;
pub mod http;
pub mod listen;
pub mod metered;
pub mod metrics;
pub mod postgres;
pub mod prefetch;
pub mod protocol;
pub mod socket;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use walden_contract::pod::env as wenv;

use anyhow::Context;
use clap::Args;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::config::Settings;
use crate::wal::PushOptions;

/// Settings of `walden daemon` (flags override the variables).
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Unix socket for wal-push / wal-fetch clients
    #[arg(long, env = wenv::SOCKET, default_value = walden_contract::pod::SOCKET)]
    pub socket: PathBuf,

    /// HTTP address of the API and metrics
    #[arg(long, env = wenv::LISTEN, default_value_t = std::net::SocketAddr::from(([127, 0, 0, 1], walden_contract::pod::DAEMON_PORT)))]
    pub listen: SocketAddr,

    /// File holding the bearer token required under /v1 (without it, /v1 answers 401)
    #[arg(long, env = wenv::TOKEN_FILE, value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Seconds the token a changed token file replaced is still accepted (a rotated Secret reaches callers and the mounted file at different times)
    #[arg(long, env = "WALDEN_TOKEN_GRACE", default_value_t = 300)]
    pub token_grace: u64,

    /// Directory for the archive log (what was stored; survives daemon restarts)
    #[arg(long, env = "WALDEN_STATE_DIR", default_value = "/walden/run/state")]
    pub state_dir: PathBuf,

    /// Directory for prefetched WAL (default: <state-dir>/prefetch; the daemon's own files there are removed at start)
    #[arg(long, env = "WALDEN_PREFETCH_DIR", value_name = "PATH")]
    pub prefetch_dir: Option<PathBuf>,

    /// WAL uploads running at once (the requested file plus the next .ready ones)
    #[arg(long, env = "WALDEN_ARCHIVE_PARALLELISM", default_value_t = 4)]
    pub archive_parallelism: usize,

    /// Segments downloaded ahead of PostgreSQL's requests during recovery (0 = off)
    #[arg(long, env = "WALDEN_PREFETCH", default_value_t = 8)]
    pub prefetch: usize,

    /// PostgreSQL data directory, for the archive backlog before the first push and the role when PostgreSQL is down
    #[arg(long, env = "PGDATA", value_name = "DIR")]
    pub pgdata: Option<PathBuf>,

    /// Seconds to let running uploads finish on SIGTERM before abandoning them
    #[arg(long, env = "WALDEN_SHUTDOWN_TIMEOUT", default_value_t = 20)]
    pub shutdown_timeout: u64,

    /// Shell command run instead of `walden backup-push` for POST /v1/backups
    #[arg(long, env = "WALDEN_BACKUP_COMMAND", value_name = "COMMAND")]
    pub backup_command: Option<String>,

    /// After each successful API backup, keep the newest N full backups (walden retain --full)
    #[arg(long, env = wenv::RETENTION_FULL, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub retention_full: Option<u64>,

    /// After each successful API backup, keep this recovery window (walden retain --window)
    #[arg(long, env = wenv::RETENTION_WINDOW, value_name = "DURATION", value_parser = crate::retention::parse_duration)]
    pub retention_window: Option<chrono::Duration>,

    /// HTTP connections open at once (also kept below half the descriptor limit)
    #[arg(
        long,
        env = "WALDEN_HTTP_MAX_CONNECTIONS",
        default_value_t = 64,
        value_name = "N"
    )]
    pub http_max_connections: usize,

    /// Seconds a client has to send a request's header (also the idle time allowed between requests)
    #[arg(long, env = "WALDEN_HTTP_HEADER_TIMEOUT", default_value_t = 10, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub http_header_timeout: u64,

    /// Seconds between full re-checks of the archive's continuity from the oldest backup (between them, only new WAL is listed)
    #[arg(long, env = "WALDEN_CONTINUITY_RECHECK", default_value_t = 600, value_name = "SECONDS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub continuity_recheck: u64,

    /// Grace period of retention for backup folders without backup.json (walden retain --grace)
    #[arg(long, env = "WALDEN_RETENTION_GRACE", value_name = "DURATION", default_value = crate::retention::DEFAULT_GRACE,
          value_parser = crate::retention::parse_duration)]
    pub retention_grace: chrono::Duration,
}

impl DaemonArgs {
    /// The `walden retain` arguments of the configured policy, if any.
    pub fn retain_args(&self) -> Option<Vec<String>> {
        use crate::retention::format_duration;
        if self.retention_full.is_none() && self.retention_window.is_none() {
            return None;
        }
        let mut args = Vec::new();
        if let Some(n) = self.retention_full {
            args.extend(["--full".to_string(), n.to_string()]);
        }
        if let Some(w) = self.retention_window {
            args.extend(["--window".to_string(), format_duration(w)]);
        }
        args.extend(["--grace".to_string(), format_duration(self.retention_grace)]);
        Some(args)
    }

    /// What children are told: the storage settings and PGDATA as resolved here.
    pub fn children(&self, settings: &Settings) -> backup::Children {
        let mut env = settings.to_env();
        env.push((
            "PGDATA",
            self.pgdata.as_ref().map(|p| p.display().to_string()),
        ));
        // The policy travels as arguments; children must not read a second one.
        env.push(("WALDEN_RETENTION_FULL", None));
        env.push(("WALDEN_RETENTION_WINDOW", None));
        env.push(("WALDEN_RETENTION_GRACE", None));
        backup::Children {
            env,
            retain: self.retain_args(),
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(settings: Settings, args: DaemonArgs) -> anyhow::Result<()> {
    let mut registry = Registry::with_prefix("walden");
    let metrics = metrics::Metrics::new(&mut registry);
    let storage = settings.open_storage().await?;
    let storage: Arc<dyn crate::storage::Storage> = Arc::new(metered::Metered::new(
        storage,
        metrics.storage_uploaded_bytes.clone(),
        metrics.storage_downloaded_bytes.clone(),
    ));
    // The archive log only speaks for the repository it was written for.
    let repository = match crate::repo::load(storage.as_ref()).await {
        Ok(id) => id.map(|id| {
            state::repository(
                &storage.url(),
                settings.s3_endpoint.as_deref(),
                &id.system_identifier,
            )
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the repository identity; not trusting the archive log");
            None
        }
    };
    let log = tokio::task::spawn_blocking({
        let dir = args.state_dir.clone();
        move || state::ArchivedLog::open(&dir, repository.as_deref())
    })
    .await??;
    tracing::info!(state = %args.state_dir.display(), remembered = log.len(), "archive log loaded");
    let archiver = archiver::Archiver::new(
        storage.clone(),
        args.pgdata.as_ref().map(|d| d.join("pg_wal")),
        settings.s3_endpoint.clone(),
        PushOptions {
            seal: settings.seal_options(),
            retry: settings.retry_policy(),
        },
        args.archive_parallelism,
        log,
        metrics.clone(),
    );
    let prefetch_dir = args
        .prefetch_dir
        .clone()
        .unwrap_or_else(|| args.state_dir.join("prefetch"));
    let prefetcher = prefetch::Prefetcher::new(
        storage.clone(),
        settings.fetch_options(),
        args.prefetch,
        prefetch_dir.clone(),
        metrics.clone(),
    )
    .with_context(|| {
        format!(
            "preparing the prefetch directory {}",
            prefetch_dir.display()
        )
    })?;
    let backups = backup::Backups::new(
        args.backup_command.clone(),
        args.children(&settings),
        storage.clone(),
        metrics.clone(),
    );
    if args.token_file.is_none() {
        tracing::warn!("no WALDEN_TOKEN_FILE: every /v1 request will be refused with 401");
    }
    let continuity = continuity::Continuity::new(
        storage.clone(),
        args.pgdata.as_ref().map(|d| d.join("pg_wal")),
        Duration::from_secs(args.continuity_recheck),
    );
    let observer = Arc::new(postgres::Observer::new(postgres::PgTarget::from_env()));
    let api = Arc::new(http::Api {
        archiver: archiver.clone(),
        backups: backups.clone(),
        continuity: continuity.clone(),
        pg: postgres::PgTarget::from_env(),
        observer: observer.clone(),
        pgdata: args.pgdata.clone(),
        token_file: args.token_file.clone(),
        tokens: std::sync::Mutex::new(auth::Tokens::default()),
        token_grace: std::time::Duration::from_secs(args.token_grace),
        registry,
        metrics: metrics.clone(),
    });

    let listener = socket::bind(&args.socket, args.pgdata.as_deref()).await?;
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(
        socket = %args.socket.display(),
        listen = %args.listen,
        storage = %storage.url(),
        read_only = settings.read_only,
        parallelism = args.archive_parallelism,
        prefetch = args.prefetch,
        "walden daemon ready"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let open = socket::Open::default();
    let socket_task = tokio::spawn(socket::serve(
        listener,
        args.socket.clone(),
        archiver.clone(),
        prefetcher.clone(),
        open.clone(),
        stop_rx.clone(),
    ));
    let limits = listen::Limits {
        max_connections: listen::cap_for(args.http_max_connections, listen::fd_limit()),
        header_timeout: Duration::from_secs(args.http_header_timeout),
    };
    tracing::info!(max_connections = limits.max_connections, header_timeout = ?limits.header_timeout, "HTTP limits");
    let http_task = tokio::spawn(listen::serve(
        tcp,
        http::router(api.clone()),
        limits,
        stop_rx.clone(),
    ));
    let catalog_task = tokio::spawn(backups.clone().refresh_forever());
    let watch_task = tokio::spawn(watch_postgres(observer, metrics.clone()));
    let continuity_task = tokio::spawn(continuity.run_forever(backups.clone(), archiver.clone()));

    shutdown_signal().await?;
    tracing::info!("shutting down: no new requests; waiting for running uploads");
    let _ = stop_tx.send(true);
    let _ = socket_task.await;
    archiver
        .shutdown(Duration::from_secs(args.shutdown_timeout))
        .await;
    // Let the requests whose uploads finished hear so (PostgreSQL then marks them done).
    let left = open.drain(Duration::from_secs(2)).await;
    if left > 0 {
        tracing::warn!(
            requests = left,
            "closing unanswered requests; their clients fail and PostgreSQL retries"
        );
    }
    prefetcher.clear();
    catalog_task.abort();
    watch_task.abort();
    continuity_task.abort();
    if tokio::time::timeout(Duration::from_secs(5), http_task)
        .await
        .is_err()
    {
        tracing::warn!("HTTP server did not stop within 5 s");
    }
    tracing::info!("walden daemon stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

/// Keeps the role and replay-lag gauges current between API calls.
async fn watch_postgres(pg: Arc<postgres::Observer>, metrics: metrics::Metrics) {
    loop {
        match pg.probe().await {
            Ok(p) => {
                metrics.postgres_in_recovery.set(i64::from(p.in_recovery));
                if let Some(r) = p.replay {
                    metrics.replay_lag_seconds.set(r.lag_seconds);
                    metrics.replay_lag_bytes.set(r.lag_bytes as i64);
                } else {
                    metrics.replay_lag_seconds.set(0.0);
                    metrics.replay_lag_bytes.set(0);
                }
            }
            Err(e) => tracing::debug!(error = %e, "PostgreSQL not reachable for replay metrics"),
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// Locks a mutex even if a thread panicked while holding it: the daemon's
/// shared state stays usable (each update is complete or not made), and a
/// panic in one request must not take every later one down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
