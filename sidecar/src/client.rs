//! The thin client: `walden wal-push` and `walden wal-fetch` when
//! `WALDEN_SOCKET` is set hand the request to `walden daemon` and relay its
//! verdict, without starting a storage client or an async runtime.
//!
//! There is deliberately no fallback to direct storage access when the
//! daemon cannot be reached: in a pod the postgres container holds no storage
//! credentials and no read-only setting (the sidecar does), so a fallback
//! would either fail anyway or bypass the sidecar's configuration. Failing is
//! safe: PostgreSQL keeps a segment it could not archive and retries, and a
//! fetch failure stops recovery instead of ending it early (invariant 4).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walden_contract::pod::env as wenv;

use crate::daemon::protocol::{Request, Response, Status, MAX_LINE};

/// Bytes read from the socket at a time when receiving a WAL file.
const RECEIVE_BUFFER: usize = 1 << 20;

/// How the client talks to the daemon.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub socket: PathBuf,
    /// Keep trying to connect this long (the daemon may be restarting).
    pub connect_wait: Duration,
    /// Give up on an answer after this long.
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the walden daemon at {socket}: {source} (is `walden daemon` running?)")]
    Connect {
        socket: String,
        source: std::io::Error,
    },
    #[error("talking to the walden daemon at {socket}: {source}")]
    Io {
        socket: String,
        source: std::io::Error,
    },
    #[error("the walden daemon at {socket} closed the connection before answering (did it stop?)")]
    NoAnswer { socket: String },
    #[error(
        "the walden daemon at {socket} sent an answer this client does not understand: {reason}"
    )]
    BadAnswer { socket: String, reason: String },
    #[error(
        "the walden daemon at {socket} sent {got} of {expected} bytes of {name}, then stopped"
    )]
    ShortBody {
        socket: String,
        name: String,
        got: u64,
        expected: u64,
    },
    #[error("{0}")]
    Daemon(String),
    #[error("{op} {path}: {source}")]
    Local {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// What a delegated fetch ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    Restored {
        len: u64,
    },
    /// The daemon said the file is definitively not in the archive.
    NotFound,
}

impl ClientOptions {
    fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    fn connect(&self) -> Result<UnixStream, ClientError> {
        let started = Instant::now();
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => {
                    let io = |source| ClientError::Io {
                        socket: self.socket_name(),
                        source,
                    };
                    s.set_read_timeout(Some(self.timeout)).map_err(io)?;
                    s.set_write_timeout(Some(self.timeout)).map_err(io)?;
                    return Ok(s);
                }
                Err(source) if started.elapsed() >= self.connect_wait => {
                    return Err(ClientError::Connect {
                        socket: self.socket_name(),
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Sends one request and reads the response line.
    fn call(&self, req: &Request) -> Result<(BufReader<UnixStream>, Response), ClientError> {
        let mut stream = self.connect()?;
        let io = |source| ClientError::Io {
            socket: self.socket_name(),
            source,
        };
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::BadAnswer {
            socket: self.socket_name(),
            reason: e.to_string(),
        })?;
        line.push(b'\n');
        stream.write_all(&line).map_err(io)?;
        stream.flush().map_err(io)?;
        let mut reader = BufReader::with_capacity(RECEIVE_BUFFER, stream);
        let mut answer = Vec::new();
        (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut answer)
            .map_err(io)?;
        if answer.last() != Some(&b'\n') {
            return Err(ClientError::NoAnswer {
                socket: self.socket_name(),
            });
        }
        let resp: Response =
            serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer {
                socket: self.socket_name(),
                reason: e.to_string(),
            })?;
        Ok((reader, resp))
    }
}

/// Makes `path` absolute against the working directory: PostgreSQL passes
/// `%p` relative to its data directory, and the daemon runs elsewhere.
fn absolute(path: &Path) -> Result<PathBuf, ClientError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(|source| ClientError::Local {
        op: "find the working directory for",
        path: path.display().to_string(),
        source,
    })?;
    Ok(cwd.join(path))
}

/// Asks the daemon to archive `path`; `Ok` only when it says the file is durably stored.
pub fn push(opts: &ClientOptions, path: &Path) -> Result<(), ClientError> {
    let path = absolute(path)?;
    let req = Request::WalPush {
        path: path.display().to_string(),
    };
    let (_, resp) = opts.call(&req)?;
    match resp.status {
        Status::Ok => Ok(()),
        _ => {
            Err(ClientError::Daemon(resp.message.unwrap_or_else(|| {
                "the daemon refused without a reason".into()
            })))
        }
    }
}

fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.walden-tmp-{}", std::process::id()))
}

/// Asks the daemon for `name` and writes it to `dest` atomically; `dest` is
/// untouched unless every byte the daemon announced arrived.
pub fn fetch(opts: &ClientOptions, name: &str, dest: &Path) -> Result<FetchOutcome, ClientError> {
    let dest = absolute(dest)?;
    let (mut reader, resp) = opts.call(&Request::WalFetch {
        name: name.to_string(),
    })?;
    let len = match (resp.status, resp.len) {
        (Status::Ok, Some(len)) => len,
        (Status::NotFound, _) => return Ok(FetchOutcome::NotFound),
        (Status::Ok, None) => {
            return Err(ClientError::BadAnswer {
                socket: opts.socket_name(),
                reason: "success without a length".into(),
            })
        }
        (Status::Error, _) => {
            return Err(ClientError::Daemon(
                resp.message
                    .unwrap_or_else(|| "the daemon failed without a reason".into()),
            ))
        }
    };
    let tmp = temp_path(&dest);
    let local = |op, source| ClientError::Local {
        op,
        path: tmp.display().to_string(),
        source,
    };
    let result = (|| {
        let mut out = std::fs::File::create(&tmp).map_err(|e| local("create", e))?;
        let mut buf = vec![0u8; RECEIVE_BUFFER];
        let mut got = 0u64;
        while got < len {
            let want = (len - got).min(RECEIVE_BUFFER as u64) as usize;
            let n = reader
                .read(&mut buf[..want])
                .map_err(|source| ClientError::Io {
                    socket: opts.socket_name(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(|e| local("write", e))?;
            got += n as u64;
        }
        if got != len {
            return Err(ClientError::ShortBody {
                socket: opts.socket_name(),
                name: name.to_string(),
                got,
                expected: len,
            });
        }
        out.flush().map_err(|e| local("write", e))?;
        std::fs::rename(&tmp, &dest).map_err(|source| ClientError::Local {
            op: "rename into place",
            path: dest.display().to_string(),
            source,
        })?;
        Ok(FetchOutcome::Restored { len })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The thin-client settings of `wal-push` and `wal-fetch`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Delegate to the walden daemon listening on this unix socket (no direct storage access)
    #[arg(long, env = wenv::SOCKET, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Milliseconds to keep trying to reach the daemon's socket (it may be restarting)
    #[arg(
        long,
        env = "WALDEN_SOCKET_WAIT_MS",
        default_value_t = 2000,
        value_name = "MS"
    )]
    pub socket_wait_ms: u64,

    /// Seconds to wait for the daemon's answer before failing
    #[arg(
        long,
        env = "WALDEN_SOCKET_TIMEOUT",
        default_value_t = 600,
        value_name = "SECS"
    )]
    pub socket_timeout: u64,
}

impl ClientArgs {
    /// The options to delegate with, when a socket is configured.
    pub fn options(&self) -> Option<ClientOptions> {
        let socket = self.socket.clone().filter(|s| !s.as_os_str().is_empty())?;
        Some(ClientOptions {
            socket,
            connect_wait: Duration::from_millis(self.socket_wait_ms),
            timeout: Duration::from_secs(self.socket_timeout.max(1)),
        })
    }
}
