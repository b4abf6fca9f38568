//! Walden's engine: WAL archiving, base backups and restores to object storage.
//!
//! The binary (`walden`) is a thin layer over these modules:
//! - [`storage`]: where bytes live (`file://`, `s3://`), behind one small async trait;
//! - [`object`]: how every stored object is sealed (zstd + a checksum trailer) and verified;
//! - [`crypt`]: optional client-side encryption of data objects (age, X25519);
//! - [`repo`]: the repository identity (`walden.json`) that ties a prefix to one database;
//! - [`wal`]: WAL file names, segment headers, and the push/fetch operations;
//! - [`backup`]: hot base backups (`pg_backup_start`, PGDATA as tar parts, `pg_backup_stop`);
//! - [`catalog`]: the backups that exist, the recovery window, which backup fits a target;
//! - [`restore`]: a backup unpacked into an empty directory with its recovery settings;
//! - [`retention`]: which backups and WAL a policy lets go (a pure planner) and their deletion;
//! - [`verify`]: checksums of every object, complete backups, WAL continuity across timelines;
//! - [`timeline`]: timeline histories, to place WAL positions on a line of history;
//! - [`pg`]: the connection to the protected server; [`lsn`]: log positions;
//! - [`retry`]: bounded retries with backoff for transient storage errors;
//! - [`daemon`]: `walden daemon`, the sidecar (socket, parallel archiving, prefetch, HTTP API);
//! - [`client`]: the thin `wal-push`/`wal-fetch` client that delegates to the daemon.

pub mod backup;
pub mod catalog;
pub mod client;
pub mod config;
pub mod crypt;
pub mod daemon;
pub mod durable;
pub mod lsn;
pub mod object;
pub mod pg;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod storage;
pub mod timeline;
pub mod verify;
pub mod wal;
