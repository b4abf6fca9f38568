//! Health and metrics endpoints for kubelet probes and Prometheus.

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Shared with the endpoints: metrics, and whether this replica is serving
/// (ready once it leads and its controllers run).
#[derive(Clone)]
pub struct ServerState {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
}

pub fn router(state: ServerState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<ServerState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not leading")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(s): State<ServerState>| async move {
                match s.metrics.encode() {
                    Ok(text) => (StatusCode::OK, text),
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }),
        )
        .with_state(state)
}

/// Serves until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, state: ServerState) -> std::io::Result<()> {
    axum::serve(listener, router(state)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer() {
        let state = ServerState {
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(AtomicBool::new(false)),
        };
        state
            .metrics
            .reconciled("fork", None, std::time::Duration::from_millis(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(serve(listener, state.clone()));
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let http = http.clone();
            let url = format!("{base}{path}");
            async move {
                let r = http.get(url).send().await.expect("request");
                (r.status().as_u16(), r.text().await.expect("body"))
            }
        };
        assert_eq!(get("/healthz").await, (200, "ok".to_string()));
        assert_eq!(get("/readyz").await.0, 503);
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get("/readyz").await.0, 200);
        let (code, body) = get("/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("walden_operator_reconciles_total"), "{body}");
    }
}
