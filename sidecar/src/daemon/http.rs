//! The HTTP API the operator talks to: `/healthz`, `/metrics`, and under
//! `/v1` (bearer token required) status, backups and promotion.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, SubsecRound, Utc};
use prometheus_client::registry::Registry;
use walden_contract::api::{
    ApiError, Archiving, BackupAccepted, BackupConflict, BackupInProgress, BackupJob, BackupState,
    Continuity, DaemonStatus, Promoted, RecoveredTo, RecoveryWindow, Replay, Role,
};

use super::archiver::Archiver;
use super::auth::Tokens;
use super::backup::{Backups, StartError};
use super::continuity::Continuity as ContinuityChecker;
use super::metrics::Metrics;
use super::postgres::{Observer, PgTarget, Promotion};

pub struct Api {
    pub archiver: Arc<Archiver>,
    pub backups: Arc<Backups>,
    /// The archive's continuity, kept current in the background.
    pub continuity: Arc<ContinuityChecker>,
    pub pg: PgTarget,
    /// The shared observer status reads PostgreSQL's state from.
    pub observer: Arc<Observer>,
    pub pgdata: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    /// Tokens read from `token_file`, with the one a rotation replaced.
    pub tokens: std::sync::Mutex<Tokens>,
    /// How long a replaced token stays valid.
    pub token_grace: Duration,
    pub registry: Registry,
    pub metrics: Metrics,
}

pub fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/backups", post(start_backup))
        .route("/backups/{id}", get(backup))
        .route("/promote", post(promote))
        .layer(middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .nest("/v1", v1)
        .with_state(api)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = ApiError {
        error: message.into(),
    };
    (status, Json(body)).into_response()
}

/// Constant-time comparison of the presented token with the file's content.
/// The file is read on every request, so a rotated Secret takes effect at
/// once; the token it replaced stays valid for `token_grace`.
async fn authorize(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or("");
    let expected = match &api.token_file {
        Some(path) => match tokio::fs::read_to_string(path).await {
            Ok(t) => t.trim().to_string(),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the API token file; refusing /v1 requests");
                String::new()
            }
        },
        None => String::new(),
    };
    let now = Instant::now();
    let ok = {
        let mut tokens = super::lock(&api.tokens);
        tokens.observe(&expected, now);
        tokens.accepts(presented, now, api.token_grace)
    };
    if !ok {
        let mut resp = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return resp;
    }
    next.run(req).await
}

async fn metrics(State(api): State<Arc<Api>>) -> Response {
    api.archiver
        .ready_count(api.pgdata.as_ref().map(|d| d.join("pg_wal")))
        .await;
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &api.registry) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Times in the API are whole seconds (RFC 3339, `Z`).
fn time(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(0)
}

async fn status(State(api): State<Arc<Api>>) -> Response {
    let a = api.archiver.status();
    let pg_wal = api.pgdata.as_ref().map(|d| d.join("pg_wal"));
    let ready = api.archiver.ready_count(pg_wal.clone()).await.unwrap_or(0);
    let oldest_ready = api.archiver.oldest_ready_since(pg_wal).await;
    let (role, replay, recovered_to) = match api.observer.probe().await {
        Ok(p) => {
            api.metrics
                .postgres_in_recovery
                .set(i64::from(p.in_recovery));
            let replay = p.replay.map(|r| {
                api.metrics.replay_lag_seconds.set(r.lag_seconds);
                api.metrics.replay_lag_bytes.set(r.lag_bytes as i64);
                Replay {
                    replay_lsn: r.replay_lsn,
                    lag_seconds: r.lag_seconds,
                    lag_bytes: r.lag_bytes,
                    streaming: Some(r.streaming),
                }
            });
            let recovered_to = p.recovered_to.map(|r| RecoveredTo {
                lsn: r.lsn,
                time: r
                    .time
                    .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                    .map(|t| t.with_timezone(&Utc)),
            });
            let role = if p.in_recovery {
                Role::Standby
            } else {
                Role::Primary
            };
            (role, replay, recovered_to)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach PostgreSQL for status");
            // Without a connection, the data directory still tells a standby apart.
            let standby = api
                .pgdata
                .as_ref()
                .is_some_and(|d| d.join("standby.signal").exists());
            let role = if standby {
                Role::Standby
            } else {
                Role::Primary
            };
            (role, None, None)
        }
    };
    let catalog = api.backups.catalog();
    let continuity = api.continuity.report();
    let backup_in_progress = api.backups.running().map(|j| BackupInProgress {
        id: j.id,
        start_time: time(j.start_time),
    });
    Json(DaemonStatus {
        role,
        archiving: Archiving {
            last_archived_wal: a.last_archived_wal,
            last_archived_time: a.last_archived_time.map(time),
            last_failed_wal: a.last_failed_wal,
            last_failed_time: a.last_failed_time.map(time),
            last_error: a.last_error,
            archived_count: a.archived_count,
            failed_count: a.failed_count,
            ready_count: ready as u64,
            oldest_ready_time: oldest_ready.map(time),
            identity_mismatch: api.archiver.identity_mismatch().await,
        },
        last_backup: catalog.last_backup,
        backup_in_progress,
        recovery_window: window_to_hole(catalog.window, continuity.as_ref()),
        continuity,
        replay,
        recovered_to,
    })
    .into_response()
}

/// The window ends where the archive is known continuous: a window past a
/// hole cannot be reached. Before the first check, the catalog's end stands.
fn window_to_hole(
    window: Option<RecoveryWindow>,
    continuity: Option<&Continuity>,
) -> Option<RecoveryWindow> {
    let mut window = window?;
    if let Some(c) = continuity {
        window.last_archived_wal = c.checked_through.clone();
    }
    Some(window)
}

async fn start_backup(State(api): State<Arc<Api>>) -> Response {
    match api.backups.start() {
        Ok(job) => (
            StatusCode::ACCEPTED,
            Json(BackupAccepted {
                id: job.id,
                state: BackupState::Running,
            }),
        )
            .into_response(),
        Err(StartError::Running(id)) => (
            StatusCode::CONFLICT,
            Json(BackupConflict {
                error: "a base backup is already running".into(),
                running: id,
            }),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn backup(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.backups.get(&id) {
        Some(job) => Json(BackupJob {
            id: job.id,
            state: job.state,
            error: job.error,
            start_time: Some(time(job.start_time)),
            stop_time: job.stop_time.map(time),
        })
        .into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no backup job {id}")),
    }
}

async fn promote(State(api): State<Arc<Api>>) -> Response {
    let outcome = api.pg.promote().await;
    api.observer.invalidate().await;
    match outcome {
        Ok(Promotion::Promoted) => {
            tracing::info!("promoted PostgreSQL");
            Json(Promoted { promoted: true }).into_response()
        }
        Ok(Promotion::NotStandby) => error(StatusCode::CONFLICT, "PostgreSQL is not a standby"),
        Ok(Promotion::TimedOut) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "pg_promote() did not finish within 60 s; the promotion may still complete",
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}
