//! `walden-operator`: `crdgen` prints the CRDs, `run` runs the controllers.

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use walden_operator::controllers::{self, Context};
use walden_operator::daemon_client::HttpDaemonClient;
use walden_operator::events::{Recorder, Reporter};
use walden_operator::fleet::{BackupGate, Failures, Fleet};
use walden_operator::leader::LeaderElector;
use walden_operator::metrics::Metrics;
use walden_operator::server::{self, ServerState};
use walden_operator::specs::OperatorConfig;

#[derive(Parser)]
#[command(
    name = "walden-operator",
    version,
    about = "Kubernetes operator for Walden"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions as YAML.
    Crdgen {
        /// Without CEL rules, for clusters before Kubernetes 1.25 (the
        /// operator then checks those rules itself).
        #[arg(long)]
        legacy: bool,
    },
    /// Run the controllers (with leader election).
    Run(RunArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Image holding /usr/local/bin/walden, used for init containers and sidecars.
    #[arg(long, env = "WALDEN_IMAGE")]
    walden_image: String,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "WALDEN_PROBE_ADDR", default_value = "0.0.0.0:8080")]
    probe_addr: SocketAddr,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "walden-system")]
    lease_namespace: String,
    #[arg(long, default_value = "walden-operator")]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Timeout of calls to sidecar daemons, in seconds.
    #[arg(long, default_value_t = 10)]
    daemon_timeout: u64,
    #[arg(long, value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,
    /// Reconciles running at once, per controller: bounds connections and
    /// memory when thousands of resources re-sync after a restart.
    #[arg(long, env = "WALDEN_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Base backups running at once across all ContinuousBackups; more wait.
    #[arg(long, env = "WALDEN_MAX_CONCURRENT_BACKUPS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    max_concurrent_backups: u64,
    /// The window scheduled backups are spread over after their scheduled
    /// time, per resource (spec.backupWindow overrides it), e.g. 1h, 30m.
    #[arg(long, env = "WALDEN_BACKUP_WINDOW", default_value = "1h", value_parser = walden_contract::duration::parse)]
    backup_window: chrono::Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crdgen { legacy } => {
            let yaml = if legacy {
                walden_operator::api::crds_yaml_legacy()
            } else {
                walden_operator::api::crds_yaml()
            };
            print!("{}", yaml.context("rendering CRDs")?);
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

/// Logs go to stdout; colours only on a terminal, never into `kubectl logs`.
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    walden_operator::install_crypto_provider();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = match args.identity {
        Some(id) => id,
        None => std::env::var("HOSTNAME").unwrap_or_else(|_| "walden-operator".to_string()),
    };
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(args.probe_addr)
        .await
        .with_context(|| format!("binding {}", args.probe_addr))?;
    let state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    tokio::spawn(async move {
        if let Err(e) = server::serve(listener, state).await {
            tracing::error!(error = %e, "probe server stopped");
        }
    });

    // The Lease has its own connection pool: renewals are never queued
    // behind a re-sync's reconciles, or throttled with them.
    let lease_client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API for the Lease")?;
    let elector = Arc::new(LeaderElector::new(
        lease_client,
        &args.lease_namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_seconds),
    ));
    tracing::info!(lease = %args.lease_name, identity = %identity, "waiting for leadership");
    elector.acquire().await;
    tracing::info!("leading");
    metrics.leader.set(1);
    ready.store(true, Ordering::Relaxed);

    let daemon = HttpDaemonClient::new(Duration::from_secs(args.daemon_timeout))
        .context("building the daemon HTTP client")?;
    let ctx = Arc::new(Context {
        client: client.clone(),
        daemon: Arc::new(daemon),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "walden-operator".into(),
                instance: Some(identity.clone()),
            },
        ),
        config: OperatorConfig {
            walden_image: args.walden_image,
        },
        clock: Arc::new(chrono::Utc::now),
        metrics: metrics.clone(),
        tokens: Arc::default(),
        fleet: Arc::new(Fleet {
            backups: BackupGate::new(
                usize::try_from(args.max_concurrent_backups).unwrap_or(usize::MAX),
            ),
            failures: Failures::default(),
            backup_window: args.backup_window,
            resumed: chrono::Utc::now(),
            concurrency: args.concurrency,
            jitter: true,
        }),
    });

    // Leadership lost, or a signal: stop reconciling and exit so that the
    // pod restarts as a follower of the Lease.
    let renewing = elector.clone();
    let lost = async move { renewing.hold().await };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let lost_leadership = Arc::new(AtomicBool::new(false));
    let lost_flag = lost_leadership.clone();
    let shutdown = async move {
        tokio::select! {
            _ = lost => lost_flag.store(true, Ordering::Relaxed),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
            _ = sigterm.recv() => tracing::info!("terminating"),
        }
    };
    controllers::run(ctx, shutdown).await;
    ready.store(false, Ordering::Relaxed);
    metrics.leader.set(0);
    if lost_leadership.load(Ordering::Relaxed) {
        // Exit non-zero: the pod restarts and competes for the Lease again.
        anyhow::bail!("leadership lost; controllers stopped");
    }
    elector.step_down().await;
    tracing::info!("controllers stopped");
    Ok(())
}
