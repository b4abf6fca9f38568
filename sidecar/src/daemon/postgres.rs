//! The daemon's libpq connection to its PostgreSQL (standard `PG*`
//! variables): role, replay position and lag, and promotion.

use std::time::Duration;

use tokio_postgres::{Client, Config};

use crate::pg::{self, PgError};

/// Status and promotion must answer quickly, whatever PGCONNECT_TIMEOUT says.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("invalid PostgreSQL connection settings: {0}")]
    Config(String),
    #[error("connecting to PostgreSQL timed out after {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Unavailable(String),
}

/// Where and as whom to connect: the libpq variables (`PGHOST`, `PGPORT`,
/// `PGUSER`, `PGPASSWORD`, `PGDATABASE`, ...) as [`crate::pg`] reads them.
#[derive(Debug, Clone)]
pub struct PgTarget {
    config: Result<Config, String>,
}

impl PgTarget {
    pub fn from_env() -> Self {
        Self {
            config: pg::config(None).map_err(|e| e.to_string()),
        }
    }

    async fn connect(&self) -> Result<Client, LocalPgError> {
        let config = self
            .config
            .as_ref()
            .map_err(|e| LocalPgError::Config(e.clone()))?;
        Ok(tokio::time::timeout(CONNECT_TIMEOUT, pg::connect(config))
            .await
            .map_err(|_| LocalPgError::Timeout(CONNECT_TIMEOUT))??)
    }

    /// Promotes a standby and waits (up to 60 s) until it accepts writes.
    pub async fn promote(&self) -> Result<Promotion, LocalPgError> {
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

/// Role; on a standby, replay position, lag and whether it streams; on a
/// server that went through archive recovery, where recovery ended.
pub async fn probe_on(client: &Client) -> Result<Probe, LocalPgError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), \
                    coalesce(pg_last_wal_replay_lsn()::text, ''), \
                    coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8, 0), \
                    greatest(coalesce(pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()), 0), 0)::float8, \
                    coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false), \
                    coalesce(to_char(pg_last_xact_replay_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), '')",
            &[],
        )
        .await
        .map_err(|source| PgError::Query {
            what: "reading the recovery state",
            source,
        })?;
    let in_recovery: bool = row.get(0);
    let replay_lsn: String = row.get(1);
    let replay_time: String = row.get(5);
    let replay = in_recovery.then(|| Replay {
        replay_lsn: replay_lsn.clone(),
        lag_seconds: row.get::<_, f64>(2).max(0.0),
        lag_bytes: row.get::<_, f64>(3).max(0.0) as u64,
        streaming: row.get(4),
    });
    // After recovery PostgreSQL keeps the last replayed position (NULL
    // when the server never ran archive recovery).
    let recovered_to = (!in_recovery && !replay_lsn.is_empty()).then(|| RecoveredTo {
        lsn: replay_lsn,
        time: (!replay_time.is_empty()).then_some(replay_time),
    });
    Ok(Probe {
        in_recovery,
        replay,
        recovered_to,
    })
}

/// How long one probe answers every status request and metrics update.
const FRESH: Duration = Duration::from_secs(1);

/// The daemon's one observer of PostgreSQL: a single connection, reopened
/// when it breaks, shared by `/v1/status` and the metrics loop. Concurrent
/// callers wait for the same probe, and a probe (or a failure) younger than
/// [`FRESH`] is reused, so no number of API calls opens more connections.
pub struct Observer {
    target: PgTarget,
    state: tokio::sync::Mutex<ObserverState>,
}

#[derive(Default)]
struct ObserverState {
    client: Option<Client>,
    last: Option<(std::time::Instant, Result<Probe, String>)>,
}

impl Observer {
    pub fn new(target: PgTarget) -> Self {
        Self {
            target,
            state: tokio::sync::Mutex::new(ObserverState::default()),
        }
    }

    pub async fn probe(&self) -> Result<Probe, LocalPgError> {
        let mut state = self.state.lock().await;
        if let Some((at, last)) = &state.last {
            if at.elapsed() < FRESH {
                return last.clone().map_err(LocalPgError::Unavailable);
            }
        }
        let result = self.probe_now(&mut state).await;
        state.last = Some((
            std::time::Instant::now(),
            result
                .as_ref()
                .map(Probe::clone)
                .map_err(ToString::to_string),
        ));
        result
    }

    /// Forgets the last probe: after a promotion through the API, status must
    /// not report the role from before it.
    pub async fn invalidate(&self) {
        self.state.lock().await.last = None;
    }

    async fn probe_now(&self, state: &mut ObserverState) -> Result<Probe, LocalPgError> {
        let client = match state.client.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.target.connect().await?,
        };
        let result = tokio::time::timeout(CONNECT_TIMEOUT, probe_on(&client))
            .await
            .map_err(|_| LocalPgError::Timeout(CONNECT_TIMEOUT))?;
        // Keep the connection only while it answers.
        if result.is_ok() {
            state.client = Some(client);
        }
        result
    }
}

#[derive(Debug, Clone)]
pub struct Probe {
    pub in_recovery: bool,
    pub replay: Option<Replay>,
    pub recovered_to: Option<RecoveredTo>,
}

/// Where a finished recovery stopped: last replayed LSN and commit time.
#[derive(Debug, Clone)]
pub struct RecoveredTo {
    pub lsn: String,
    pub time: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Replay {
    pub replay_lsn: String,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
    /// A WAL receiver streams from the primary (else WAL comes from the archive).
    pub streaming: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promotion {
    Promoted,
    NotStandby,
    /// pg_promote() gave up waiting; the promotion may still complete.
    TimedOut,
}
