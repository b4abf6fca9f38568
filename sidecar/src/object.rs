//! The sealed object: how every data object (WAL file, backup part) is stored.
//!
//! An object is a zstd stream of the content followed by a 56-byte trailer in
//! a zstd *skippable frame*, so the object stays a valid `.zst` file that the
//! `zstd` tool can decompress, while carrying what Walden needs to verify it:
//!
//! ```text
//! zstd frame(s) of the content (with zstd's own content checksum)
//! skippable frame: magic 0x184D2A5E | len 48 | "WALDEN01" | content length u64 LE | SHA-256 of content
//! ```
//!
//! The SHA-256 is recorded at write time over the uncompressed content; a
//! reader recomputes it over everything it decompresses and fails on any
//! difference, so no corrupt byte is ever handed on. The trailer sits at a
//! fixed offset from the end, so a writer can compare an existing object
//! with a local file by reading 56 bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};

use crate::storage::Download;

/// Bytes in the trailer, including the skippable frame header.
pub const TRAILER_LEN: usize = 56;
const SKIPPABLE_MAGIC: u32 = 0x184D_2A5E;
const TAG: &[u8; 8] = b"WALDEN01";
const IO_BUFFER: usize = 256 << 10;

/// What the trailer records about the content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seal {
    pub content_len: u64,
    pub sha256: [u8; 32],
}

impl Seal {
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut out = [0u8; TRAILER_LEN];
        out[0..4].copy_from_slice(&SKIPPABLE_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&48u32.to_le_bytes());
        out[8..16].copy_from_slice(TAG);
        out[16..24].copy_from_slice(&self.content_len.to_le_bytes());
        out[24..56].copy_from_slice(&self.sha256);
        out
    }

    /// Parses a trailer; `None` when the bytes are not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != TRAILER_LEN
            || bytes[0..4] != SKIPPABLE_MAGIC.to_le_bytes()
            || bytes[4..8] != 48u32.to_le_bytes()
            || &bytes[8..16] != TAG
        {
            return None;
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[16..24]);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes[24..56]);
        Some(Self {
            content_len: u64::from_le_bytes(len),
            sha256,
        })
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// Why an object could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum UnsealError {
    /// The stored bytes are not what was written: never use them.
    #[error("{object} is corrupt: {reason}")]
    Corrupt { object: String, reason: String },
    /// Reading from storage failed part-way (network, server): worth retrying.
    #[error("reading {object} failed: {source}")]
    Read { object: String, source: io::Error },
    /// Writing the content out failed.
    #[error("writing the content of {object} failed: {source}")]
    Write { object: String, source: io::Error },
}

/// Compression settings for sealing.
#[derive(Debug, Clone, Copy)]
pub struct SealOptions {
    /// zstd level (1 = fastest).
    pub level: i32,
    /// zstd worker threads; 0 compresses on the calling task.
    pub workers: u32,
}

impl Default for SealOptions {
    fn default() -> Self {
        Self {
            level: 1,
            workers: 0,
        }
    }
}

/// Size of the chunks that travel between the pipeline's stages.
const CHUNK: usize = 256 << 10;
/// Chunks queued between two stages; with [`CHUNK`] this bounds the memory
/// of one object's pipeline to a few MiB whatever the object's size.
const QUEUE: usize = 2;

/// SHA-256 on its own thread, so that hashing overlaps (de)compression and
/// I/O instead of adding to them: on two cores it takes hashing off the
/// critical path of every push and fetch. Dropping it ends the input.
struct HashThread {
    tx: mpsc::Sender<Bytes>,
}

impl HashThread {
    /// Starts the thread; the receiver yields the seal of everything queued
    /// once the `HashThread` is dropped.
    fn start() -> (Self, oneshot::Receiver<Seal>) {
        let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE * 2);
        let (done_tx, done) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                len += chunk.len() as u64;
            }
            let _ = done_tx.send(Seal {
                content_len: len,
                sha256: hasher.finalize().into(),
            });
        });
        (Self { tx }, done)
    }

    /// Queues a chunk; `false` once the hashing thread is gone.
    async fn update(&self, chunk: Bytes) -> bool {
        self.tx.send(chunk).await.is_ok()
    }
}

/// Chunk buffers kept for reuse: fresh chunk-sized allocations are returned to
/// the kernel and faulted in again page by page, which costs more system
/// time than the copy itself.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
/// Idle buffers the pool keeps (memory it may hold while nothing runs).
const POOL_KEEP: usize = 16;

/// An empty buffer with room for a chunk, from the pool when one is idle.
fn buffer() -> Vec<u8> {
    let mut buf = POOL
        .lock()
        .ok()
        .and_then(|mut pool| pool.pop())
        .unwrap_or_else(|| Vec::with_capacity(CHUNK));
    buf.clear();
    buf
}

/// A chunk that returns its buffer to the pool once every clone is dropped.
struct Pooled(Vec<u8>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Ok(mut pool) = POOL.lock() {
            if pool.len() < POOL_KEEP && self.0.capacity() >= CHUNK {
                pool.push(std::mem::take(&mut self.0));
            }
        }
    }
}

fn freeze(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Pooled(buf))
}

/// Reads up to [`CHUNK`] bytes (fewer only at the end of the input).
async fn read_chunk<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Bytes> {
    let mut buf = buffer();
    while buf.len() < CHUNK {
        if reader.read_buf(&mut buf).await? == 0 {
            break;
        }
    }
    Ok(freeze(buf))
}

/// A message from a reading stage to a blocking stage. A channel that closes
/// without [`Piece::End`] means the producer gave up: never a short input.
enum Piece {
    Data(Bytes),
    End,
    Failed(io::Error),
}

/// Collects a blocking stage's output into chunks for an async consumer.
struct ChunkSender {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkSender {
    fn send_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = freeze(std::mem::replace(&mut self.buf, buffer()));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send_buffered()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buffered()
    }
}

/// A reader producing the sealed form of `inner`: compressed content, then
/// the trailer. It runs as a pipeline (reading, hashing and compressing
/// overlap on separate threads) with a bounded number of chunks in flight.
/// Must be created inside a tokio runtime.
pub struct Sealer {
    out: mpsc::Receiver<io::Result<Bytes>>,
    pending: Bytes,
    seal: Arc<OnceLock<Seal>>,
}

impl Sealer {
    /// Seals what `inner` yields.
    pub fn new<R: AsyncRead + Unpin + Send + 'static>(inner: R, opts: SealOptions) -> Self {
        Self::start(opts, |hasher, pieces| {
            tokio::spawn(feed(inner, hasher, pieces));
        })
    }

    /// Seals a local file, read with plain blocking reads on their own
    /// thread (no extra copy through an async file's buffer).
    pub fn from_file(file: std::fs::File, opts: SealOptions) -> Self {
        Self::start(opts, |hasher, pieces| {
            tokio::task::spawn_blocking(move || feed_file(file, hasher, pieces));
        })
    }

    fn start(opts: SealOptions, spawn_feed: impl FnOnce(HashThread, mpsc::Sender<Piece>)) -> Self {
        let (out_tx, out) = mpsc::channel(QUEUE);
        let (piece_tx, piece_rx) = mpsc::channel(QUEUE);
        let seal = Arc::new(OnceLock::new());
        let (hasher, seal_rx) = HashThread::start();
        spawn_feed(hasher, piece_tx);
        let handle = seal.clone();
        tokio::task::spawn_blocking(move || compress(opts, piece_rx, seal_rx, out_tx, &handle));
        Self {
            out,
            pending: Bytes::new(),
            seal,
        }
    }

    /// Filled in once the whole content has been read through the sealer.
    pub fn seal_handle(&self) -> Arc<OnceLock<Seal>> {
        self.seal.clone()
    }
}

/// [`feed`] for a local file, on a blocking thread.
fn feed_file(mut file: std::fs::File, hasher: HashThread, pieces: mpsc::Sender<Piece>) {
    loop {
        let mut buf = buffer();
        match io::Read::read_to_end(&mut io::Read::take(&mut file, CHUNK as u64), &mut buf) {
            Ok(0) => {
                drop(hasher);
                let _ = pieces.blocking_send(Piece::End);
                return;
            }
            Ok(_) => {
                let chunk = freeze(buf);
                if hasher.tx.blocking_send(chunk.clone()).is_err()
                    || pieces.blocking_send(Piece::Data(chunk)).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = pieces.blocking_send(Piece::Failed(e));
                return;
            }
        }
    }
}

/// Reads the content and hands each chunk to the hasher and the compressor.
async fn feed<R: AsyncRead + Unpin>(mut inner: R, hasher: HashThread, pieces: mpsc::Sender<Piece>) {
    loop {
        match read_chunk(&mut inner).await {
            Ok(chunk) if chunk.is_empty() => {
                drop(hasher);
                let _ = pieces.send(Piece::End).await;
                return;
            }
            Ok(chunk) => {
                if !hasher.update(chunk.clone()).await
                    || pieces.send(Piece::Data(chunk)).await.is_err()
                {
                    return;
                }
            }
            Err(e) => {
                let _ = pieces.send(Piece::Failed(e)).await;
                return;
            }
        }
    }
}

/// The compressing stage: zstd over the pieces, then the trailer once the
/// hasher has seen every byte.
fn compress(
    opts: SealOptions,
    mut pieces: mpsc::Receiver<Piece>,
    seal_rx: oneshot::Receiver<Seal>,
    out: mpsc::Sender<io::Result<Bytes>>,
    handle: &OnceLock<Seal>,
) {
    let sink = ChunkSender {
        tx: out.clone(),
        buf: buffer(),
    };
    let result = (|| -> io::Result<()> {
        let mut encoder = zstd::stream::write::Encoder::new(sink, opts.level)?;
        encoder.include_checksum(true)?;
        if opts.workers > 0 {
            encoder.multithread(opts.workers)?;
        }
        loop {
            match pieces.blocking_recv() {
                Some(Piece::Data(chunk)) => io::Write::write_all(&mut encoder, &chunk)?,
                Some(Piece::End) => break,
                // The input failed: the consumer hears why, and no trailer follows.
                Some(Piece::Failed(e)) => return Err(e),
                // The feeder gave up (its other stage went away): end without a seal.
                None => return Ok(()),
            }
        }
        let mut sink = encoder.finish()?;
        let Ok(seal) = seal_rx.blocking_recv() else {
            return Ok(());
        };
        sink.buf.extend_from_slice(&seal.encode());
        sink.send_buffered()?;
        let _ = handle.set(seal);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}

impl AsyncRead for Sealer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.out.poll_recv(cx)) {
                Some(Ok(chunk)) => this.pending = chunk,
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None if this.seal.get().is_some() => return Poll::Ready(Ok(())),
                None => {
                    return Poll::Ready(Err(io::Error::other(
                        "sealing stopped before the end of the content",
                    )))
                }
            }
        }
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// Computes the seal a local file would get, without compressing it.
pub async fn seal_of<R: AsyncRead + Unpin>(mut reader: R) -> io::Result<Seal> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; IO_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok(Seal {
        content_len: len,
        sha256: hasher.finalize().into(),
    })
}

/// The decompressing stage's view of the compressed pieces: a blocking
/// reader that notes whether the download itself failed, to tell a broken
/// download (retry) from bytes that do not decompress (corrupt).
struct PieceReader {
    rx: mpsc::Receiver<Piece>,
    current: Bytes,
    ended: bool,
    failed: Arc<AtomicBool>,
}

impl io::Read for PieceReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() && !self.ended {
            match self.rx.blocking_recv() {
                Some(Piece::Data(chunk)) => self.current = chunk,
                Some(Piece::End) => self.ended = true,
                Some(Piece::Failed(e)) => {
                    self.failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                None => {
                    self.failed.store(true, Ordering::Relaxed);
                    return Err(io::Error::other("the download stopped"));
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Decompresses every frame of the pieces into chunks of content.
fn decompress(pieces: PieceReader, out: mpsc::Sender<io::Result<Bytes>>) {
    let result = (|| -> io::Result<()> {
        let mut decoder = zstd::stream::read::Decoder::new(pieces)?;
        loop {
            let mut chunk = buffer();
            chunk.resize(CHUNK, 0);
            let mut filled = 0;
            while filled < CHUNK {
                match io::Read::read(&mut decoder, &mut chunk[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                return Ok(());
            }
            chunk.truncate(filled);
            if out.blocking_send(Ok(freeze(chunk))).is_err() {
                return Ok(());
            }
        }
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}

/// Decompresses a downloaded object into `out`, verifying it against its
/// trailer. Reading, decompressing, hashing and writing overlap on separate
/// threads. On error `out` has received unverified bytes: the caller must
/// discard them (write to a temporary file and rename only on success).
pub async fn unseal<W: AsyncWrite + Unpin>(
    object: &str,
    download: Download,
    out: &mut W,
) -> Result<Seal, UnsealError> {
    let corrupt = |reason: String| UnsealError::Corrupt {
        object: object.to_string(),
        reason,
    };
    let read_err = |source| UnsealError::Read {
        object: object.to_string(),
        source,
    };
    let Download { body, size } = download;
    if size < TRAILER_LEN as u64 {
        return Err(corrupt(format!(
            "it is {size} bytes, too short to hold a Walden checksum trailer"
        )));
    }
    let failed = Arc::new(AtomicBool::new(false));
    let (piece_tx, piece_rx) = mpsc::channel(QUEUE);
    let (content_tx, mut content) = mpsc::channel(QUEUE);
    let reading = tokio::spawn(download_pieces(body, size, piece_tx));
    let pieces = PieceReader {
        rx: piece_rx,
        current: Bytes::new(),
        ended: false,
        failed: failed.clone(),
    };
    tokio::task::spawn_blocking(move || decompress(pieces, content_tx));
    let (hasher, hashed_all) = HashThread::start();
    while let Some(chunk) = content.recv().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(source) if failed.load(Ordering::Relaxed) => return Err(read_err(source)),
            Err(e) => return Err(corrupt(format!("it does not decompress: {e}"))),
        };
        let write = out.write_all(&chunk);
        let (hashed, written) = tokio::join!(hasher.update(chunk.clone()), write);
        written.map_err(|source| UnsealError::Write {
            object: object.to_string(),
            source,
        })?;
        if !hashed {
            return Err(UnsealError::Write {
                object: object.to_string(),
                source: io::Error::other("the hashing thread stopped"),
            });
        }
    }
    out.flush().await.map_err(|source| UnsealError::Write {
        object: object.to_string(),
        source,
    })?;
    let trailer = match reading.await {
        Ok(Ok(trailer)) => trailer,
        Ok(Err(source)) => return Err(read_err(source)),
        Err(e) => return Err(read_err(io::Error::other(e.to_string()))),
    };
    let seal = Seal::decode(&trailer).ok_or_else(|| {
        corrupt(
            "its checksum trailer is missing or damaged (not a Walden object, or truncated)".into(),
        )
    })?;
    drop(hasher);
    let actual = hashed_all
        .await
        .map_err(|_| read_err(io::Error::other("the hashing thread stopped")))?;
    if actual != seal {
        return Err(corrupt(format!(
            "its content has SHA-256 {} ({} bytes) but {} ({} bytes) was recorded when it was written",
            actual.sha256_hex(),
            actual.content_len,
            seal.sha256_hex(),
            seal.content_len
        )));
    }
    Ok(seal)
}

/// Reads the compressed part of a download as pieces, then returns its trailer.
async fn download_pieces(
    body: crate::storage::Reader,
    size: u64,
    pieces: mpsc::Sender<Piece>,
) -> io::Result<[u8; TRAILER_LEN]> {
    let mut compressed = body.take(size - TRAILER_LEN as u64);
    loop {
        match read_chunk(&mut compressed).await {
            Ok(chunk) if chunk.is_empty() => break,
            Ok(chunk) => {
                if pieces.send(Piece::Data(chunk)).await.is_err() {
                    return Err(io::Error::other("decompression stopped"));
                }
            }
            Err(e) => {
                let kind = e.kind();
                let message = e.to_string();
                let _ = pieces.send(Piece::Failed(e)).await;
                return Err(io::Error::new(kind, message));
            }
        }
    }
    if compressed.limit() != 0 {
        let short = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the download ended before its announced size",
            )
        };
        let _ = pieces.send(Piece::Failed(short())).await;
        return Err(short());
    }
    let _ = pieces.send(Piece::End).await;
    let mut body = compressed.into_inner();
    let mut trailer = [0u8; TRAILER_LEN];
    body.read_exact(&mut trailer).await?;
    Ok(trailer)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn seal_bytes(data: &[u8], opts: SealOptions) -> (Vec<u8>, Seal) {
        let sealer = Sealer::new(io::Cursor::new(data.to_vec()), opts);
        let handle = sealer.seal_handle();
        let mut out = Vec::new();
        let mut sealer = sealer;
        sealer.read_to_end(&mut out).await.unwrap();
        (out, *handle.get().unwrap())
    }

    fn download(bytes: Vec<u8>) -> Download {
        let size = bytes.len() as u64;
        Download {
            body: Box::pin(io::Cursor::new(bytes)),
            size,
        }
    }

    fn sample() -> Vec<u8> {
        (0..3_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    #[tokio::test]
    async fn round_trip_restores_exact_content_and_is_plain_zstd() {
        for opts in [
            SealOptions::default(),
            SealOptions {
                level: 3,
                workers: 2,
            },
        ] {
            let data = sample();
            let (sealed, seal) = seal_bytes(&data, opts).await;
            assert!(
                sealed.len() < data.len() / 2,
                "compressible input should shrink"
            );
            assert_eq!(seal, seal_of(&data[..]).await.unwrap());
            let mut out = Vec::new();
            let got = unseal("obj", download(sealed.clone()), &mut out)
                .await
                .unwrap();
            assert_eq!(got, seal);
            assert_eq!(out, data);
            // The stored form is an ordinary zstd stream (the trailer is a skippable frame).
            assert_eq!(zstd_decode_all(&sealed), data);
        }
    }

    fn zstd_decode_all(bytes: &[u8]) -> Vec<u8> {
        zstd::stream::decode_all(bytes).unwrap()
    }

    #[tokio::test]
    async fn empty_content_round_trips() {
        let (sealed, seal) = seal_bytes(b"", SealOptions::default()).await;
        assert_eq!(seal.content_len, 0);
        let mut out = Vec::new();
        unseal("obj", download(sealed), &mut out).await.unwrap();
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn every_single_byte_flip_is_detected() {
        let data = sample()[..200_000].to_vec();
        let (sealed, _) = seal_bytes(&data, SealOptions::default()).await;
        // Flip one bit at many positions, trailer included.
        let step = (sealed.len() / 97).max(1);
        let positions: Vec<usize> = (0..sealed.len())
            .step_by(step)
            .chain(sealed.len() - TRAILER_LEN..sealed.len())
            .collect();
        for pos in positions {
            let mut bad = sealed.clone();
            bad[pos] ^= 0x10;
            let mut out = Vec::new();
            let err = unseal("obj", download(bad), &mut out)
                .await
                .expect_err(&format!("flip at {pos} undetected"));
            assert!(
                matches!(err, UnsealError::Corrupt { .. }),
                "flip at {pos}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn truncation_and_foreign_objects_are_corrupt() {
        let data = sample()[..100_000].to_vec();
        let (sealed, _) = seal_bytes(&data, SealOptions::default()).await;
        for bad in [
            sealed[..sealed.len() - 1].to_vec(),
            sealed[..10].to_vec(),
            sealed[TRAILER_LEN..].to_vec(),
            data.clone(),
        ] {
            let mut out = Vec::new();
            let err = unseal("obj", download(bad), &mut out).await.unwrap_err();
            assert!(matches!(err, UnsealError::Corrupt { .. }), "{err}");
        }
    }

    /// Yields `good` bytes, then fails like a broken connection or disk.
    struct FailingAfter {
        good: io::Cursor<Vec<u8>>,
    }

    impl AsyncRead for FailingAfter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = buf.filled().len();
            ready!(Pin::new(&mut self.good).poll_read(cx, buf))?;
            if buf.filled().len() == before {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "injected failure",
                )));
            }
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_input_error_fails_the_sealer_and_never_yields_a_seal() {
        // More than a few chunks, so the failure happens mid-pipeline.
        let good = sample();
        let sealer = Sealer::new(
            FailingAfter {
                good: io::Cursor::new(good),
            },
            SealOptions::default(),
        );
        let handle = sealer.seal_handle();
        let mut sealer = sealer;
        let mut out = Vec::new();
        let err = sealer.read_to_end(&mut out).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        // Reading on until the pipeline closes must not complete the object.
        let rest = sealer.read_to_end(&mut out).await;
        assert!(
            rest.is_err(),
            "the sealer ended cleanly after a failed input"
        );
        assert!(handle.get().is_none(), "a failed input must not be sealed");
        assert!(
            Seal::decode(&out[out.len().saturating_sub(TRAILER_LEN)..]).is_none(),
            "no trailer may follow a failed input"
        );
    }

    #[tokio::test]
    async fn a_file_seals_exactly_like_a_stream() {
        let data = sample();
        let dir = std::env::temp_dir().join(format!("walden-seal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("content");
        std::fs::write(&path, &data).unwrap();
        let mut from_file =
            Sealer::from_file(std::fs::File::open(&path).unwrap(), SealOptions::default());
        let mut sealed = Vec::new();
        from_file.read_to_end(&mut sealed).await.unwrap();
        let (expected, seal) = seal_bytes(&data, SealOptions::default()).await;
        assert_eq!(sealed, expected);
        assert_eq!(*from_file.seal_handle().get().unwrap(), seal);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    async fn unseal_error(body: crate::storage::Reader, size: u64) -> UnsealError {
        let mut out = Vec::new();
        unseal("obj", Download { body, size }, &mut out)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn a_broken_download_is_a_read_error_not_corruption() {
        let data = sample();
        let (sealed, _) = seal_bytes(&data, SealOptions::default()).await;
        let size = sealed.len() as u64;
        for cut in [0, sealed.len() / 3, sealed.len() - TRAILER_LEN - 1] {
            // The connection breaks after `cut` bytes.
            let failing = FailingAfter {
                good: io::Cursor::new(sealed[..cut].to_vec()),
            };
            let err = unseal_error(Box::pin(failing), size).await;
            assert!(
                matches!(err, UnsealError::Read { .. }),
                "cut at {cut}: {err}"
            );
            // The body ends early without an error: also a read failure.
            let short = io::Cursor::new(sealed[..cut].to_vec());
            let err = unseal_error(Box::pin(short), size).await;
            assert!(
                matches!(err, UnsealError::Read { .. }),
                "short at {cut}: {err}"
            );
        }
    }

    #[test]
    fn trailer_encoding_round_trips() {
        let seal = Seal {
            content_len: 16 << 20,
            sha256: [7; 32],
        };
        assert_eq!(Seal::decode(&seal.encode()), Some(seal));
        assert_eq!(Seal::decode(&[0; TRAILER_LEN]), None);
        assert_eq!(Seal::decode(&seal.encode()[1..]), None);
    }
}
