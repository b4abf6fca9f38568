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

use async_compression::tokio::bufread::{ZstdDecoder, ZstdEncoder};
use async_compression::zstd::CParameter;
use async_compression::Level;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};

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

/// Hashes and counts the bytes that pass through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: AsyncRead + Unpin> AsyncRead for Hashing<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let new = &buf.filled()[before..];
        self.len += new.len() as u64;
        self.hasher.update(new);
        Poll::Ready(Ok(()))
    }
}

/// A reader producing the sealed form of `inner`: compressed content, then the trailer.
pub struct Sealer<R> {
    encoder: ZstdEncoder<BufReader<Hashing<R>>>,
    trailer: Option<([u8; TRAILER_LEN], usize)>,
    seal: Arc<OnceLock<Seal>>,
}

impl<R: AsyncRead + Unpin> Sealer<R> {
    pub fn new(inner: R, opts: SealOptions) -> Self {
        let hashing = Hashing {
            inner,
            hasher: Sha256::new(),
            len: 0,
        };
        let mut params = vec![CParameter::checksum_flag(true)];
        if opts.workers > 0 {
            params.push(CParameter::nb_workers(opts.workers));
        }
        let encoder = ZstdEncoder::with_quality_and_params(
            BufReader::with_capacity(IO_BUFFER, hashing),
            Level::Precise(opts.level),
            &params,
        );
        Self {
            encoder,
            trailer: None,
            seal: Arc::new(OnceLock::new()),
        }
    }

    /// Filled in once the whole content has been read through the sealer.
    pub fn seal_handle(&self) -> Arc<OnceLock<Seal>> {
        self.seal.clone()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Sealer<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        let this = &mut *self;
        if this.trailer.is_none() {
            let before = buf.filled().len();
            ready!(Pin::new(&mut this.encoder).poll_read(cx, buf))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            let hashing = this.encoder.get_ref().get_ref();
            let seal = Seal {
                content_len: hashing.len,
                sha256: hashing.hasher.clone().finalize().into(),
            };
            let _ = this.seal.set(seal);
            this.trailer = Some((seal.encode(), 0));
        }
        if let Some((bytes, pos)) = this.trailer.as_mut() {
            let n = buf.remaining().min(TRAILER_LEN - *pos);
            buf.put_slice(&bytes[*pos..*pos + n]);
            *pos += n;
        }
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

/// Notes whether the wrapped stream itself failed, to tell a broken download
/// (retry) from bytes that do not decompress (corrupt).
struct Tracked<R> {
    inner: R,
    failed: Arc<AtomicBool>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Tracked<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let res = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if res.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        Poll::Ready(res)
    }
}

/// Decompresses a downloaded object into `out`, verifying it against its
/// trailer. On error `out` has received unverified bytes: the caller must
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
    let Download { body, size } = download;
    if size < TRAILER_LEN as u64 {
        return Err(corrupt(format!(
            "it is {size} bytes, too short to hold a Walden checksum trailer"
        )));
    }
    let failed = Arc::new(AtomicBool::new(false));
    let tracked = Tracked {
        inner: body.take(size - TRAILER_LEN as u64),
        failed: failed.clone(),
    };
    let mut decoder = ZstdDecoder::new(BufReader::with_capacity(IO_BUFFER, tracked));
    decoder.multiple_members(true);
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; IO_BUFFER];
    loop {
        let n = match decoder.read(&mut buf).await {
            Ok(n) => n,
            Err(source) if failed.load(Ordering::Relaxed) => {
                return Err(UnsealError::Read {
                    object: object.to_string(),
                    source,
                })
            }
            Err(e) => return Err(corrupt(format!("it does not decompress: {e}"))),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
        out.write_all(&buf[..n])
            .await
            .map_err(|source| UnsealError::Write {
                object: object.to_string(),
                source,
            })?;
    }
    out.flush().await.map_err(|source| UnsealError::Write {
        object: object.to_string(),
        source,
    })?;
    let reader = decoder.into_inner();
    if !reader.buffer().is_empty() || reader.get_ref().inner.limit() != 0 {
        return Err(corrupt(
            "data follows the end of its compressed content".into(),
        ));
    }
    let mut body = reader.into_inner().inner.into_inner();
    let mut trailer = [0u8; TRAILER_LEN];
    body.read_exact(&mut trailer)
        .await
        .map_err(|source| UnsealError::Read {
            object: object.to_string(),
            source,
        })?;
    let seal = Seal::decode(&trailer).ok_or_else(|| {
        corrupt(
            "its checksum trailer is missing or damaged (not a Walden object, or truncated)".into(),
        )
    })?;
    let actual = Seal {
        content_len: len,
        sha256: hasher.finalize().into(),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    async fn seal_bytes(data: &[u8], opts: SealOptions) -> (Vec<u8>, Seal) {
        let sealer = Sealer::new(data, opts);
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
            assert_eq!(zstd_decode_all(&sealed).await, data);
        }
    }

    async fn zstd_decode_all(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut dec = ZstdDecoder::new(bytes);
        dec.multiple_members(true);
        dec.read_to_end(&mut out).await.unwrap();
        out
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
