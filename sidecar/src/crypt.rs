//! Client-side encryption of data objects (optional, off by default).
//!
//! With a key (`WALDEN_ENCRYPTION_KEY_FILE`: an age X25519 identity,
//! `AGE-SECRET-KEY-1…`), every *data* object — WAL segments, `.partial`
//! segments and backup parts — is stored as an [age] file whose plaintext is
//! the sealed object (zstd frames + the Walden trailer with the content's
//! SHA-256, see [`crate::object`]):
//!
//! ```text
//! age-encryption.org/v1 header (X25519 stanza, header MAC) | 16-byte nonce |
//! ChaCha20-Poly1305 chunks of 64 KiB of: [ zstd frames | 56-byte Walden trailer ]
//! ```
//!
//! age authenticates every chunk and the end of the stream, and the inner
//! trailer still verifies the plaintext after decryption. Metadata stays in
//! the clear so that listing and retention work without the key:
//! `walden.json`, `backup.json`, timeline history and backup history files.
//! `walden.json` records the key's fingerprint (a hash of the public key,
//! never the key), so a wrong key is refused up front with a clear message.
//!
//! The encryption is a [`Storage`] wrapper: the engine reads and writes sealed
//! objects as before, and sizes it sees (`Download::size`) are those of the
//! sealed form, which is what `backup.json` records.
//!
//! [age]: https://age-encryption.org/v1

use std::io::{self, Write};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use age::secrecy::ExposeSecret;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::repo::IDENTITY_KEY;
use crate::storage::{
    Created, Download, ErrorKind, Incomplete, ObjectInfo, Reader, Storage, StorageError,
};
use crate::wal::WalFile;

/// Plaintext bytes per age STREAM chunk, and the tag each chunk adds.
const CHUNK: u64 = 64 << 10;
const TAG: u64 = 16;
/// `walden.json` is tiny; refuse to rewrite more than this.
const MAX_IDENTITY_BYTES: u64 = 64 << 10;

/// The key that encrypts and decrypts this archive's data objects.
pub struct Keyring {
    identity: age::x25519::Identity,
    recipient: age::x25519::Recipient,
    fingerprint: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the encryption key file {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error(
        "the encryption key file {path} holds no age X25519 identity (a line starting with \
         AGE-SECRET-KEY-1; create one with age-keygen)"
    )]
    NoKey { path: String },
    #[error("the encryption key in {path} is not a valid age X25519 identity: {reason}")]
    Invalid { path: String, reason: String },
}

impl Keyring {
    /// Reads an age identity file (comments and blank lines allowed).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("AGE-SECRET-KEY-1"))
            .ok_or_else(|| KeyError::NoKey {
                path: shown.clone(),
            })?;
        let identity: age::x25519::Identity =
            line.parse().map_err(|reason: &str| KeyError::Invalid {
                path: shown,
                reason: reason.to_string(),
            })?;
        Ok(Self::from_identity(identity))
    }

    fn from_identity(identity: age::x25519::Identity) -> Self {
        let recipient = identity.to_public();
        let digest = Sha256::digest(format!("walden key fingerprint v1\n{recipient}").as_bytes());
        Self {
            fingerprint: format!("age-x25519-sha256:{}", &hex::encode(digest)[..32]),
            identity,
            recipient,
        }
    }

    /// A new random key, as the text of a key file.
    pub fn generate_key_file() -> String {
        let identity = age::x25519::Identity::generate();
        format!(
            "# walden encryption key (age X25519); public key: {}\n{}\n",
            identity.to_public(),
            identity.to_string().expose_secret()
        )
    }

    /// Identifies the key without revealing it: recorded in `walden.json`.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// True for the objects that hold database content and are encrypted.
pub fn is_data_key(key: &str) -> bool {
    if let Some(file) = WalFile::from_object_key(key) {
        return file.has_page_header();
    }
    key.strip_prefix("backups/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(id, name)| !id.is_empty() && name.starts_with("part-"))
}

/// A `Write` sink whose bytes the reader side drains.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("encryption buffer poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `inner` and yields its age encryption. An error of `inner` is
/// passed on, so a failed source aborts the upload instead of storing a
/// shorter object.
struct Encrypting {
    inner: Reader,
    writer: Option<age::stream::StreamWriter<Shared>>,
    out: Shared,
    pos: usize,
    scratch: Vec<u8>,
}

impl AsyncRead for Encrypting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            {
                let mut out = this
                    .out
                    .0
                    .lock()
                    .map_err(|_| io::Error::other("encryption buffer poisoned"))?;
                if this.pos < out.len() {
                    let n = buf.remaining().min(out.len() - this.pos);
                    buf.put_slice(&out[this.pos..this.pos + n]);
                    this.pos += n;
                    if this.pos == out.len() {
                        out.clear();
                        this.pos = 0;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            let Some(writer) = this.writer.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            let mut rb = ReadBuf::new(&mut this.scratch);
            ready!(this.inner.as_mut().poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                if let Some(w) = this.writer.take() {
                    w.finish()?;
                }
            } else {
                writer.write_all(&this.scratch[..n])?;
            }
        }
    }
}

fn encrypt(keys: &Keyring, body: Reader) -> io::Result<Reader> {
    let out = Shared::default();
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&keys.recipient as &dyn age::Recipient))
            .map_err(io::Error::other)?;
    let writer = encryptor.wrap_output(out.clone())?;
    Ok(Box::pin(Encrypting {
        inner: body,
        writer: Some(writer),
        out,
        pos: 0,
        scratch: vec![0u8; CHUNK as usize],
    }))
}

/// Counts the bytes read through it (to measure the age header).
struct Counting {
    inner: Reader,
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(self.inner.as_mut().poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        self.count
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Plaintext length of an age payload of `len` bytes (after header and nonce).
fn plaintext_len(len: u64) -> Option<u64> {
    let chunks = len.div_ceil(CHUNK + TAG);
    len.checked_sub(chunks * TAG)
}

/// Storage that encrypts data objects on the way in and decrypts them on the way out.
#[derive(Debug)]
pub struct Encrypted {
    inner: Arc<dyn Storage>,
    /// `None`: the archive is encrypted but no key was given; metadata still reads.
    keys: Option<Arc<Keyring>>,
    /// The fingerprint `walden.json` records, when the archive is encrypted.
    archive_fingerprint: Option<String>,
}

impl Encrypted {
    /// Checks `keys` against the archive's `walden.json` and wraps `inner`.
    /// Returns `inner` unchanged when neither a key nor an encrypted archive is involved.
    pub async fn open(
        inner: Arc<dyn Storage>,
        keys: Option<Keyring>,
    ) -> Result<Arc<dyn Storage>, StorageError> {
        let url = inner.url();
        let recorded = match crate::repo::load(inner.as_ref()).await {
            Ok(Some(id)) => Some(id.encryption_key_fingerprint),
            Ok(None) => None,
            // Storage unreachable now (the daemon may start during an outage) or a
            // problem the command reports itself: skip the early check; a wrong key
            // still fails on the first read, and a new walden.json is still stamped.
            Err(e) => {
                tracing::debug!(error = %e, "encryption check of walden.json skipped");
                None
            }
        };
        match (&keys, &recorded) {
            (None, None | Some(None)) => return Ok(inner),
            (Some(k), Some(Some(fp))) if fp != k.fingerprint() => {
                return Err(StorageError::config(format!(
                    "wrong encryption key: {url} is encrypted with the key whose fingerprint is {fp}, \
                     but the key file holds {}; use the key this archive was created with",
                    k.fingerprint()
                )))
            }
            (Some(_), Some(None)) => {
                return Err(StorageError::config(format!(
                    "{url} was created without encryption; it cannot be encrypted later \
                     (encryption is chosen when an archive is created: use a new prefix)"
                )))
            }
            _ => {}
        }
        Ok(Arc::new(Self {
            inner,
            keys: keys.map(Arc::new),
            archive_fingerprint: recorded.flatten(),
        }))
    }

    fn keys_for(&self, op: &'static str, key: &str) -> Result<&Keyring, StorageError> {
        self.keys.as_deref().ok_or_else(|| {
            StorageError::new(
                ErrorKind::Permanent,
                op,
                format!("{}/{key}", self.inner.url()),
                format!(
                    "the archive is encrypted (key fingerprint {}) and no key is configured: \
                     set WALDEN_ENCRYPTION_KEY_FILE to its key file",
                    self.archive_fingerprint.as_deref().unwrap_or("unknown")
                ),
            )
        })
    }

    /// Stamps the key fingerprint into a new `walden.json`.
    async fn stamp_identity(&self, keys: &Keyring, body: Reader) -> Result<Reader, StorageError> {
        let object = format!("{}/{IDENTITY_KEY}", self.inner.url());
        let mut bytes = Vec::new();
        body.take(MAX_IDENTITY_BYTES)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| StorageError::io("read", object.clone(), e))?;
        let mut id: crate::repo::RepoIdentity = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::new(ErrorKind::Permanent, "create", object.clone(), e))?;
        id.encryption_key_fingerprint = Some(keys.fingerprint().to_string());
        let mut json = serde_json::to_vec_pretty(&id)
            .map_err(|e| StorageError::new(ErrorKind::Permanent, "create", object, e))?;
        json.push(b'\n');
        Ok(Box::pin(io::Cursor::new(json)))
    }

    async fn decrypt(&self, keys: &Keyring, key: &str) -> Result<Download, StorageError> {
        let object = format!("{}/{key}", self.inner.url());
        let Download { body, size } = self.inner.get(key).await?;
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counting: Reader = Box::pin(Counting {
            inner: body,
            count: count.clone(),
        });
        let fail =
            |what: String| StorageError::new(ErrorKind::Permanent, "decrypt", object.clone(), what);
        let decryptor = match age::Decryptor::new_async(counting.compat()).await {
            Ok(d) => d,
            Err(age::DecryptError::Io(e)) => return Err(StorageError::io("read", object.clone(), e)),
            Err(e) => {
                return Err(fail(format!(
                    "it is not an encrypted Walden object ({e}); the archive may have been written without encryption"
                )))
            }
        };
        let header = count.load(std::sync::atomic::Ordering::Relaxed);
        let plain = size
            .checked_sub(header)
            .and_then(plaintext_len)
            .ok_or_else(|| {
                fail(format!(
                    "it is {size} bytes, too short for its encryption header"
                ))
            })?;
        let reader = decryptor
            .decrypt_async(std::iter::once(&keys.identity as &dyn age::Identity))
            .map_err(|e| match e {
                age::DecryptError::NoMatchingKeys => fail(format!(
                    "it was encrypted for another key than the configured one (fingerprint {})",
                    keys.fingerprint()
                )),
                e => fail(e.to_string()),
            })?;
        Ok(Download {
            body: Box::pin(reader.compat()),
            size: plain,
        })
    }
}

#[async_trait]
impl Storage for Encrypted {
    fn url(&self) -> String {
        self.inner.url()
    }

    async fn create(&self, key: &str, body: Reader) -> Result<Created, StorageError> {
        if key == IDENTITY_KEY {
            if let Some(keys) = self.keys.as_deref() {
                let stamped = self.stamp_identity(keys, body).await?;
                return self.inner.create(key, stamped).await;
            }
        }
        if !is_data_key(key) {
            return self.inner.create(key, body).await;
        }
        let keys = self.keys_for("create", key)?;
        let encrypted = encrypt(keys, body).map_err(|e| {
            StorageError::new(
                ErrorKind::Permanent,
                "encrypt",
                format!("{}/{key}", self.url()),
                e,
            )
        })?;
        self.inner.create(key, encrypted).await
    }

    async fn get(&self, key: &str) -> Result<Download, StorageError> {
        if !is_data_key(key) {
            return self.inner.get(key).await;
        }
        let keys = self.keys_for("get", key)?;
        self.decrypt(keys, key).await
    }

    async fn get_tail(&self, key: &str, len: u64) -> Result<Vec<u8>, StorageError> {
        if !is_data_key(key) {
            return self.inner.get_tail(key, len).await;
        }
        // The trailer is inside the encryption: read through to the end (rare: only
        // when a push finds its object already stored).
        let keys = self.keys_for("get", key)?;
        let Download { mut body, .. } = self.decrypt(keys, key).await?;
        let object = format!("{}/{key}", self.url());
        let keep = usize::try_from(len).unwrap_or(usize::MAX);
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; CHUNK as usize];
        loop {
            let n = body
                .read(&mut buf)
                .await
                .map_err(|e| StorageError::io("read", object.clone(), e))?;
            if n == 0 {
                break;
            }
            tail.extend_from_slice(&buf[..n]);
            if tail.len() > keep {
                tail.drain(..tail.len() - keep);
            }
        }
        Ok(tail)
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, StorageError> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list(prefix).await
    }

    /// Listings show the encrypted size, and the header's size varies (age
    /// adds a random "grease" stanza): read the header to know the plaintext's.
    async fn written_size(&self, object: &ObjectInfo) -> Result<u64, StorageError> {
        if !is_data_key(&object.key) {
            return self.inner.written_size(object).await;
        }
        let keys = self.keys_for("get", &object.key)?;
        Ok(self.decrypt(keys, &object.key).await?.size)
    }

    async fn list_folders(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        self.inner.list_folders(prefix).await
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        self.inner.delete(keys).await
    }

    async fn list_incomplete(&self) -> Result<Vec<Incomplete>, StorageError> {
        self.inner.list_incomplete().await
    }

    async fn remove_incomplete(&self, item: &Incomplete) -> Result<(), StorageError> {
        self.inner.remove_incomplete(item).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::object::{unseal, SealOptions, Sealer};
    use crate::storage::FileStorage;

    fn keyring() -> Keyring {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, Keyring::generate_key_file()).unwrap();
        Keyring::load(&path).unwrap()
    }

    #[test]
    fn data_keys_are_segments_and_parts_only() {
        for (key, data) in [
            ("wal/0000000100000000/000000010000000000000001.zst", true),
            (
                "wal/0000000200000000/000000020000000000000003.partial.zst",
                true,
            ),
            ("wal/00000002.history.zst", false),
            (
                "wal/0000000100000000/000000010000000000000002.00000028.backup.zst",
                false,
            ),
            ("backups/20260101T000000Z/part-00001.tar.zst", true),
            ("backups/20260101T000000Z/backup.json", false),
            ("walden.json", false),
        ] {
            assert_eq!(is_data_key(key), data, "{key}");
        }
    }

    #[test]
    fn plaintext_length_follows_the_chunking() {
        for plain in [
            0u64,
            1,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            5 * CHUNK,
            5 * CHUNK + 7,
        ] {
            let chunks = plain.div_ceil(CHUNK).max(1);
            assert_eq!(plaintext_len(plain + chunks * TAG), Some(plain), "{plain}");
        }
    }

    /// A backup re-checks its parts by listing: the listed (encrypted) size of
    /// each must be recognised as holding what was written, a shorter or
    /// longer object must not.
    #[tokio::test]
    async fn a_listing_shows_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().to_path_buf()));
        let enc = Encrypted::open(raw.clone(), Some(keyring())).await.unwrap();
        crate::repo::ensure_identity(
            enc.as_ref(),
            crate::repo::RepoIdentity::new(7, Some(15), 16 << 20),
            "test",
        )
        .await
        .unwrap();
        for (i, len) in [0usize, 1, CHUNK as usize, CHUNK as usize + 1, 300_000]
            .into_iter()
            .enumerate()
        {
            let key = format!("backups/20260101T000000Z/part-{i:05}.tar.zst");
            enc.create(&key, Box::pin(io::Cursor::new(vec![7u8; len])))
                .await
                .unwrap();
            let listed = enc.list(&key).await.unwrap().remove(0);
            assert_eq!(enc.written_size(&listed).await.unwrap(), len as u64);
            assert!(raw.written_size(&listed).await.unwrap() > len as u64);
            // A cut object is smaller than what was written.
            let path = dir.path().join(&key);
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
            let cut = enc.list(&key).await.unwrap().remove(0);
            assert_ne!(enc.written_size(&cut).await.ok(), Some(len as u64));
        }
        let meta = enc.list("walden.json").await.unwrap().remove(0);
        assert_eq!(enc.written_size(&meta).await.unwrap(), meta.size);
    }

    #[tokio::test]
    async fn round_trip_hides_content_and_refuses_another_key() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().to_path_buf()));
        let keys = keyring();
        let fingerprint = keys.fingerprint().to_string();
        let enc = Encrypted::open(raw.clone(), Some(keys)).await.unwrap();
        let identity = crate::repo::RepoIdentity::new(7, Some(15), 16 << 20);
        crate::repo::ensure_identity(enc.as_ref(), identity, "test")
            .await
            .unwrap();
        let stored = crate::repo::require(raw.as_ref()).await.unwrap();
        assert_eq!(
            stored.encryption_key_fingerprint.as_deref(),
            Some(fingerprint.as_str())
        );

        let content: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("SECRET-ROW-{i};").into_bytes())
            .collect();
        let key = "backups/20260101T000000Z/part-00001.tar.zst";
        let sealer = Sealer::new(io::Cursor::new(content.clone()), SealOptions::default());
        let seal = sealer.seal_handle();
        let mut sealed = Vec::new();
        Sealer::new(io::Cursor::new(content.clone()), SealOptions::default())
            .read_to_end(&mut sealed)
            .await
            .unwrap();
        enc.create(key, Box::pin(sealer)).await.unwrap();
        let on_disk = std::fs::read(dir.path().join(key)).unwrap();
        assert!(on_disk.starts_with(b"age-encryption.org/v1\n"));
        assert!(!on_disk.windows(11).any(|w| w == b"SECRET-ROW-"));

        let download = enc.get(key).await.unwrap();
        assert_eq!(
            download.size,
            sealed.len() as u64,
            "sizes are those of the sealed form"
        );
        let mut out = Vec::new();
        let got = unseal(key, download, &mut out).await.unwrap();
        assert_eq!(out, content);
        assert_eq!(Some(&got), seal.get());
        let tail = enc
            .get_tail(key, crate::object::TRAILER_LEN as u64)
            .await
            .unwrap();
        assert_eq!(crate::object::Seal::decode(&tail), Some(got));

        // Another key is refused before any data is read.
        let err = Encrypted::open(raw.clone(), Some(keyring()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("wrong encryption key"), "{err}");
        // No key: metadata reads, data does not, with a message that says why.
        let nokey = Encrypted::open(raw.clone(), None).await.unwrap();
        assert!(nokey.get(IDENTITY_KEY).await.is_ok());
        let err = nokey.get(key).await.err().expect("no key");
        assert!(
            err.to_string().contains("WALDEN_ENCRYPTION_KEY_FILE"),
            "{err}"
        );
        // Flipping a stored byte is detected by the authentication.
        let mut bad = on_disk.clone();
        let at = bad.len() / 2;
        bad[at] ^= 1;
        std::fs::write(dir.path().join(key), bad).unwrap();
        let mut out = Vec::new();
        let download = enc.get(key).await.unwrap();
        assert!(unseal(key, download, &mut out).await.is_err());
    }

    #[tokio::test]
    async fn an_unencrypted_archive_is_not_encrypted_later() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Storage> = Arc::new(FileStorage::new(dir.path().to_path_buf()));
        let identity = crate::repo::RepoIdentity::new(7, Some(15), 16 << 20);
        crate::repo::ensure_identity(raw.as_ref(), identity, "test")
            .await
            .unwrap();
        let err = Encrypted::open(raw, Some(keyring())).await.unwrap_err();
        assert!(
            err.to_string().contains("created without encryption"),
            "{err}"
        );
    }
}
