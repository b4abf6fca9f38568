//! The daemon's HTTP API bodies (design §6): the daemon serializes them, the
//! operator and the tests deserialize them. Fields added later carry
//! `#[serde(default)]` so that an operator can read an older daemon.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DaemonStatus {
    pub role: Role,
    pub archiving: Archiving,
    pub last_backup: Option<LastBackup>,
    pub backup_in_progress: Option<BackupInProgress>,
    pub recovery_window: Option<RecoveryWindow>,
    pub replay: Option<Replay>,
    /// Where archive recovery ended, on a server that went through it (a
    /// Fork, a promoted Follower). Absent from older daemons.
    #[serde(default)]
    pub recovered_to: Option<RecoveredTo>,
    /// How far the archive is stored without a gap from the oldest backup.
    /// Absent from older daemons, and before the daemon's first check.
    #[serde(default)]
    pub continuity: Option<Continuity>,
}

/// The archive's continuity as the daemon last checked it in storage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Continuity {
    pub checked_through: Option<String>,
    pub first_hole: Option<ArchiveHole>,
}

/// The first file missing below the archive's end: recovery stops before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveHole {
    pub missing: String,
    /// The last segment stored before it (none: the oldest backup's start is missing).
    pub after: Option<String>,
}

/// The last replayed position of a finished recovery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveredTo {
    pub lsn: String,
    #[serde(default)]
    pub time: Option<DateTime<Utc>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Archiving {
    pub last_archived_wal: Option<String>,
    pub last_archived_time: Option<DateTime<Utc>>,
    pub last_failed_wal: Option<String>,
    pub last_failed_time: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub archived_count: u64,
    pub failed_count: u64,
    pub ready_count: u64,
    /// When the oldest segment waiting for archiving was complete; absent
    /// when nothing waits (and from older daemons).
    #[serde(default)]
    pub oldest_ready_time: Option<DateTime<Utc>>,
    /// Set while the archive refuses the server because it belongs to another
    /// database: after `pg_upgrade` (a new system identifier), or a prefix
    /// shared by mistake. Cleared by the next stored segment. Absent from
    /// older daemons.
    #[serde(default)]
    pub identity_mismatch: Option<IdentityMismatch>,
}

/// The server and the archive it was refused by: which database each is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentityMismatch {
    /// The server's database system identifier (decimal).
    pub server_system_identifier: String,
    /// The server's PostgreSQL major version, when its WAL says so.
    pub server_pg_version: Option<u32>,
    /// The system identifier `walden.json` records for the archive.
    pub archive_system_identifier: String,
    /// The archive's PostgreSQL major version, when recorded.
    pub archive_pg_version: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastBackup {
    pub id: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub start_lsn: String,
    pub stop_lsn: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupInProgress {
    pub id: String,
    pub start_time: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryWindow {
    pub first_point: DateTime<Utc>,
    pub first_lsn: String,
    pub last_archived_wal: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    pub replay_lsn: String,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
    /// A WAL receiver streams from the primary; false: WAL comes from the
    /// archive only. Absent from older daemons.
    #[serde(default)]
    pub streaming: Option<bool>,
}

/// `POST /v1/backups` (202) body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupAccepted {
    pub id: String,
    pub state: BackupState,
}

/// `POST /v1/backups` (409) body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupConflict {
    pub error: String,
    pub running: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupState {
    Running,
    Succeeded,
    Failed,
}

/// `GET /v1/backups/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupJob {
    pub id: String,
    pub state: BackupState,
    pub error: Option<String>,
    pub start_time: Option<DateTime<Utc>>,
    pub stop_time: Option<DateTime<Utc>>,
}

/// `POST /v1/promote` (200) body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Promoted {
    pub promoted: bool,
}

/// Any error answer: `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}
