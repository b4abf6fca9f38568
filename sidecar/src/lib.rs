//! Walden's engine: WAL archiving and restore to object storage.
//!
//! The binary (`walden`) is a thin layer over these modules:
//! - [`storage`]: where bytes live (`file://`, `s3://`), behind one small async trait;
//! - [`object`]: how every stored object is sealed (zstd + a checksum trailer) and verified;
//! - [`repo`]: the repository identity (`walden.json`) that ties a prefix to one database;
//! - [`wal`]: WAL file names, segment headers, and the push/fetch operations;
//! - [`retry`]: bounded retries with backoff for transient storage errors;
//! - [`daemon`]: `walden daemon`, the sidecar (socket, parallel archiving, prefetch, HTTP API);
//! - [`client`]: the thin `wal-push`/`wal-fetch` client that delegates to the daemon.

pub mod client;
pub mod config;
pub mod daemon;
pub mod object;
pub mod repo;
pub mod retry;
pub mod storage;
pub mod wal;
