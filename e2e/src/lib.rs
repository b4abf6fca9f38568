//! Harness for Walden's end-to-end tests: real PostgreSQL servers (14 to 18) run as
//! an unprivileged user, a real S3-compatible server (s3s-fs) on 127.0.0.1,
//! a fault-injecting proxy in front of it, and the `walden` binary.
//!
//! Everything listens on loopback only, and every process gets explicit test
//! credentials with `AWS_EC2_METADATA_DISABLED=true`, so nothing ever probes
//! instance metadata or any outside host.

pub mod archive;
pub mod daemon;
pub mod ledger;
pub mod pg;
pub mod pod;
pub mod proxy;
pub mod s3;
pub mod sys;

pub use archive::{Archive, StorageKind};
pub use daemon::Daemon;
pub use pg::PgCluster;
pub use proxy::FaultProxy;
pub use s3::S3Server;
pub use sys::{walden_bin, Workdir};
