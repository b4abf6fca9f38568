//! The HTTP listener, hardened so that no network client can starve the
//! daemon: the API is reachable by anyone who can reach the pod, while WAL
//! archiving over the unix socket must never wait for it.
//!
//! - At most `max_connections` HTTP connections are open at once, and never
//!   more than half of the file descriptors the process may open beyond a
//!   reserve: the unix socket, storage connections and WAL files always find
//!   descriptors. A connection over the cap is closed at once.
//! - A client must send a request's complete header within `header_timeout`,
//!   and the same applies between requests on a kept-alive connection: idle
//!   and slow ("slowloris") connections are closed and free their place.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// File descriptors kept for everything but HTTP connections.
const FD_RESERVE: u64 = 64;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

/// The connection cap for a descriptor limit: the configured one, but at
/// most half of what is left after the reserve, and at least one.
pub fn cap_for(configured: usize, fd_limit: Option<u64>) -> usize {
    let room = fd_limit.map_or(usize::MAX, |n| {
        usize::try_from(n.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX)
    });
    configured.min(room).max(1)
}

/// The soft limit on open file descriptors of this process.
pub fn fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Serves `router` on `listener` until `stop` turns true, then lets open
/// connections finish their current request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: go on.
                tracing::warn!(error = %e, "accepting an HTTP connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    refused,
                    max = limits.max_connections,
                    "too many HTTP connections; closing new ones at once"
                );
            }
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(true);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "HTTP connection ended with an error");
                    }
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_archiving() {
        // (configured, fd limit, cap)
        for (configured, limit, cap) in [
            (64, Some(1024), 64),
            (64, Some(256), 64),
            (64, Some(128), 32),
            (64, Some(64), 1),
            (64, Some(10), 1),
            (64, None, 64),
            (1000, Some(1_048_576), 1000),
        ] {
            assert_eq!(cap_for(configured, limit), cap, "{configured} {limit:?}");
        }
        assert!(fd_limit().is_some_and(|n| n > 0));
    }
}
