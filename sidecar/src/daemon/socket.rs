//! The unix socket PostgreSQL's `archive_command`/`restore_command` clients
//! talk to (protocol in [`super::protocol`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tracing::Instrument;

use super::archiver::Archiver;
use super::prefetch::Prefetcher;
use super::protocol::{Request, Response, MAX_LINE};

/// Read size when sending a restored file to a client.
const SEND_BUFFER: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("another walden daemon is listening on {0}")]
    InUse(String),
    #[error("refusing to use {0} as the daemon's socket: it exists and is not a socket (WALDEN_SOCKET must name a socket path)")]
    NotASocket(String),
}

/// Owner and group read and write; nobody else.
const SOCKET_MODE: u32 = 0o660;

/// Binds the socket, replacing a stale one left by a crashed daemon (but
/// never anything that is not a socket), and opens it to its owner and group
/// only: those of `owner_of` (PGDATA, whose owner is the PostgreSQL user)
/// when given, else those of the socket's directory (the pod's shared
/// `/walden/run`, group-owned by the pod's fsGroup).
pub async fn bind(path: &Path, owner_of: Option<&Path>) -> Result<UnixListener, SocketError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let io = |op, source| SocketError::Io {
        op,
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("create the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket(path.display().to_string()))
        }
        Ok(_) => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(SocketError::InUse(path.display().to_string()));
            }
            std::fs::remove_file(path).map_err(|e| io("remove the stale socket", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("inspect", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| io("listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| io("set permissions of", e))?;
    let reference = owner_of.or(path.parent());
    if let Some(reference) = reference {
        let want = std::fs::metadata(reference).map_err(|e| SocketError::Io {
            op: "inspect",
            path: reference.display().to_string(),
            source: e,
        })?;
        let have = std::fs::metadata(path).map_err(|e| io("inspect", e))?;
        let uid = (want.uid() != have.uid()).then_some(want.uid());
        let gid = (want.gid() != have.gid()).then_some(want.gid());
        if uid.is_some() || gid.is_some() {
            if let Err(e) = std::os::unix::fs::chown(path, uid, gid) {
                tracing::warn!(
                    socket = %path.display(),
                    owner = want.uid(),
                    group = want.gid(),
                    error = %e,
                    "cannot give the socket to the owner of {}; only this daemon's user and group can use it",
                    reference.display()
                );
            }
        }
    }
    Ok(listener)
}

/// Requests being answered, so that shutdown can let them finish.
#[derive(Debug, Default, Clone)]
pub struct Open(Arc<AtomicUsize>);

impl Open {
    /// Waits until no request is open, or `timeout` passed; returns how many are left.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let started = Instant::now();
        loop {
            let n = self.0.load(Ordering::SeqCst);
            if n == 0 || started.elapsed() >= timeout {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves connections until `stop` turns true; each connection runs on its own task.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    archiver: Arc<Archiver>,
    prefetcher: Arc<Prefetcher>,
    open: Open,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            accepted = listener.accept() => match accepted {
                Ok((conn, _)) => {
                    let archiver = archiver.clone();
                    let prefetcher = prefetcher.clone();
                    open.0.fetch_add(1, Ordering::SeqCst);
                    let guard = OpenGuard(open.0.clone());
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(e) = handle(conn, archiver, prefetcher).await {
                            tracing::warn!(error = %e, "socket connection failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "accepting on the unix socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(
    conn: UnixStream,
    archiver: Arc<Archiver>,
    prefetcher: Arc<Prefetcher>,
) -> std::io::Result<()> {
    let (read, mut write) = conn.into_split();
    let mut reader = BufReader::new(read).take(MAX_LINE as u64);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    let req: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let resp = Response::error(format!("malformed request: {e}"));
            return write.write_all(&resp.to_line()).await;
        }
    };
    match req {
        Request::WalPush { path } => {
            let span = tracing::info_span!("wal_push_request", path = %path);
            let resp = match archiver.push(PathBuf::from(&path)).instrument(span).await {
                Ok(()) => Response::ok(),
                Err(e) => Response::error(format!("wal-push {path}: {e}")),
            };
            write.write_all(&resp.to_line()).await
        }
        Request::WalFetch { name } => {
            let span = tracing::info_span!("wal_fetch_request", file = %name);
            match prefetcher.fetch(&name).instrument(span).await {
                Ok(served) => {
                    // Large reads: tokio runs each file read as a blocking task.
                    let file = tokio::fs::File::open(&served.path).await?;
                    let mut file = tokio::io::BufReader::with_capacity(SEND_BUFFER, file);
                    write
                        .write_all(&Response::content(served.len).to_line())
                        .await?;
                    let sent =
                        tokio::io::copy_buf(&mut (&mut file).take(served.len), &mut write).await?;
                    if sent != served.len {
                        // The client sees a short body and fails; never a wrong file.
                        tracing::error!(file = %name, sent, len = served.len, "restored file shrank while being sent");
                    }
                    write.shutdown().await
                }
                Err(e) if e.is_not_found() => {
                    write
                        .write_all(&Response::not_found(e.to_string()).to_line())
                        .await
                }
                Err(e) => {
                    tracing::error!(file = %name, error = %e, "wal-fetch failed");
                    write
                        .write_all(&Response::error(format!("wal-fetch {name}: {e}")).to_line())
                        .await
                }
            }
        }
    }
}
