//! Custom resources of `walden.dev/v1alpha1` (design §7).
//!
//! Validation that the schema can express (types, enums, formats, minimums,
//! CEL rules) lives here, so `kubectl apply` rejects bad specs before the
//! operator sees them. What the schema cannot check (cron syntax, a target
//! outside the recovery window) the controllers report in a condition.

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every Walden resource.
pub const GROUP: &str = "walden.dev";

/// Finalizer that lets the ContinuousBackup controller remove its injection
/// from the target StatefulSet before the resource goes away.
pub const CONTINUOUS_BACKUP_FINALIZER: &str = "walden.dev/injection";

/// Protects an existing PostgreSQL StatefulSet: WAL archiving and scheduled
/// base backups to object storage.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "walden.dev",
    version = "v1alpha1",
    kind = "ContinuousBackup",
    namespaced,
    shortname = "cb",
    status = "ContinuousBackupStatus",
    derive = "PartialEq",
    doc = "Continuous protection of a PostgreSQL StatefulSet: WAL archiving and scheduled base backups.",
    printcolumn = r#"{"name": "Ready", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name": "Last Backup", "type": "date", "jsonPath": ".status.lastBackup.stopTime"}"#,
    printcolumn = r#"{"name": "Recoverable From", "type": "string", "jsonPath": ".status.firstRecoverabilityPoint"}"#,
    printcolumn = r#"{"name": "Archive Backlog", "type": "integer", "jsonPath": ".status.archiveBacklog", "description": "WAL segments PostgreSQL has finished that are not archived yet (0 on a healthy database, idle or busy)"}"#,
    printcolumn = r#"{"name": "Archive Lag", "type": "date", "jsonPath": ".status.archiveBacklogSince", "description": "How long the oldest WAL segment not archived yet has waited; empty when none waits"}"#,
    printcolumn = r#"{"name": "Restore Test", "type": "string", "jsonPath": ".status.lastRestoreTest.result", "description": "The last restore proof: Succeeded, Failed or TimedOut"}"#,
    printcolumn = r#"{"name": "Last Archived", "type": "date", "jsonPath": ".status.lastArchivedTime", "description": "When the newest WAL segment was archived; grows on an idle database, which is not a lag", "priority": 1}"#,
    printcolumn = r#"{"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend", "priority": 1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ContinuousBackupSpec {
    /// The PostgreSQL StatefulSet to protect.
    pub target: TargetSpec,
    /// Where the archive lives.
    pub storage: StorageSpec,
    /// zstd compression of WAL and base backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSpec>,
    /// Base backup schedule, standard five-field cron syntax (UTC), e.g. "0 3 * * *".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 9))]
    pub schedule: Option<String>,
    /// What to do when scheduled backups were missed (operator down): take one now, or skip to the next.
    #[serde(default)]
    pub missed_backup_policy: MissedBackupPolicy,
    /// Each scheduled backup starts at a fixed point within this window
    /// after its scheduled time (derived from the resource's UID, shown in
    /// status.nextBackupTime), so that databases sharing a schedule do not
    /// all start at once; e.g. "30m", "2h". At most half the time between
    /// runs is used. Default: the operator's --backup-window (1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = walden_contract::duration::PATTERN), length(min = 1))]
    pub backup_window: Option<String>,
    /// Which backups the archive keeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionSpec>,
    /// PostgreSQL archive_timeout: the longest a committed transaction waits before its WAL is archived.
    #[serde(default = "default_archive_timeout")]
    #[schemars(regex(pattern = r"^[1-9][0-9]*(s|min|h)$"))]
    pub archive_timeout: String,
    /// Pauses scheduled base backups. WAL archiving continues.
    #[serde(default)]
    pub suspend: bool,
    /// Resources of the walden sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
    /// On-demand base backup: set a new value (any token, e.g. a timestamp)
    /// and the operator takes one backup for it; status.backupRequest echoes
    /// the last value handled. Declarative, for GitOps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub backup_request: Option<String>,
    /// Scheduled restore proofs: a throwaway restore of the archive, checked
    /// with pg_amcheck and SQL; the Recoverable condition reports the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_test: Option<RestoreTestSpec>,
}

/// A restore proof: on schedule, the archive is restored into a temporary
/// pod (read-only to the archive, like a Fork), PostgreSQL recovers, and
/// pg_amcheck and the checks run on it; the pod is removed afterwards.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestSpec {
    /// When to prove, five-field cron syntax (UTC), e.g. "0 5 * * *".
    #[schemars(length(min = 9))]
    pub schedule: String,
    /// Latest: the end of the archive. Random: a random WAL position inside
    /// the recovery window, so that over time every part of it is proven.
    #[serde(default)]
    pub target: RestoreTestTarget,
    /// SQL that must return true on the restored database, e.g.
    /// `select count(*) > 0 from orders`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<RestoreTestCheck>,
    /// Database the checks run in.
    #[serde(default = "default_postgres")]
    #[schemars(length(min = 1))]
    pub database: String,
    /// Role the proof connects as: a superuser of the source (pg_amcheck
    /// installs its extension where missing).
    #[serde(default = "default_postgres")]
    #[schemars(length(min = 1))]
    pub user: String,
    /// Run pg_amcheck (heap and btree indexes of every database).
    #[serde(default = "default_true")]
    pub amcheck: bool,
    /// A proof not finished this many seconds after it started fails (TimedOut).
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 60))]
    pub deadline_seconds: i64,
    /// Recoverable stays True this long after the last successful proof.
    #[serde(default = "default_max_age")]
    #[schemars(range(min = 60))]
    pub max_age_seconds: i64,
    /// PostgreSQL image of the proof [default: the image of the protected
    /// StatefulSet's postgres container, so the major version matches].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Resources of the proof's PostgreSQL container [default: requests of
    /// 100m CPU and 256Mi memory, no limits].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Size limit of the proof's scratch volume (an emptyDir on the node),
    /// e.g. "20Gi"; it must hold the restored database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_size: Option<String>,
}

impl ContinuousBackupSpec {
    /// The zstd level the archive is written with.
    pub fn compression_level(&self) -> i32 {
        self.compression
            .as_ref()
            .map_or(walden_contract::pod::DEFAULT_COMPRESSION_LEVEL, |c| c.level)
    }
}

fn default_postgres() -> String {
    "postgres".to_string()
}
fn default_true() -> bool {
    true
}
fn default_deadline() -> i64 {
    3600
}
fn default_max_age() -> i64 {
    48 * 3600
}

/// Where a restore proof recovers to.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum RestoreTestTarget {
    /// The end of the archive.
    #[default]
    Latest,
    /// A random WAL position between the oldest backup's end and the start
    /// of the last recoverable segment.
    Random,
}

/// One SQL check of a restore proof.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestCheck {
    /// Shown in status and Events.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Its last row must be one true value.
    #[schemars(length(min = 1))]
    pub sql: String,
}

/// A restore proof in flight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestRun {
    pub pod: String,
    pub started_at: DateTime<Utc>,
    /// The WAL position asked for; none: the end of the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_lsn: Option<String>,
}

/// How a restore proof ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RestoreTestResult {
    Succeeded,
    Failed,
    TimedOut,
}

/// The outcome of one check of a proof (pg_amcheck included).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestCheckStatus {
    pub name: String,
    pub passed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Where a proof's recovery ended, as the restored server reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestReached {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// The last replayed transaction's commit time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
}

/// The last finished restore proof.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTestStatus {
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// What was asked: "latest" (the end of the archive) or "lsn X/Y".
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<RestoreTestReached>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_used: Option<String>,
    /// The restore init container's run time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_seconds: Option<f64>,
    /// From PostgreSQL's start to the end of recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<RestoreTestCheckStatus>,
    pub result: RestoreTestResult,
    /// Passed, RestoreFailed, RecoveryFailed, AmcheckFailed, CheckFailed,
    /// TimedOut, PodLost, ...
    pub reason: String,
    pub message: String,
}

fn default_archive_timeout() -> String {
    "60s".to_string()
}

/// The StatefulSet being protected.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetSpec {
    /// Name of the StatefulSet, in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub stateful_set: String,
    /// Name of the PostgreSQL container in its pod template.
    #[serde(default = "default_container")]
    pub container: String,
    /// Data directory inside that container.
    #[serde(default = "default_pgdata")]
    #[schemars(regex(pattern = r"^/"))]
    pub pgdata: String,
    /// Port PostgreSQL listens on.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Secret with "username" and "password" keys the sidecar uses to connect (base backups, status).
    #[schemars(length(min = 1))]
    pub credentials_secret: String,
    /// User and group id the sidecar runs as: PGDATA's owner (999 in the official image).
    #[serde(default = "default_uid")]
    #[schemars(range(min = 1))]
    pub run_as_user: i64,
    /// Take ownership of fields another field manager holds (e.g. the postgres container's args).
    #[serde(default)]
    pub force_conflicts: bool,
}

fn default_container() -> String {
    "postgres".to_string()
}
fn default_pgdata() -> String {
    "/var/lib/postgresql/data/pgdata".to_string()
}
fn default_port() -> i32 {
    5432
}
fn default_uid() -> i64 {
    999
}

/// Object storage holding the archive.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// An S3 or S3-compatible bucket.
    pub s3: S3Spec,
    /// Client-side encryption of the archive's data (WAL segments, backup
    /// parts). Chosen when the archive is created; every reader of the
    /// archive (forks, followers) needs the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionSpec>,
}

/// The Secret holding the archive's encryption key: an age X25519 identity
/// (a line `AGE-SECRET-KEY-1...`, as `age-keygen` writes it). Only pods that
/// run `walden` mount it; the operator never reads it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// Secret name, in the resource's namespace.
    #[schemars(length(min = 1))]
    pub secret: String,
    /// Key of the Secret holding the key file.
    #[serde(default = "default_encryption_key")]
    #[schemars(length(min = 1))]
    pub key: String,
}

fn default_encryption_key() -> String {
    "key".to_string()
}

/// An S3 location and how to authenticate to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.credentials) != (has(self.workloadIdentity) && self.workloadIdentity)").message(crate::rules::S3_AUTH))]
pub struct S3Spec {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Key prefix of this archive inside the bucket (absent: the bucket root); one database per prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^/](.*[^/])?$"))]
    pub prefix: Option<String>,
    /// AWS region.
    #[serde(default = "default_region")]
    pub region: String,
    /// Custom endpoint for S3-compatible servers, e.g. "https://minio.storage:9000".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(url)]
    pub endpoint: Option<String>,
    /// Path-style addressing (most S3-compatible servers need it).
    #[serde(default)]
    pub path_style: bool,
    /// Static credentials from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials: Option<S3Credentials>,
    /// Use the pod's workload identity (IRSA, web identity) instead of a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_identity: Option<bool>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// Keys of a Secret holding static S3 credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Credentials {
    /// Secret name, in the resource's namespace.
    #[schemars(length(min = 1))]
    pub secret: String,
    #[serde(default = "default_access_key_id_key")]
    pub access_key_id_key: String,
    #[serde(default = "default_secret_access_key_key")]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".to_string()
}
fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".to_string()
}

/// zstd settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CompressionSpec {
    /// zstd level, 1 (fastest) to 19 (smallest).
    #[serde(default = "default_level")]
    #[schemars(range(min = 1, max = 19))]
    pub level: i32,
}

fn default_level() -> i32 {
    walden_contract::pod::DEFAULT_COMPRESSION_LEVEL
}

/// Missed-run policy of the backup schedule.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum MissedBackupPolicy {
    /// Take a single backup at once for all missed runs.
    #[default]
    RunOnce,
    /// Wait for the next scheduled time.
    Skip,
}

/// Which backups retention keeps.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.fullBackups) || has(self.recoveryWindow)").message(crate::rules::RETENTION_SET))]
pub struct RetentionSpec {
    /// Number of full base backups to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub full_backups: Option<i32>,
    /// Keep every point in this window restorable, e.g. "7d", "36h", "1d12h"
    /// (units w, d, h, m, s in that order, as the CLI's --window takes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = walden_contract::duration::PATTERN), length(min = 1))]
    pub recovery_window: Option<String>,
}

/// The walden sidecar: resources, and which image it runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Run this walden image instead of the one the injection already runs
    /// (changing it restarts the database's pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// Manual (default): an operator upgrade never changes the sidecar of a
    /// running database (status says SidecarCurrent=False UpdateAvailable);
    /// Automatic: the sidecar follows the operator's image, restarting the
    /// database's pods when it changes.
    #[serde(default)]
    pub update_policy: SidecarUpdatePolicy,
}

/// When the sidecar image of a protected database changes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum SidecarUpdatePolicy {
    /// Only when spec.sidecar.image or this policy says so.
    #[default]
    Manual,
    /// With the operator: every operator upgrade rolls the database's pods.
    Automatic,
}

/// Observed state of a ContinuousBackup.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContinuousBackupStatus {
    /// Ready, Archiving, BackupSucceeded.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupInfo>,
    /// The backup the operator started and is waiting for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_in_progress: Option<String>,
    /// The scheduled time the last started backup stood for (missed-run bookkeeping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_backup_time: Option<DateTime<Utc>>,
    /// Earliest time the archive can restore to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverability_point: Option<DateTime<Utc>>,
    /// The last WAL segment a restore can reach: the archive's end, or the
    /// segment before its first hole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recoverable_wal: Option<String>,
    /// The newest WAL segment archived; kept across primary pod restarts
    /// (a fresh daemon knows none until it archives one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_wal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_archived_time: Option<DateTime<Utc>>,
    /// WAL segments waiting to be archived (`.ready` files on the primary):
    /// the archive's real lag, 0 when archiving keeps up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_backlog: Option<u64>,
    /// When the oldest segment of the backlog was complete: its age is the
    /// archive lag. Unset when nothing waits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive_backlog_since: Option<DateTime<Utc>>,
    /// The pod whose daemon reported role primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_pod: Option<String>,
    /// The last spec.backupRequest the operator started a backup for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_request: Option<String>,
    /// The WAL position of the oldest backup's end: where the recovery
    /// window starts (restore proofs pick random targets from here on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverable_lsn: Option<String>,
    /// The restore proof running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_test_in_progress: Option<RestoreTestRun>,
    /// The last finished restore proof.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restore_test: Option<RestoreTestStatus>,
    /// When the last successful proof finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_restore_test: Option<DateTime<Utc>>,
    /// The scheduled time the last started proof stood for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_restore_test: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_restore_test_time: Option<DateTime<Utc>>,
    /// The archive the injection writes when it is not spec.storage's own
    /// prefix: after pg_upgrade gave the server a new system identifier, the
    /// operator started a new archive below that prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archive: Option<ArchiveRecord>,
    /// Archives this database wrote before, oldest first: a Fork to a time
    /// before one's `until` restores from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_archives: Vec<ArchiveRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One archive of a database: where it is and which server wrote it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArchiveRecord {
    pub bucket: String,
    /// Key prefix inside the bucket (absent: the bucket root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The database system identifier the archive belongs to.
    pub system_identifier: String,
    /// PostgreSQL major version of the server that wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg_version: Option<u32>,
    /// When the operator started archiving here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// When the operator moved archiving away from it (a previous archive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
    /// The earliest time it could restore to, when archiving moved away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_recoverability_point: Option<DateTime<Utc>>,
}

/// A completed base backup.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupInfo {
    pub id: String,
    pub start_time: DateTime<Utc>,
    pub stop_time: DateTime<Utc>,
    pub start_lsn: String,
    pub stop_lsn: String,
}

/// Where a Fork or Follower restores from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.continuousBackup) != has(self.storage)").message(crate::rules::ONE_SOURCE))]
pub struct SourceSpec {
    /// A ContinuousBackup in this namespace; its storage and credentials are used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuous_backup: Option<String>,
    /// An archive given directly, e.g. one whose database is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
}

/// Point to recover to. Absent: the end of the archive.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("[has(self.time), has(self.lsn), has(self.name)].filter(x, x).size() <= 1").message(crate::rules::ONE_TARGET))]
#[x_kube(validation = kube::core::Rule::new("!has(self.exclusive) || !self.exclusive || has(self.time) || has(self.lsn)").message(crate::rules::EXCLUSIVE_TARGET))]
pub struct RecoveryTarget {
    /// Recover to this moment (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    /// Recover to this WAL location, e.g. "0/3000060".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}$"))]
    pub lsn: Option<String>,
    /// Recover to a named restore point (pg_create_restore_point).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,
    /// Base backup to start from; alone, recovery ends at the end of the archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{8}T[0-9]{6}Z.*$"))]
    pub backup_id: Option<String>,
    /// Stop just before the target instead of just after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<bool>,
}

/// The PostgreSQL instance a Fork or Follower runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// PostgreSQL image; its major version must match the archive's.
    #[schemars(length(min = 1))]
    pub image: String,
    /// Size of each instance's data volume, e.g. "10Gi".
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub storage_size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Resources of the postgres container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Resources of the walden sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar_resources: Option<ResourceRequirements>,
    /// Secret with "username" and "password" for the sidecar; defaults to the source ContinuousBackup's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
    /// User and group id of the instance's processes (PGDATA's owner).
    #[serde(default = "default_uid")]
    #[schemars(range(min = 1))]
    pub run_as_user: i64,
}

/// A byte-for-byte clone of a database at a chosen moment, restored from its archive.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "walden.dev",
    version = "v1alpha1",
    kind = "Fork",
    namespaced,
    status = "ForkStatus",
    derive = "PartialEq",
    doc = "A clone of a database at a chosen point, restored from its archive (read-only on the source).",
    printcolumn = r#"{"name": "Phase", "type": "string", "jsonPath": ".status.phase"}"#,
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".status.service"}"#,
    printcolumn = r#"{"name": "Recovered To", "type": "string", "jsonPath": ".status.recoveredToLsn"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ForkSpec {
    pub source: SourceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<RecoveryTarget>,
    pub instance: InstanceSpec,
}

/// Lifecycle of a Fork.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ForkPhase {
    /// Objects created (or waiting for the source); the pod has not started restoring.
    #[default]
    Pending,
    /// `walden restore` is downloading the base backup.
    Restoring,
    /// PostgreSQL is replaying WAL towards the target.
    Recovering,
    /// Recovery finished; the Service accepts connections.
    Ready,
    /// The fork cannot reach its target; see the conditions.
    Failed,
}

/// Observed state of a Fork.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ForkStatus {
    #[serde(default)]
    pub phase: ForkPhase,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_to_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_to_time: Option<DateTime<Utc>>,
    /// Service to connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Streaming replication on top of archive recovery.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamingSpec {
    /// Secret holding the primary_conninfo string (it may contain a password).
    #[schemars(length(min = 1))]
    pub primary_conninfo_secret: String,
    #[serde(default = "default_conninfo_key")]
    pub key: String,
}

fn default_conninfo_key() -> String {
    "primary_conninfo".to_string()
}

/// Read-only replicas bootstrapped from an archive that keep following it.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "walden.dev",
    version = "v1alpha1",
    kind = "Follower",
    namespaced,
    status = "FollowerStatus",
    derive = "PartialEq",
    doc = "Read-only replicas that follow an archive (and optionally stream from the primary).",
    printcolumn = r#"{"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"}"#,
    printcolumn = r#"{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}"#,
    printcolumn = r#"{"name": "Promoted", "type": "boolean", "jsonPath": ".status.promoted"}"#,
    printcolumn = r#"{"name": "Service", "type": "string", "jsonPath": ".status.service"}"#,
    printcolumn = r#"{"name": "Streaming", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Streaming\")].status", "description": "Every standby streams from the primary (False: some replay from the archive only)", "priority": 1}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FollowerSpec {
    pub source: SourceSpec,
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 32))]
    pub replicas: i32,
    /// Optional primary_conninfo; the archive is always the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<StreamingSpec>,
    pub instance: InstanceSpec,
    /// Promote to a standalone primary (manual failover). Needs replicas = 1.
    #[serde(default)]
    pub promote: bool,
}

fn default_replicas() -> i32 {
    1
}

/// Replay position of one follower pod.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// True: a WAL receiver streams from the primary; false: this replica
    /// replays from the archive only (segments arrive as they are archived).
    /// Absent when its daemon does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streaming: Option<bool>,
}

/// Observed state of a Follower.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FollowerStatus {
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub replicas: Vec<ReplicaStatus>,
    #[serde(default)]
    pub promoted: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRDs as YAML documents, what `walden-operator crdgen` prints and `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    render_crds(false)
}

/// The CRDs without their CEL rules (`x-kubernetes-validations`), for
/// clusters before Kubernetes 1.25 (`crdgen --legacy`,
/// `crds/walden.dev.legacy.yaml`). The operator checks the same rules itself
/// ([`crate::rules`]), so such clusters lose no validation, they only get it
/// as a condition instead of a rejected `kubectl apply`.
pub fn crds_yaml_legacy() -> Result<String, serde_yaml::Error> {
    render_crds(true)
}

fn render_crds(legacy: bool) -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [ContinuousBackup::crd(), Fork::crd(), Follower::crd()] {
        out.push_str("---\n");
        if legacy {
            let mut value = serde_yaml::to_value(&crd)?;
            strip_cel_rules(&mut value);
            out.push_str(&serde_yaml::to_string(&value)?);
        } else {
            out.push_str(&serde_yaml::to_string(&crd)?);
        }
    }
    Ok(out)
}

/// Removes every `x-kubernetes-validations` key, at any depth.
fn strip_cel_rules(value: &mut serde_yaml::Value) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            map.remove("x-kubernetes-validations");
            for (_, v) in map.iter_mut() {
                strip_cel_rules(v);
            }
        }
        serde_yaml::Value::Sequence(items) => items.iter_mut().for_each(strip_cel_rules),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::cel::validate_cel;
    use kube::CustomResourceExt;
    use serde_json::{json, Value};
    use std::path::PathBuf;

    fn repo_file(rel: &str) -> PathBuf {
        // Cargo's runtime value: a build cache shared by clones at other
        // paths may hold a test binary compiled elsewhere.
        std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
            .join("..")
            .join(rel)
    }

    /// The CRD admits exactly the windows the sidecar parses: the schema's
    /// pattern (and minimum length) against walden's own parser, one table.
    #[test]
    fn recovery_window_pattern_and_parser_agree() {
        let crd = serde_yaml::to_value(ContinuousBackup::crd()).expect("crd");
        let field = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["retention"]["properties"]["recoveryWindow"];
        let pattern =
            regex::Regex::new(field["pattern"].as_str().expect("pattern")).expect("regex");
        let min_len = field["minLength"].as_u64().expect("minLength") as usize;
        for s in [
            "7d",
            "36h",
            "1d12h",
            "90m",
            "45s",
            "2w",
            "1w2d3h4m5s",
            "",
            "7",
            "d",
            "0d",
            "1d1d",
            "12h1d",
            "07d",
            "7D",
            "1.5d",
            "-1d",
        ] {
            let admitted = s.len() >= min_len && pattern.is_match(s);
            let parsed = walden_contract::duration::parse(s).is_ok();
            assert_eq!(
                admitted, parsed,
                "{s:?}: the CRD admits {admitted}, walden parses {parsed}"
            );
        }
    }

    #[test]
    fn committed_crds_match_crdgen() {
        let path = repo_file("crds/walden.dev.yaml");
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let generated = crds_yaml().expect("crdgen");
        assert!(
            committed == generated,
            "crds/walden.dev.yaml is stale: run `cargo run -p walden-operator -- crdgen > crds/walden.dev.yaml`"
        );
    }

    #[test]
    fn committed_legacy_crds_match_crdgen() {
        let path = repo_file("crds/walden.dev.legacy.yaml");
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let generated = crds_yaml_legacy().expect("crdgen --legacy");
        assert!(
            committed == generated,
            "crds/walden.dev.legacy.yaml is stale: run `cargo run -p walden-operator -- crdgen --legacy > crds/walden.dev.legacy.yaml`"
        );
    }

    #[test]
    fn legacy_crds_differ_only_by_the_cel_rules() {
        let full = crds_yaml().expect("crdgen");
        let legacy = crds_yaml_legacy().expect("crdgen --legacy");
        assert!(full.contains("x-kubernetes-validations"));
        assert!(!legacy.contains("x-kubernetes-validations"), "{legacy}");
        let docs = |s: &str| -> Vec<serde_yaml::Value> {
            s.split("---\n")
                .filter(|d| !d.trim().is_empty())
                .map(|d| serde_yaml::from_str(d).expect("CRD YAML"))
                .collect()
        };
        let mut stripped = docs(&full);
        stripped.iter_mut().for_each(strip_cel_rules);
        assert_eq!(stripped, docs(&legacy));
    }

    #[test]
    fn names_subresources_and_columns() {
        let cb = ContinuousBackup::crd();
        assert_eq!(cb.spec.names.short_names, Some(vec!["cb".to_string()]));
        for crd in [ContinuousBackup::crd(), Fork::crd(), Follower::crd()] {
            assert_eq!(crd.spec.group, "walden.dev");
            assert_eq!(crd.spec.scope, "Namespaced");
            let v = &crd.spec.versions[0];
            assert_eq!(v.name, "v1alpha1");
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{}",
                crd.spec.names.kind
            );
            assert!(!v
                .additional_printer_columns
                .clone()
                .unwrap_or_default()
                .is_empty());
        }
        let cols: Vec<String> = cb.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.name)
            .collect();
        for want in [
            "Last Backup",
            "Recoverable From",
            "Archive Backlog",
            "Archive Lag",
            "Last Archived",
        ] {
            assert!(cols.contains(&want.to_string()), "{cols:?}");
        }
    }

    fn schema_of<K: CustomResourceExt>() -> Value {
        let crd = K::crd();
        serde_json::to_value(
            &crd.spec.versions[0]
                .schema
                .as_ref()
                .expect("schema")
                .open_api_v3_schema,
        )
        .expect("schema json")
    }

    #[test]
    fn schema_validation_keywords_are_present() {
        let fork = schema_of::<Fork>();
        let target = &fork["properties"]["spec"]["properties"]["target"];
        assert_eq!(target["properties"]["time"]["format"], "date-time");
        assert!(target["properties"]["lsn"]["pattern"].is_string());
        let rules = target["x-kubernetes-validations"].to_string();
        assert!(rules.contains("size() <= 1"), "{rules}");
        let follower = schema_of::<Follower>();
        assert_eq!(
            follower["properties"]["spec"]["properties"]["replicas"]["minimum"],
            1.0
        );
        let cb = schema_of::<ContinuousBackup>();
        let spec = &cb["properties"]["spec"]["properties"];
        assert_eq!(
            spec["missedBackupPolicy"]["enum"],
            json!(["RunOnce", "Skip"])
        );
        assert_eq!(spec["compression"]["properties"]["level"]["maximum"], 19.0);
        assert!(spec["storage"]["properties"]["s3"]["x-kubernetes-validations"].is_array());
    }

    fn fork_with(extra: Value) -> Fork {
        let mut spec = json!({
            "source": {"continuousBackup": "pg"},
            "instance": {"image": "postgres:16", "storageSize": "1Gi"}
        });
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                s.insert(k.clone(), v.clone());
            }
        }
        Fork::new("f", serde_json::from_value(spec).expect("fork spec"))
    }

    #[test]
    fn cel_rules_table() {
        let cases = [
            ("no target", json!({}), true),
            (
                "time target",
                json!({"target": {"time": "2025-01-01T00:00:00Z"}}),
                true,
            ),
            (
                "backup and time",
                json!({"target": {"backupId": "20250101T000000Z", "time": "2025-01-01T00:00:00Z"}}),
                true,
            ),
            (
                "time and lsn",
                json!({"target": {"time": "2025-01-01T00:00:00Z", "lsn": "0/1"}}),
                false,
            ),
            (
                "lsn and name",
                json!({"target": {"lsn": "0/1", "name": "x"}}),
                false,
            ),
            (
                "exclusive with name",
                json!({"target": {"name": "x", "exclusive": true}}),
                false,
            ),
            (
                "exclusive with lsn",
                json!({"target": {"lsn": "0/1", "exclusive": true}}),
                true,
            ),
            (
                "two sources",
                json!({"source": {"continuousBackup": "pg", "storage": {"s3": {"bucket": "bkt", "workloadIdentity": true}}}}),
                false,
            ),
            ("no source", json!({"source": {}}), false),
            (
                "storage source",
                json!({"source": {"storage": {"s3": {"bucket": "bkt", "workloadIdentity": true}}}}),
                true,
            ),
            (
                "storage without auth",
                json!({"source": {"storage": {"s3": {"bucket": "bkt"}}}}),
                false,
            ),
            (
                "storage with both auths",
                json!({"source": {"storage": {"s3": {"bucket": "bkt", "workloadIdentity": true, "credentials": {"secret": "s"}}}}}),
                false,
            ),
        ];
        for (name, extra, ok) in cases {
            let result = validate_cel(&fork_with(extra));
            assert_eq!(result.is_ok(), ok, "{name}: {result:?}");
        }
        let mut cb: ContinuousBackup =
            serde_yaml::from_str(&example("continuousbackup.yaml")).expect("example");
        assert!(validate_cel(&cb).is_ok());
        cb.spec.retention = Some(RetentionSpec {
            full_backups: None,
            recovery_window: None,
        });
        assert!(validate_cel(&cb).is_err(), "empty retention is rejected");
    }

    fn example(name: &str) -> String {
        let path = repo_file(&format!("examples/{name}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// Every field of `value` must be declared by `schema`, required fields
    /// present, enums respected: the examples cannot drift from the CRDs.
    fn check(value: &Value, schema: &Value, at: &str, problems: &mut Vec<String>) {
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                problems.push(format!("{at}: {value} not in {allowed:?}"));
            }
        }
        if schema["x-kubernetes-preserve-unknown-fields"] == true
            || schema["x-kubernetes-int-or-string"] == true
        {
            return;
        }
        match value {
            Value::Object(map) => {
                for req in schema["required"].as_array().into_iter().flatten() {
                    if let Some(r) = req.as_str() {
                        if !map.contains_key(r) {
                            problems.push(format!("{at}: missing required {r}"));
                        }
                    }
                }
                for (k, v) in map {
                    if let Some(p) = schema["properties"].get(k) {
                        check(v, p, &format!("{at}.{k}"), problems);
                    } else if let Some(ap) =
                        schema.get("additionalProperties").filter(|a| a.is_object())
                    {
                        check(v, ap, &format!("{at}.{k}"), problems);
                    } else {
                        problems.push(format!("{at}.{k}: not in the schema"));
                    }
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    check(v, &schema["items"], &format!("{at}[{i}]"), problems);
                }
            }
            _ => {}
        }
    }

    fn check_example<K: CustomResourceExt + serde::de::DeserializeOwned + serde::Serialize>(
        file: &str,
    ) {
        let doc: Value = serde_yaml::from_str(&example(file)).expect("example YAML");
        assert_eq!(doc["kind"], K::crd().spec.names.kind, "{file}");
        let mut problems = Vec::new();
        check(
            &doc["spec"],
            &schema_of::<K>()["properties"]["spec"],
            "spec",
            &mut problems,
        );
        assert!(problems.is_empty(), "{file}: {problems:#?}");
        let typed: K = serde_json::from_value(doc).expect("example parses");
        validate_cel(&typed).unwrap_or_else(|e| panic!("{file}: {e:?}"));
    }

    #[test]
    fn examples_match_the_schema() {
        check_example::<ContinuousBackup>("continuousbackup.yaml");
        check_example::<Fork>("fork.yaml");
        check_example::<Follower>("follower.yaml");
    }

    /// The streaming set-up example fits the Follower example and survives
    /// the operator's injection (its `-c hba_file` is kept).
    #[test]
    fn the_streaming_example_is_consistent() {
        use serde::Deserialize;
        let docs: Vec<Value> =
            serde_yaml::Deserializer::from_str(&example("streaming/primary.yaml"))
                .map(|d| Value::deserialize(d).expect("streaming example YAML"))
                .collect();
        let of = |kind: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind)
                .unwrap_or_else(|| panic!("no {kind} in the streaming example"))
        };
        let follower: Follower =
            serde_yaml::from_str(&example("follower.yaml")).expect("follower example");
        let conninfo = follower.spec.streaming.expect("follower example streams");
        let secret = of("Secret");
        assert_eq!(
            secret["metadata"]["name"],
            conninfo.primary_conninfo_secret.as_str()
        );
        assert!(secret["stringData"][&conninfo.key]
            .as_str()
            .is_some_and(|c| c.contains("user=replicator")));
        let hba = of("ConfigMap")["data"]["pg_hba.conf"]
            .as_str()
            .expect("pg_hba.conf");
        assert!(
            hba.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() >= 4 && f[0] == "host" && f[1] == "replication" && f[2] == "replicator"
            }),
            "{hba}"
        );
        let args: Vec<String> = serde_json::from_value(
            of("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
        )
        .expect("args");
        let injected = crate::specs::postgres_args(&args, "60s");
        assert!(
            injected.contains(&"hba_file=/etc/postgresql/hba/pg_hba.conf".to_string()),
            "{injected:?}"
        );
    }

    #[test]
    fn the_schema_checker_catches_drift() {
        let mut problems = Vec::new();
        let bad = json!({"target": {"statefulSet": "pg", "credentialsSecret": "c", "typo": 1},
                         "storage": {"s3": {"bucket": "b"}}, "missedBackupPolicy": "Always"});
        check(
            &bad,
            &schema_of::<ContinuousBackup>()["properties"]["spec"],
            "spec",
            &mut problems,
        );
        assert!(problems.iter().any(|p| p.contains("typo")), "{problems:?}");
        assert!(
            problems.iter().any(|p| p.contains("Always")),
            "{problems:?}"
        );
    }
}
