//! HTTP client for the `walden daemon` API (design §6). The operator never
//! touches object storage: everything it knows about the archive comes from
//! these calls.

use async_trait::async_trait;
use std::time::Duration;

pub use walden_contract::api::*;
use walden_contract::pod::DAEMON_PORT;

/// Where one daemon listens and the bearer token it expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub base_url: String,
    pub token: String,
    /// The token the Secret held before it was rotated: the pod's mounted
    /// copy lags behind the Secret, so a 401 is retried once with it.
    pub previous_token: Option<String>,
}

impl Endpoint {
    /// The daemon in the pod with this IP.
    pub fn for_pod_ip(ip: &str, token: &ApiToken) -> Self {
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        Endpoint {
            base_url: format!("http://{host}:{DAEMON_PORT}"),
            token: token.current.clone(),
            previous_token: token.previous.clone(),
        }
    }
}

/// A resource's daemon API token as the operator knows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApiToken {
    /// What the Secret holds now.
    pub current: String,
    /// What it held before this process saw it change, if it did.
    pub previous: Option<String>,
}

/// The tokens read from each token Secret, remembered so that the one a
/// rotation replaced is still known while pods mount the old copy.
#[derive(Debug, Default)]
pub struct TokenMemory {
    seen: std::sync::Mutex<std::collections::HashMap<String, ApiToken>>,
}

impl TokenMemory {
    /// Records that the Secret `key` holds `current` now.
    pub fn remember(&self, key: &str, current: &str) -> ApiToken {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen.entry(key.to_string()).or_default();
        if entry.current != current {
            let replaced = std::mem::replace(&mut entry.current, current.to_string());
            entry.previous = (!replaced.is_empty()).then_some(replaced);
        }
        entry.clone()
    }
}

/// Outcome of asking for a base backup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartBackup {
    Started(String),
    /// One was already running (409); its id.
    AlreadyRunning(String),
}

/// Outcome of asking for a promotion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Promotion {
    Promoted,
    /// 409: the server is not a standby (already promoted, or a primary).
    NotStandby(String),
}

/// Errors talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("daemon {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("daemon {url} rejected the API token (401)")]
    Unauthorized { url: String },
    #[error("daemon {url} answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("daemon {url} sent a response that does not parse: {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The daemon API as the controllers use it; a trait so reconcilers can be
/// tested without pods.
#[async_trait]
pub trait DaemonApi: Send + Sync {
    async fn status(&self, ep: &Endpoint) -> Result<DaemonStatus, DaemonError>;
    async fn start_backup(&self, ep: &Endpoint) -> Result<StartBackup, DaemonError>;
    /// `None` when the daemon does not know the id (404).
    async fn backup(&self, ep: &Endpoint, id: &str) -> Result<Option<BackupJob>, DaemonError>;
    async fn promote(&self, ep: &Endpoint) -> Result<Promotion, DaemonError>;
}

/// [`DaemonApi`] over HTTP.
#[derive(Clone)]
pub struct HttpDaemonClient {
    http: reqwest::Client,
}

impl HttpDaemonClient {
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(HttpDaemonClient { http })
    }

    /// One request; a 401 with the current token is retried once with the
    /// previous one (the daemon refuses before doing anything, so a retried
    /// POST cannot run twice).
    async fn call(
        &self,
        method: reqwest::Method,
        ep: &Endpoint,
        path: &str,
    ) -> Result<(u16, String, String), DaemonError> {
        match self.call_with(method.clone(), ep, path, &ep.token).await {
            Err(DaemonError::Unauthorized { url }) => match &ep.previous_token {
                Some(previous) if *previous != ep.token => {
                    tracing::debug!(%url, "401 with the current token; trying the previous one");
                    self.call_with(method, ep, path, previous).await
                }
                _ => Err(DaemonError::Unauthorized { url }),
            },
            other => other,
        }
    }

    async fn call_with(
        &self,
        method: reqwest::Method,
        ep: &Endpoint,
        path: &str,
        token: &str,
    ) -> Result<(u16, String, String), DaemonError> {
        let url = format!("{}{}", ep.base_url, path);
        let resp = self
            .http
            .request(method, &url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|source| DaemonError::Unreachable {
                url: url.clone(),
                source,
            })?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|source| DaemonError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if status == 401 {
            return Err(DaemonError::Unauthorized { url });
        }
        Ok((status, body, url))
    }
}

fn decode<T: serde::de::DeserializeOwned>(url: &str, body: &str) -> Result<T, DaemonError> {
    serde_json::from_str(body).map_err(|source| DaemonError::Decode {
        url: url.to_string(),
        source,
    })
}

fn unexpected(url: String, status: u16, body: String) -> DaemonError {
    DaemonError::Status { url, status, body }
}

#[async_trait]
impl DaemonApi for HttpDaemonClient {
    async fn status(&self, ep: &Endpoint) -> Result<DaemonStatus, DaemonError> {
        match self.call(reqwest::Method::GET, ep, "/v1/status").await? {
            (200, body, url) => decode(&url, &body),
            (status, body, url) => Err(unexpected(url, status, body)),
        }
    }

    async fn start_backup(&self, ep: &Endpoint) -> Result<StartBackup, DaemonError> {
        match self.call(reqwest::Method::POST, ep, "/v1/backups").await? {
            (200..=202, body, url) => {
                decode::<BackupAccepted>(&url, &body).map(|b| StartBackup::Started(b.id))
            }
            (409, body, url) => decode::<BackupConflict>(&url, &body)
                .map(|c| StartBackup::AlreadyRunning(c.running)),
            (status, body, url) => Err(unexpected(url, status, body)),
        }
    }

    async fn backup(&self, ep: &Endpoint, id: &str) -> Result<Option<BackupJob>, DaemonError> {
        let path = format!("/v1/backups/{id}");
        match self.call(reqwest::Method::GET, ep, &path).await? {
            (200, body, url) => decode(&url, &body).map(Some),
            (404, _, _) => Ok(None),
            (status, body, url) => Err(unexpected(url, status, body)),
        }
    }

    async fn promote(&self, ep: &Endpoint) -> Result<Promotion, DaemonError> {
        match self.call(reqwest::Method::POST, ep, "/v1/promote").await? {
            (200, body, url) => decode::<Promoted>(&url, &body).map(|_| Promotion::Promoted),
            (409, body, _) => Ok(Promotion::NotStandby(body)),
            (status, body, url) => Err(unexpected(url, status, body)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::Path;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use axum::Router;

    const STATUS_PRIMARY: &str = r#"{
        "role": "primary",
        "archiving": {"lastArchivedWal": "000000010000000000000003", "lastArchivedTime": "2025-05-01T10:00:00Z",
                      "lastFailedWal": null, "lastFailedTime": null, "lastError": null,
                      "archivedCount": 3, "failedCount": 0, "readyCount": 1,
                      "oldestReadyTime": "2025-05-01T10:00:30Z"},
        "lastBackup": {"id": "20250501T095900Z", "startTime": "2025-05-01T09:59:00Z", "stopTime": "2025-05-01T10:00:00Z",
                       "startLsn": "0/2000028", "stopLsn": "0/2000100"},
        "backupInProgress": {"id": "20250501T110000Z", "startTime": "2025-05-01T11:00:00Z"},
        "recoveryWindow": {"firstPoint": "2025-05-01T10:00:00Z", "firstLsn": "0/2000100", "lastArchivedWal": "000000010000000000000003"},
        "replay": null
    }"#;

    const STATUS_STANDBY: &str = r#"{
        "role": "standby",
        "archiving": {"lastArchivedWal": null, "lastArchivedTime": null, "lastFailedWal": "000000010000000000000004",
                      "lastFailedTime": "2025-05-01T10:01:00Z", "lastError": "access denied",
                      "archivedCount": 0, "failedCount": 2, "readyCount": 0},
        "lastBackup": null, "backupInProgress": null, "recoveryWindow": null,
        "replay": {"replayLsn": "0/3000060", "lagSeconds": 1.5, "lagBytes": 8192}
    }"#;

    #[test]
    fn contract_shapes_deserialize() {
        let p: DaemonStatus = serde_json::from_str(STATUS_PRIMARY).expect("primary status");
        assert_eq!(p.role, Role::Primary);
        assert_eq!(p.archiving.ready_count, 1);
        assert_eq!(
            p.archiving.oldest_ready_time.map(|t| t.to_rfc3339()),
            Some("2025-05-01T10:00:30+00:00".to_string())
        );
        assert_eq!(
            p.last_backup.as_ref().map(|b| b.stop_lsn.as_str()),
            Some("0/2000100")
        );
        assert_eq!(
            p.backup_in_progress.map(|b| b.id),
            Some("20250501T110000Z".to_string())
        );
        assert_eq!(
            p.recovery_window.map(|w| w.first_lsn),
            Some("0/2000100".to_string())
        );

        let s: DaemonStatus = serde_json::from_str(STATUS_STANDBY).expect("standby status");
        assert_eq!(s.role, Role::Standby);
        assert_eq!(s.archiving.last_error.as_deref(), Some("access denied"));
        let replay = s.replay.expect("replay");
        assert_eq!(
            (replay.replay_lsn.as_str(), replay.lag_bytes),
            ("0/3000060", 8192)
        );

        let a: BackupAccepted =
            serde_json::from_str(r#"{"id":"20250501T110000Z","state":"running"}"#).expect("202");
        assert_eq!(a.state, BackupState::Running);
        let c: BackupConflict =
            serde_json::from_str(r#"{"error":"a backup is running","running":"X"}"#).expect("409");
        assert_eq!(c.running, "X");
        let j: BackupJob = serde_json::from_str(
            r#"{"id":"X","state":"failed","error":"pg_backup_start: permission denied","startTime":"2025-05-01T11:00:00Z","stopTime":null}"#,
        )
        .expect("job");
        assert_eq!(
            (j.state, j.error.as_deref()),
            (
                BackupState::Failed,
                Some("pg_backup_start: permission denied")
            )
        );
        let pr: Promoted = serde_json::from_str(r#"{"promoted":true}"#).expect("promote");
        assert!(pr.promoted);
    }

    #[test]
    fn ipv6_pod_ips_are_bracketed() {
        assert_eq!(
            Endpoint::for_pod_ip("10.0.0.7", &ApiToken::default()).base_url,
            "http://10.0.0.7:8008"
        );
        assert_eq!(
            Endpoint::for_pod_ip("fd00::7", &ApiToken::default()).base_url,
            "http://[fd00::7]:8008"
        );
    }

    fn authorized(headers: &HeaderMap) -> bool {
        headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer secret-token")
    }

    /// A stand-in daemon on 127.0.0.1 speaking the contract, to prove the
    /// client's status-code handling and bearer token.
    async fn fake_daemon() -> String {
        let app = Router::new()
            .route(
                "/v1/status",
                get(|h: HeaderMap| async move {
                    if authorized(&h) {
                        (StatusCode::OK, STATUS_PRIMARY.to_string())
                    } else {
                        (StatusCode::UNAUTHORIZED, "{\"error\":\"unauthorized\"}".to_string())
                    }
                }),
            )
            .route(
                "/v1/backups",
                post(|| async {
                    (StatusCode::CONFLICT, r#"{"error":"running","running":"B1"}"#.to_string())
                }),
            )
            .route(
                "/v1/backups/{id}",
                get(|Path(id): Path<String>| async move {
                    if id == "B1" {
                        (
                            StatusCode::OK,
                            r#"{"id":"B1","state":"succeeded","error":null,"startTime":"2025-05-01T11:00:00Z","stopTime":"2025-05-01T11:05:00Z"}"#
                                .to_string(),
                        )
                    } else {
                        (StatusCode::NOT_FOUND, "{}".to_string())
                    }
                }),
            )
            .route(
                "/v1/promote",
                post(|| async { (StatusCode::CONFLICT, "{\"error\":\"not a standby\"}".to_string()) }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn http_client_speaks_the_contract() {
        let base_url = fake_daemon().await;
        let client = HttpDaemonClient::new(Duration::from_secs(10)).expect("client");
        let good = Endpoint {
            base_url: base_url.clone(),
            token: "secret-token".into(),
            previous_token: None,
        };
        let bad = Endpoint {
            base_url,
            token: "wrong".into(),
            previous_token: None,
        };

        let status = client.status(&good).await.expect("status");
        assert_eq!(status.role, Role::Primary);
        let err = client.status(&bad).await.expect_err("401");
        assert!(matches!(err, DaemonError::Unauthorized { .. }), "{err}");

        assert_eq!(
            client.start_backup(&good).await.expect("start"),
            StartBackup::AlreadyRunning("B1".into())
        );
        let job = client
            .backup(&good, "B1")
            .await
            .expect("job")
            .expect("known");
        assert_eq!(job.state, BackupState::Succeeded);
        assert!(client.backup(&good, "nope").await.expect("404").is_none());
        assert!(matches!(
            client.promote(&good).await.expect("promote"),
            Promotion::NotStandby(_)
        ));
    }

    /// The Secret was rotated but the pod still mounts the old token.
    #[tokio::test]
    async fn a_401_is_retried_once_with_the_previous_token() {
        let base_url = fake_daemon().await;
        let client = HttpDaemonClient::new(Duration::from_secs(10)).expect("client");
        let rotated = |previous: Option<&str>| Endpoint {
            base_url: base_url.clone(),
            token: "rotated-token".into(),
            previous_token: previous.map(str::to_string),
        };
        let status = client
            .status(&rotated(Some("secret-token")))
            .await
            .expect("accepted with the previous token");
        assert_eq!(status.role, Role::Primary);
        for previous in [None, Some("rotated-token"), Some("also-wrong")] {
            let err = client
                .status(&rotated(previous))
                .await
                .expect_err("no token the daemon knows");
            assert!(
                matches!(err, DaemonError::Unauthorized { .. }),
                "{previous:?}: {err}"
            );
        }
    }

    #[test]
    fn token_memory_keeps_the_token_a_rotation_replaced() {
        let memory = TokenMemory::default();
        let t = |current: &str, previous: Option<&str>| ApiToken {
            current: current.into(),
            previous: previous.map(str::to_string),
        };
        // (secret, what it holds, what the operator then knows)
        let steps = [
            ("db/a", "one", t("one", None)),
            ("db/a", "one", t("one", None)),
            ("db/b", "other", t("other", None)),
            ("db/a", "two", t("two", Some("one"))),
            ("db/a", "two", t("two", Some("one"))),
            ("db/a", "three", t("three", Some("two"))),
            ("db/b", "other", t("other", None)),
        ];
        for (i, (key, holds, want)) in steps.into_iter().enumerate() {
            assert_eq!(memory.remember(key, holds), want, "step {i}: {key}={holds}");
        }
    }

    #[tokio::test]
    async fn unreachable_daemon_is_an_error_naming_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let client = HttpDaemonClient::new(Duration::from_secs(5)).expect("client");
        let ep = Endpoint {
            base_url: format!("http://{addr}"),
            token: "t".into(),
            previous_token: None,
        };
        let err = client.status(&ep).await.expect_err("closed port");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
    }
}
