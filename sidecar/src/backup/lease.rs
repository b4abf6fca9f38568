//! A running backup's claim on its folder, so that nothing mistakes it for
//! an abandoned one.
//!
//! `backup-push` claims its id by creating `backups/<id>/lease-000000.json`
//! (write-once, so of two backups starting in the same second exactly one
//! gets the id and the other moves on to the next), then renews the lease
//! every [`LEASE_INTERVAL`] by writing the next numbered lease object and
//! deleting the previous one. Retention keeps every folder without
//! `backup.json` holding an object stored within its grace period (see
//! [`crate::retention`]), and the grace period is many lease intervals long:
//! a live backup's folder is never deleted. The lease goes once `backup.json`
//! is stored; a failed backup deletes its lease with its parts.

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::watch;

use crate::catalog::BackupManifest;
use crate::storage::{Created, Storage, StorageError};

/// How often a running backup renews its lease.
pub const LEASE_INTERVAL: Duration = Duration::from_secs(30);
/// Name prefix of lease objects inside a backup folder.
pub const LEASE_PREFIX: &str = "lease-";

/// The key of lease number `seq` of backup `id`.
pub fn lease_key(id: &str, seq: u64) -> String {
    format!("{}{LEASE_PREFIX}{seq:06}.json", BackupManifest::prefix(id))
}

/// True for the key of a lease object.
pub fn is_lease_key(key: &str) -> bool {
    key.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with(LEASE_PREFIX) && name.ends_with(".json"))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LeaseBody<'a> {
    backup: &'a str,
    pid: u32,
    renewed_at: DateTime<Utc>,
    /// When the lease lapses if it is not renewed (informational: retention
    /// goes by the storage time of the objects).
    expires_at: DateTime<Utc>,
}

fn body(id: &str) -> Vec<u8> {
    let now = Utc::now();
    let lapse = chrono::Duration::from_std(LEASE_INTERVAL * 4).unwrap_or_default();
    serde_json::to_vec_pretty(&LeaseBody {
        backup: id,
        pid: std::process::id(),
        renewed_at: now,
        expires_at: now + lapse,
    })
    .unwrap_or_default()
}

/// Creates lease `seq` of `id`; `AlreadyExists` means another backup holds the id.
pub async fn create(storage: &dyn Storage, id: &str, seq: u64) -> Result<Created, StorageError> {
    storage
        .create(&lease_key(id, seq), Box::pin(Cursor::new(body(id))))
        .await
}

/// Renews the lease of `id` (first written as number 0) until `stop` turns
/// true; returns the key of the last lease written, for the caller to delete.
/// A failed renewal is logged and retried at the next interval: the backup
/// re-checks its parts before it writes `backup.json`.
pub async fn renew_until(
    storage: Arc<dyn Storage>,
    id: String,
    mut stop: watch::Receiver<bool>,
) -> String {
    let mut current = 0u64;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return lease_key(&id, current),
            _ = tokio::time::sleep(LEASE_INTERVAL) => {}
        }
        let next = current + 1;
        match create(storage.as_ref(), &id, next).await {
            Ok(_) => {
                if let Err(e) = storage.delete(&[lease_key(&id, current)]).await {
                    tracing::debug!(error = %e, "could not delete the previous lease (retention removes it with the folder)");
                }
                current = next;
            }
            Err(e) => {
                tracing::warn!(backup = %id, error = %e, "could not renew the backup's lease")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_are_recognised() {
        let k = lease_key("20260101T000000Z", 7);
        assert_eq!(k, "backups/20260101T000000Z/lease-000007.json");
        assert!(is_lease_key(&k));
        assert!(!is_lease_key("backups/x/part-00001.tar.zst"));
        assert!(!is_lease_key("backups/x/backup.json"));
    }
}
