//! Turning the stream of PGDATA entries into parts: each part is a complete
//! tar archive (so parts restore independently and in parallel), compressed
//! and sealed on its way to storage. Several parts are built at once; each
//! holds fixed-size buffers only.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{mpsc, Mutex};
use tokio_util::io::StreamReader;
use tracing::Instrument;

use super::walk::{Entry, EntryKind};
use super::BackupError;
use crate::catalog::Part;
use crate::object::{SealOptions, Sealer};
use crate::storage::{Created, Storage};

/// Bytes handed from the tar builder to the compressor at a time.
const CHUNK: usize = 1 << 20;
/// Chunks in flight between the tar builder and the compressor of one part.
const CHUNKS_IN_FLIGHT: usize = 2;
const READ_BUFFER: usize = 256 << 10;

#[derive(Debug, Clone, Copy)]
pub struct PartOptions {
    /// A part is closed once its uncompressed tar reaches this size.
    pub part_size: u64,
    /// Parts built and uploaded at once.
    pub parallelism: usize,
    pub seal: SealOptions,
}

/// Totals of what went into the parts.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub files: u64,
    pub logical: u64,
}

type Entries = Arc<Mutex<mpsc::Receiver<Entry>>>;

/// Builds and uploads parts until the entry stream ends.
pub async fn upload(
    storage: Arc<dyn Storage>,
    prefix: String,
    entries: mpsc::Receiver<Entry>,
    opts: PartOptions,
) -> Result<(Vec<Part>, Totals), BackupError> {
    let entries: Entries = Arc::new(Mutex::new(entries));
    let counter = Arc::new(AtomicU32::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..opts.parallelism.max(1) {
        let (storage, prefix, entries, counter) = (
            storage.clone(),
            prefix.clone(),
            entries.clone(),
            counter.clone(),
        );
        workers.spawn(async move {
            let mut parts = Vec::new();
            let mut totals = Totals::default();
            loop {
                let first = entries.lock().await.recv().await;
                let Some(first) = first else { break };
                let number = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let (part, t) = upload_part(
                    storage.as_ref(),
                    &prefix,
                    number,
                    first,
                    entries.clone(),
                    opts,
                )
                .await?;
                totals.files += t.files;
                totals.logical += t.logical;
                parts.push(part);
            }
            Ok::<_, BackupError>((parts, totals))
        });
    }
    let mut parts = Vec::new();
    let mut totals = Totals::default();
    let mut first_error = None;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok((p, t))) => {
                parts.extend(p);
                totals.files += t.files;
                totals.logical += t.logical;
            }
            Ok(Err(e)) => {
                // Stop the others: they would only add parts to a failed backup.
                workers.abort_all();
                first_error.get_or_insert(e);
            }
            Err(e) if e.is_cancelled() => {}
            Err(e) => {
                first_error
                    .get_or_insert(BackupError::Internal(format!("part worker failed: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    parts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((parts, totals))
}

async fn upload_part(
    storage: &dyn Storage,
    prefix: &str,
    number: u32,
    first: Entry,
    entries: Entries,
    opts: PartOptions,
) -> Result<(Part, Totals), BackupError> {
    let name = format!("part-{number:05}.tar.zst");
    let key = format!("{prefix}{name}");
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHUNKS_IN_FLIGHT);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let sealer = Sealer::new(StreamReader::new(Box::pin(stream)), opts.seal);
    let seal = sealer.seal_handle();
    let stored = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Counting {
        inner: sealer,
        count: stored.clone(),
    };
    let part_size = opts.part_size;
    let builder = tokio::task::spawn_blocking(move || build_tar(first, &entries, tx, part_size));
    let created = storage
        .create(&key, Box::pin(counted))
        .instrument(tracing::info_span!("part", name = %name))
        .await;
    let totals = builder
        .await
        .map_err(|e| BackupError::Internal(format!("tar builder failed: {e}")))?;
    // Report the root cause: a file that cannot be read, else the storage error
    // (which also makes the tar side fail, with a mere broken pipe).
    let totals = match (totals, created) {
        (Err(e), _) if !e.is_upload_aborted() => return Err(e),
        (_, Err(e)) => return Err(e.into()),
        (Err(e), _) => return Err(e),
        (Ok(t), Ok(c)) => {
            if c == Created::AlreadyExists {
                return Err(BackupError::Conflict(format!(
                    "{}/{key} already exists: another backup with the same id?",
                    storage.url()
                )));
            }
            t
        }
    };
    let seal = seal
        .get()
        .copied()
        .ok_or_else(|| BackupError::Internal(format!("{name}: upload ended before its content")))?;
    tracing::debug!(files = totals.files, bytes = totals.logical, "part stored");
    Ok((
        Part {
            name,
            stored_size: stored.load(Ordering::SeqCst),
            content_size: seal.content_len,
            sha256: seal.sha256_hex(),
        },
        totals,
    ))
}

/// Counts the bytes that pass through: the stored size of a part.
struct Counting<R> {
    inner: R,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Counting<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        self.count
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        res
    }
}

/// Sends tar bytes to the compressor in fixed-size chunks.
struct ChunkWriter {
    buf: BytesMut,
    tx: mpsc::Sender<io::Result<Bytes>>,
    written: u64,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = self.buf.split().freeze();
        self.buf.reserve(CHUNK);
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(io::ErrorKind::BrokenPipe, "the upload of this part failed")
        })
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Reads exactly `remaining` bytes: a file that shrank since it was listed
/// is padded with zeros, as PostgreSQL's own base backup does (WAL replay
/// rewrites those pages); a file that grew is cut at the listed size.
struct Exactly<R> {
    inner: R,
    remaining: u64,
    eof: bool,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = if self.eof {
            0
        } else {
            self.inner.read(&mut buf[..want])?
        };
        let n = if n == 0 {
            self.eof = true;
            buf[..want].fill(0);
            want
        } else {
            n
        };
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Builds one tar archive from entries until it reaches `part_size`.
fn build_tar(
    first: Entry,
    entries: &Entries,
    tx: mpsc::Sender<io::Result<Bytes>>,
    part_size: u64,
) -> Result<Totals, BackupError> {
    let writer = ChunkWriter {
        buf: BytesMut::with_capacity(CHUNK),
        tx,
        written: 0,
    };
    let mut tar = tar::Builder::new(writer);
    tar.mode(tar::HeaderMode::Complete);
    let mut totals = Totals::default();
    let mut next = Some(first);
    while let Some(entry) = next.take() {
        append(&mut tar, &entry, &mut totals)?;
        if tar.get_ref().written >= part_size {
            break;
        }
        next = entries.blocking_lock().blocking_recv();
    }
    let mut writer = tar.into_inner().map_err(|e| BackupError::Local {
        path: "tar stream".into(),
        source: e,
    })?;
    writer.flush().map_err(|e| BackupError::Local {
        path: "tar stream".into(),
        source: e,
    })?;
    Ok(totals)
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    entry: &Entry,
    totals: &mut Totals,
) -> Result<(), BackupError> {
    let local = |source: io::Error| BackupError::Local {
        path: entry.path.display().to_string(),
        source,
    };
    let mut header = tar::Header::new_gnu();
    header.set_mode(entry.mode);
    header.set_mtime(entry.mtime);
    match entry.kind {
        EntryKind::Dir => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, &entry.name, io::empty())
                .map_err(local)?;
        }
        EntryKind::File { size } => {
            let file = match std::fs::File::open(&entry.path) {
                Ok(f) => f,
                // Dropped or truncated away since it was listed: PostgreSQL allows it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(local(e)),
            };
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            let reader = Exactly {
                inner: io::BufReader::with_capacity(READ_BUFFER, file),
                remaining: size,
                eof: false,
            };
            tar.append_data(&mut header, &entry.name, reader)
                .map_err(local)?;
            totals.files += 1;
            totals.logical += size;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_pads_short_files_and_cuts_long_ones() {
        let mut out = Vec::new();
        Exactly {
            inner: &b"abc"[..],
            remaining: 5,
            eof: false,
        }
        .read_to_end(&mut out)
        .unwrap();
        assert_eq!(out, b"abc\0\0");
        let mut out = Vec::new();
        Exactly {
            inner: &b"abcdef"[..],
            remaining: 4,
            eof: false,
        }
        .read_to_end(&mut out)
        .unwrap();
        assert_eq!(out, b"abcd");
    }
}
