//! The daemon's libpq connection to its PostgreSQL (standard `PG*`
//! variables): role, replay position and lag, and promotion.

use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("connecting to PostgreSQL ({target}): {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("connecting to PostgreSQL ({target}): timed out after {CONNECT_TIMEOUT:?}")]
    Timeout { target: String },
    #[error("{what}: {source}")]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
}

/// Where and as whom to connect, from `PGHOST`, `PGPORT`, `PGUSER`,
/// `PGPASSWORD`, `PGDATABASE` (libpq's names and defaults; no TLS: the
/// daemon talks to the server in its own pod).
#[derive(Debug, Clone)]
pub struct PgTarget {
    config: Config,
    describe: String,
}

impl PgTarget {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let host = var("PGHOST").unwrap_or_else(|| "localhost".into());
        let port = var("PGPORT")
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(5432);
        let user = var("PGUSER").unwrap_or_else(|| "postgres".into());
        let dbname = var("PGDATABASE").unwrap_or_else(|| user.clone());
        let mut config = Config::new();
        for h in host.split(',') {
            config.host(h);
        }
        config
            .port(port)
            .user(&user)
            .dbname(&dbname)
            .application_name("walden-daemon")
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(pw) = var("PGPASSWORD") {
            config.password(pw);
        }
        Self {
            config,
            describe: format!("host={host} port={port} user={user} dbname={dbname}"),
        }
    }

    async fn connect(&self) -> Result<Client, PgError> {
        let connecting = self.config.connect(NoTls);
        let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| PgError::Timeout {
                target: self.describe.clone(),
            })?
            .map_err(|source| PgError::Connect {
                target: self.describe.clone(),
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// Role and, on a standby, replay position and lag.
    pub async fn probe(&self) -> Result<Probe, PgError> {
        let client = self.connect().await?;
        let row = client
            .query_one(
                "SELECT pg_is_in_recovery(), \
                        coalesce(pg_last_wal_replay_lsn()::text, ''), \
                        coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, 0), \
                        greatest(coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0), 0)::float8",
                &[],
            )
            .await
            .map_err(|source| PgError::Query {
                what: "reading the recovery state",
                source,
            })?;
        let in_recovery: bool = row.get(0);
        let replay = in_recovery.then(|| Replay {
            replay_lsn: row.get(1),
            lag_seconds: row.get::<_, f64>(2).max(0.0),
            lag_bytes: row.get::<_, f64>(3).max(0.0) as u64,
        });
        Ok(Probe {
            in_recovery,
            replay,
        })
    }

    /// Promotes a standby and waits (up to 60 s) until it accepts writes.
    pub async fn promote(&self) -> Result<Promotion, PgError> {
        let client = self.connect().await?;
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(|source| PgError::Query {
                what: "checking the role",
                source,
            })?
            .get(0);
        if !in_recovery {
            return Ok(Promotion::NotStandby);
        }
        let promoted: bool = client
            .query_one("SELECT pg_promote(true, 60)", &[])
            .await
            .map_err(|source| PgError::Query {
                what: "pg_promote()",
                source,
            })?
            .get(0);
        Ok(if promoted {
            Promotion::Promoted
        } else {
            Promotion::TimedOut
        })
    }
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub in_recovery: bool,
    pub replay: Option<Replay>,
}

#[derive(Debug, Clone)]
pub struct Replay {
    pub replay_lsn: String,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Promoted,
    NotStandby,
    /// pg_promote() gave up waiting; the promotion may still complete.
    TimedOut,
}
