//! A TCP proxy in front of the S3 server that can inject faults: answer every
//! request with HTTP 503, or refuse service by closing connections.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const FAIL_503: u8 = 1;
const DROP: u8 = 2;

pub struct FaultProxy {
    mode: Arc<AtomicU8>,
    /// Bytes per second per direction and connection; 0 = unlimited.
    rate: Arc<AtomicU64>,
    pub port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl FaultProxy {
    /// Starts proxying 127.0.0.1:<port> to 127.0.0.1:<upstream>.
    pub fn start(upstream: u16) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let rate = Arc::new(AtomicU64::new(0));
        let (m, r) = (mode.clone(), rate.clone());
        runtime.spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (mode, rate) = (m.clone(), r.clone());
                tokio::spawn(async move { serve(conn, upstream, mode, rate).await });
            }
        });
        Self {
            mode,
            rate,
            port,
            _runtime: runtime,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Passes traffic through at full speed.
    pub fn pass(&self) {
        self.rate.store(0, Ordering::SeqCst);
        self.mode.store(PASS, Ordering::SeqCst);
    }

    /// Passes traffic through, each connection limited to `bytes_per_sec` per
    /// direction (takes effect at once, also on open connections).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
        self.mode.store(PASS, Ordering::SeqCst);
    }

    /// Every new request gets `503 Service Unavailable`.
    pub fn fail_with_503(&self) {
        self.mode.store(FAIL_503, Ordering::SeqCst);
    }

    /// Every new connection is closed at once, as if the server were gone.
    pub fn drop_connections(&self) {
        self.mode.store(DROP, Ordering::SeqCst);
    }
}

/// Copies one direction, sleeping after each chunk to hold the current rate.
async fn paced_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let bps = rate.load(Ordering::SeqCst);
        if bps > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps as f64)).await;
        }
    }
    let _ = to.shutdown().await;
}

async fn serve(mut conn: TcpStream, upstream: u16, mode: Arc<AtomicU8>, rate: Arc<AtomicU64>) {
    match mode.load(Ordering::SeqCst) {
        FAIL_503 => {
            // Consume one request's headers, then answer and close.
            let mut buf = vec![0u8; 64 << 10];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
            let body =
                "<Error><Code>ServiceUnavailable</Code><Message>injected fault</Message></Error>";
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
            let _ = conn.shutdown().await;
        }
        DROP => {}
        _ => {
            if let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await {
                let (cr, cw) = conn.into_split();
                let (ur, uw) = up.into_split();
                let upload = tokio::spawn(paced_copy(cr, uw, rate.clone()));
                paced_copy(ur, cw, rate).await;
                let _ = upload.await;
            }
        }
    }
}
