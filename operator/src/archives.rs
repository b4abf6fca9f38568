//! Which archive a protected database writes and a Fork reads once
//! pg_upgrade has given the server a new system identifier: pure decisions,
//! so that the controllers only act on them.
//!
//! An archive belongs to one database (design §4, invariant 3): the daemon
//! refuses a server whose system identifier is not `walden.json`'s, and
//! reports the refusal typed. When the refused server runs a newer
//! PostgreSQL major version than the archive, it is what pg_upgrade leaves:
//! the operator starts a new archive for it below spec.storage's prefix,
//! `<prefix>/pg<major>-<system identifier>`, and records the old one, which
//! stays as it was for forks to earlier times. Any other mismatch (the same
//! or an older version, a version unknown) stays a refusal: it may be
//! another database pointed at the prefix by mistake.

use crate::api::{ArchiveRecord, ContinuousBackupStatus, RecoveryTarget, StorageSpec};
use chrono::{DateTime, Utc};
use walden_contract::api::IdentityMismatch;

/// spec.storage's prefix as a key prefix: `"db/"`, or `""` for the bucket root.
fn base(spec: &StorageSpec) -> String {
    match spec.s3.prefix.as_deref().map(|p| p.trim_matches('/')) {
        Some(p) if !p.is_empty() => format!("{p}/"),
        _ => String::new(),
    }
}

/// An archive the operator started below spec.storage (one level down). A
/// user who points spec.storage elsewhere has chosen a new archive: the
/// recorded one no longer applies.
fn below_spec(spec: &StorageSpec, archive: &ArchiveRecord) -> bool {
    let base = base(spec);
    archive.bucket == spec.s3.bucket
        && archive
            .prefix
            .as_deref()
            .and_then(|p| p.strip_prefix(base.as_str()))
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// `spec` pointed at `archive`'s bucket and prefix; credentials, endpoint
/// and encryption stay spec's.
fn at(spec: &StorageSpec, archive: &ArchiveRecord) -> StorageSpec {
    let mut storage = spec.clone();
    storage.s3.bucket = archive.bucket.clone();
    storage.s3.prefix = archive.prefix.clone();
    storage
}

fn recorded<'a>(
    spec: &StorageSpec,
    status: Option<&'a ContinuousBackupStatus>,
) -> Option<&'a ArchiveRecord> {
    status
        .and_then(|s| s.archive.as_ref())
        .filter(|a| below_spec(spec, a))
}

/// `s3://bucket/prefix` of a recorded archive.
pub fn url(archive: &ArchiveRecord) -> String {
    crate::specs::s3_url(&archive.bucket, archive.prefix.as_deref())
}

/// The storage the injection writes now: the archive the operator moved to
/// after pg_upgrade, else spec.storage.
pub fn current(spec: &StorageSpec, status: Option<&ContinuousBackupStatus>) -> StorageSpec {
    match recorded(spec, status) {
        Some(a) => at(spec, a),
        None => spec.clone(),
    }
}

/// Where a Fork restores from, and the earliest time that archive reaches.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub storage: StorageSpec,
    pub first_recoverability_point: Option<DateTime<Utc>>,
}

/// The archive holding `target`: the oldest previous archive written until
/// after it, else the current one. Without a time (an LSN or restore point
/// name, which only mean something within one database, or the end), the
/// current one.
pub fn for_target(
    spec: &StorageSpec,
    status: Option<&ContinuousBackupStatus>,
    target: Option<DateTime<Utc>>,
) -> Chosen {
    let previous = status.map_or(&[][..], |s| s.previous_archives.as_slice());
    let earlier = target.and_then(|t| {
        previous
            .iter()
            .filter(|a| a.until.is_some_and(|until| t < until))
            .min_by_key(|a| a.until)
    });
    match earlier {
        Some(a) => Chosen {
            storage: at(spec, a),
            first_recoverability_point: a.first_recoverability_point,
        },
        None => Chosen {
            storage: current(spec, status),
            first_recoverability_point: status.and_then(|s| s.first_recoverability_point),
        },
    }
}

/// The time a Fork's target stands for when choosing its archive: the target
/// time, or the start of the named backup (its id begins with it).
pub fn target_time(target: Option<&RecoveryTarget>) -> Option<DateTime<Utc>> {
    let target = target?;
    target.time.or_else(|| {
        let id = target.backup_id.as_deref()?;
        let stamp = id.get(..16)?;
        chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ")
            .ok()
            .map(|t| t.and_utc())
    })
}

/// What to do about a daemon whose archive refuses its server.
#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "a decision made once per reconcile and consumed at once"
)]
pub enum OnMismatch {
    /// pg_upgrade: write `current` from now on, and record `previous`.
    Start {
        current: ArchiveRecord,
        previous: ArchiveRecord,
    },
    /// The new archive is recorded; the pods have not restarted with it yet.
    Moving,
    /// Not an upgrade: archiving stays refused, for this reason.
    Refuse(String),
}

/// Decides what a refusal means (see the module documentation).
pub fn on_mismatch(
    spec: &StorageSpec,
    status: Option<&ContinuousBackupStatus>,
    m: &IdentityMismatch,
    now: DateTime<Utc>,
) -> OnMismatch {
    let recorded = recorded(spec, status);
    if recorded.is_some_and(|a| a.system_identifier == m.server_system_identifier) {
        return OnMismatch::Moving;
    }
    let version = |v: Option<u32>| v.map_or("an unknown version".to_string(), |v| v.to_string());
    let (server, archive) = match (m.server_pg_version, m.archive_pg_version) {
        (Some(s), Some(a)) if s > a => (s, a),
        (s, a) => {
            return OnMismatch::Refuse(format!(
                "the server is database {} (PostgreSQL {}), but its archive belongs to database {} (PostgreSQL {}): archiving is refused. Only an upgrade to a newer major version starts a new archive by itself; another database needs a spec.storage prefix of its own",
                m.server_system_identifier,
                version(s),
                m.archive_system_identifier,
                version(a),
            ))
        }
    };
    let writing = current(spec, status);
    OnMismatch::Start {
        current: ArchiveRecord {
            bucket: spec.s3.bucket.clone(),
            prefix: Some(format!(
                "{}pg{server}-{}",
                base(spec),
                m.server_system_identifier
            )),
            system_identifier: m.server_system_identifier.clone(),
            pg_version: Some(server),
            since: Some(now),
            until: None,
            first_recoverability_point: None,
        },
        previous: ArchiveRecord {
            bucket: writing.s3.bucket,
            prefix: writing.s3.prefix,
            system_identifier: m.archive_system_identifier.clone(),
            pg_version: Some(archive),
            since: recorded.and_then(|a| a.since),
            until: Some(now),
            first_recoverability_point: status.and_then(|s| s.first_recoverability_point),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::S3Spec;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().expect("time")
    }

    fn spec(prefix: Option<&str>) -> StorageSpec {
        StorageSpec {
            s3: S3Spec {
                bucket: "backups".into(),
                prefix: prefix.map(str::to_string),
                region: "us-east-1".into(),
                endpoint: None,
                path_style: false,
                credentials: None,
                workload_identity: Some(true),
            },
            encryption: None,
        }
    }

    fn mismatch(server: Option<u32>, archive: Option<u32>) -> IdentityMismatch {
        IdentityMismatch {
            server_system_identifier: "222".into(),
            server_pg_version: server,
            archive_system_identifier: "111".into(),
            archive_pg_version: archive,
        }
    }

    fn record(prefix: Option<&str>, sysid: &str, until: Option<&str>) -> ArchiveRecord {
        ArchiveRecord {
            bucket: "backups".into(),
            prefix: prefix.map(str::to_string),
            system_identifier: sysid.into(),
            pg_version: None,
            since: None,
            until: until.map(t),
            first_recoverability_point: None,
        }
    }

    fn prefix_of(s: &StorageSpec) -> Option<&str> {
        s.s3.prefix.as_deref()
    }

    #[test]
    fn only_an_upgrade_starts_a_new_archive() {
        let now = t("2026-12-01T10:00:00Z");
        type Case<'a> = (Option<u32>, Option<u32>, Option<&'a str>, Option<&'a str>);
        let cases: [Case; 7] = [
            // server, archive, spec prefix, the new archive's prefix (None: refused)
            (Some(18), Some(15), Some("db"), Some("db/pg18-222")),
            (Some(18), Some(15), Some("/db/"), Some("db/pg18-222")),
            (Some(17), Some(14), None, Some("pg17-222")),
            (Some(15), Some(15), Some("db"), None),
            (Some(15), Some(18), Some("db"), None),
            (None, Some(15), Some("db"), None),
            (Some(18), None, Some("db"), None),
        ];
        for (server, archive, prefix, want) in cases {
            let got = on_mismatch(&spec(prefix), None, &mismatch(server, archive), now);
            match (want, got) {
                (Some(want), OnMismatch::Start { current, previous }) => {
                    assert_eq!(
                        current.prefix.as_deref(),
                        Some(want),
                        "{server:?} {archive:?}"
                    );
                    assert_eq!(current.system_identifier, "222");
                    assert_eq!(current.pg_version, server);
                    assert_eq!(current.since, Some(now));
                    assert_eq!(previous.prefix.as_deref(), prefix, "the old archive");
                    assert_eq!(previous.system_identifier, "111");
                    assert_eq!(previous.pg_version, archive);
                    assert_eq!(previous.until, Some(now));
                }
                (None, OnMismatch::Refuse(why)) => {
                    assert!(
                        why.contains("database 222") && why.contains("database 111"),
                        "{why}"
                    );
                }
                (want, got) => panic!("{server:?} {archive:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn a_second_upgrade_starts_below_spec_and_records_the_first_upgrade_archive() {
        let status = ContinuousBackupStatus {
            archive: Some(ArchiveRecord {
                since: Some(t("2026-01-01T00:00:00Z")),
                ..record(Some("db/pg17-111"), "111", None)
            }),
            first_recoverability_point: Some(t("2026-01-02T00:00:00Z")),
            ..Default::default()
        };
        let now = t("2026-12-01T10:00:00Z");
        let OnMismatch::Start { current, previous } = on_mismatch(
            &spec(Some("db")),
            Some(&status),
            &mismatch(Some(18), Some(17)),
            now,
        ) else {
            panic!("not started");
        };
        assert_eq!(current.prefix.as_deref(), Some("db/pg18-222"));
        assert_eq!(previous.prefix.as_deref(), Some("db/pg17-111"));
        assert_eq!(previous.since, Some(t("2026-01-01T00:00:00Z")));
        assert_eq!(
            previous.first_recoverability_point,
            Some(t("2026-01-02T00:00:00Z"))
        );
    }

    #[test]
    fn a_recorded_move_waits_for_the_pods() {
        let status = ContinuousBackupStatus {
            archive: Some(record(Some("db/pg18-222"), "222", None)),
            ..Default::default()
        };
        let now = t("2026-12-01T10:00:00Z");
        let got = on_mismatch(
            &spec(Some("db")),
            Some(&status),
            &mismatch(Some(18), Some(15)),
            now,
        );
        assert_eq!(got, OnMismatch::Moving);
    }

    #[test]
    fn the_current_archive_is_the_recorded_one_only_below_spec() {
        let cases = [
            // spec prefix, recorded prefix, what the injection writes
            (Some("db"), None, Some("db")),
            (Some("db"), Some("db/pg18-222"), Some("db/pg18-222")),
            (None, Some("pg18-222"), Some("pg18-222")),
            // The user moved spec.storage: theirs wins.
            (Some("other"), Some("db/pg18-222"), Some("other")),
            (Some("db"), Some("db/pg18-222/deeper"), Some("db")),
            (Some("db"), Some("db"), Some("db")),
        ];
        for (spec_prefix, recorded, want) in cases {
            let status = ContinuousBackupStatus {
                archive: recorded.map(|p| record(Some(p), "222", None)),
                ..Default::default()
            };
            let got = current(&spec(spec_prefix), Some(&status));
            assert_eq!(prefix_of(&got), want, "{spec_prefix:?} {recorded:?}");
        }
        let mut other_bucket = record(Some("db/pg18-222"), "222", None);
        other_bucket.bucket = "elsewhere".into();
        let status = ContinuousBackupStatus {
            archive: Some(other_bucket),
            ..Default::default()
        };
        assert_eq!(
            prefix_of(&current(&spec(Some("db")), Some(&status))),
            Some("db")
        );
    }

    #[test]
    fn a_forks_target_time_is_its_time_or_its_backups_start() {
        let at = |time: Option<&str>, backup: Option<&str>, lsn: Option<&str>| RecoveryTarget {
            time: time.map(t),
            backup_id: backup.map(str::to_string),
            lsn: lsn.map(str::to_string),
            ..Default::default()
        };
        let cases = [
            (
                at(Some("2026-03-01T10:00:00Z"), None, None),
                Some("2026-03-01T10:00:00Z"),
            ),
            (
                at(None, Some("20260301T100000Z"), None),
                Some("2026-03-01T10:00:00Z"),
            ),
            (
                at(Some("2026-03-02T00:00:00Z"), Some("20260301T100000Z"), None),
                Some("2026-03-02T00:00:00Z"),
            ),
            (
                at(None, Some("20260301T100000Zinc"), None),
                Some("2026-03-01T10:00:00Z"),
            ),
            (at(None, Some("2026"), None), None),
            (at(None, None, Some("0/3000060")), None),
        ];
        for (target, want) in cases {
            assert_eq!(target_time(Some(&target)), want.map(t), "{target:?}");
        }
        assert_eq!(target_time(None), None);
    }

    #[test]
    fn forks_read_the_archive_that_holds_their_target() {
        let status = ContinuousBackupStatus {
            archive: Some(record(Some("db/pg18-333"), "333", None)),
            previous_archives: vec![
                ArchiveRecord {
                    first_recoverability_point: Some(t("2026-01-01T00:00:00Z")),
                    ..record(Some("db"), "111", Some("2026-06-01T00:00:00Z"))
                },
                record(Some("db/pg17-222"), "222", Some("2026-09-01T00:00:00Z")),
            ],
            first_recoverability_point: Some(t("2026-09-02T00:00:00Z")),
            ..Default::default()
        };
        let cases = [
            (
                Some("2026-02-01T00:00:00Z"),
                "db",
                Some("2026-01-01T00:00:00Z"),
            ),
            (
                Some("2026-05-31T23:59:59Z"),
                "db",
                Some("2026-01-01T00:00:00Z"),
            ),
            (Some("2026-06-01T00:00:00Z"), "db/pg17-222", None),
            (Some("2026-08-01T00:00:00Z"), "db/pg17-222", None),
            (
                Some("2026-10-01T00:00:00Z"),
                "db/pg18-333",
                Some("2026-09-02T00:00:00Z"),
            ),
            (None, "db/pg18-333", Some("2026-09-02T00:00:00Z")),
        ];
        for (target, want, first) in cases {
            let got = for_target(&spec(Some("db")), Some(&status), target.map(t));
            assert_eq!(prefix_of(&got.storage), Some(want), "{target:?}");
            assert_eq!(got.first_recoverability_point, first.map(t), "{target:?}");
        }
        let plain = for_target(&spec(Some("db")), None, Some(t("2026-02-01T00:00:00Z")));
        assert_eq!(prefix_of(&plain.storage), Some("db"));
    }
}
