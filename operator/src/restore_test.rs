//! Restore proofs, the pure part: which WAL position a proof restores to,
//! what a proof pod says when it ends, and whether the archive counts as
//! Recoverable. The ContinuousBackup controller does the I/O.

use crate::api::{
    RestoreTestCheckStatus, RestoreTestReached, RestoreTestResult, RestoreTestStatus,
    RestoreTestTarget,
};
use crate::specs::{RESTORE_CONTAINER, RESTORE_TEST_CONTAINER};
use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};

/// How long past its deadline a proof pod may still be reported by the
/// kubelet (which enforces `activeDeadlineSeconds`) before the operator
/// gives up on it itself.
const DEADLINE_GRACE: i64 = 60;

pub use walden_contract::proof::{CheckResult as ReportCheck, Reason as ReportReason, Report};

/// Parses a termination message: the report is its last JSON line (the
/// kubelet falls back to the log tail when the file is empty).
pub fn parse_report(message: &str) -> Option<Report> {
    message
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
}

fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The WAL position where a segment starts. The segment size is not in the
/// name: 16 MiB (the default) is assumed while the name's segment number
/// fits it, 1 MiB (the smallest) otherwise, so the result is never past
/// the segment's real start.
fn segment_start(name: &str) -> Option<u64> {
    if name.len() < 24 {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    let size: u64 = if seg < 256 { 16 << 20 } else { 1 << 20 };
    Some((log << 32) + seg * size)
}

/// The WAL position a proof restores to (`None`: the end of the archive).
/// Random picks uniformly between the oldest backup's end and the start of
/// the last recoverable segment: a position PostgreSQL always reaches, as
/// records follow it in the archive (a random *time* may lie after the last
/// commit, which recovery cannot reach). `random` is any random number.
pub fn choose_target(
    policy: RestoreTestTarget,
    first_lsn: Option<&str>,
    last_recoverable_wal: Option<&str>,
    random: u64,
) -> Option<String> {
    if policy == RestoreTestTarget::Latest {
        return None;
    }
    let lo = parse_lsn(first_lsn?)?;
    let hi = segment_start(last_recoverable_wal?)?;
    if hi <= lo {
        return None;
    }
    Some(format_lsn(lo + random % (hi - lo + 1)))
}

/// A finished proof, as the operator records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub result: RestoreTestResult,
    pub reason: String,
    pub message: String,
    pub report: Option<Report>,
    pub restore_seconds: Option<f64>,
    /// The backup the restore init container named.
    pub backup: Option<String>,
}

impl Finished {
    pub fn failed(reason: &str, message: impl Into<String>) -> Self {
        Finished {
            result: RestoreTestResult::Failed,
            reason: reason.to_string(),
            message: message.into(),
            report: None,
            restore_seconds: None,
            backup: None,
        }
    }

    fn timed_out(message: impl Into<String>) -> Self {
        Finished {
            result: RestoreTestResult::TimedOut,
            ..Finished::failed("TimedOut", message)
        }
    }

    /// The status entry for a proof that started at `started_at`.
    pub fn status(
        &self,
        started_at: DateTime<Utc>,
        target_lsn: Option<&str>,
        now: DateTime<Utc>,
    ) -> RestoreTestStatus {
        let r = self.report.as_ref();
        let checks = r
            .into_iter()
            .flat_map(|r| r.amcheck.iter().chain(r.checks.iter()))
            .map(|c| RestoreTestCheckStatus {
                name: c.name.clone(),
                passed: c.passed,
                message: (!c.detail.is_empty()).then(|| c.detail.clone()),
            })
            .collect();
        RestoreTestStatus {
            started_at,
            finished_at: now,
            target: target_lsn
                .map(|l| format!("lsn {l}"))
                .unwrap_or_else(|| "latest".to_string()),
            reached: r
                .filter(|r| r.reached_lsn.is_some() || r.reached_time.is_some())
                .map(|r| RestoreTestReached {
                    lsn: r.reached_lsn.clone(),
                    time: r.reached_time,
                }),
            backup_used: r
                .and_then(|r| r.backup.clone())
                .or_else(|| self.backup.clone()),
            restore_seconds: self.restore_seconds,
            replay_seconds: r.map(|r| r.replay_seconds),
            checks,
            result: self.result,
            reason: self.reason.clone(),
            message: self.message.clone(),
        }
    }
}

fn terminated<'a>(
    statuses: Option<&'a Vec<k8s_openapi::api::core::v1::ContainerStatus>>,
    name: &str,
) -> Option<&'a ContainerStateTerminated> {
    statuses?
        .iter()
        .find(|c| c.name == name)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

fn seconds(t: &ContainerStateTerminated) -> Option<f64> {
    let (s, f) = (t.started_at.as_ref()?, t.finished_at.as_ref()?);
    Some((f.0.as_second() - s.0.as_second()).max(0) as f64)
}

/// Reads a proof pod (pure): the proof's report once its container ended,
/// the restore's error if that failed first, the kubelet's deadline, or the
/// operator's own deadline for a pod that never got going. `None`: it is
/// still running.
pub fn observe(
    pod: &Pod,
    started_at: DateTime<Utc>,
    deadline_seconds: i64,
    now: DateTime<Utc>,
) -> Option<Finished> {
    let status = pod.status.clone().unwrap_or_default();
    let restore = terminated(status.init_container_statuses.as_ref(), RESTORE_CONTAINER);
    let restore_seconds = restore.and_then(seconds);
    let backup = restore
        .and_then(|t| t.message.as_deref())
        .and_then(|m| m.split("restored backup ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string);
    let with_restore = |mut f: Finished| {
        f.restore_seconds = restore_seconds;
        f.backup = backup.clone();
        Some(f)
    };
    if let Some(t) = terminated(status.container_statuses.as_ref(), RESTORE_TEST_CONTAINER) {
        let message = t.message.clone().unwrap_or_default();
        return with_restore(match parse_report(&message) {
            Some(r) => Finished {
                result: if r.passed {
                    RestoreTestResult::Succeeded
                } else if r.reason == ReportReason::TimedOut {
                    RestoreTestResult::TimedOut
                } else {
                    RestoreTestResult::Failed
                },
                reason: r.reason.as_str().to_string(),
                message: r.message.clone(),
                report: Some(r),
                restore_seconds: None,
                backup: None,
            },
            None => Finished::failed(
                "ProofError",
                format!(
                    "the restore-test container exited with {} without a report: {}",
                    t.exit_code,
                    message.trim()
                ),
            ),
        });
    }
    if let Some(t) = restore.filter(|t| t.exit_code != 0) {
        return with_restore(Finished::failed(
            "RestoreFailed",
            t.message
                .clone()
                .unwrap_or_else(|| format!("walden restore exited with {}", t.exit_code)),
        ));
    }
    let phase = status.phase.as_deref().unwrap_or("Pending");
    if phase == "Failed" || phase == "Succeeded" {
        let why = status.message.clone().unwrap_or_default();
        return with_restore(if status.reason.as_deref() == Some("DeadlineExceeded") {
            Finished::timed_out(format!(
                "not finished within deadlineSeconds ({deadline_seconds}): {why}"
            ))
        } else {
            Finished::failed(
                "PodFailed",
                format!("the proof pod ended {phase} before a report: {why}"),
            )
        });
    }
    if now > started_at + Duration::seconds(deadline_seconds + DEADLINE_GRACE) {
        let waiting: Vec<String> = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .filter_map(|c| {
                let w = c.state.as_ref()?.waiting.as_ref()?;
                Some(format!(
                    "{} {}",
                    c.name,
                    w.reason.clone().unwrap_or_default()
                ))
            })
            .collect();
        return with_restore(Finished::timed_out(format!(
            "not finished within deadlineSeconds ({deadline_seconds}); the pod is still {phase}{}",
            if waiting.is_empty() {
                String::new()
            } else {
                format!(" ({})", waiting.join(", "))
            }
        )));
    }
    None
}

/// The Recoverable condition (pure): True only while the last proof
/// succeeded and is younger than `max_age_seconds`; the time it turns
/// False on its own comes back too.
pub fn recoverable(
    last: Option<&RestoreTestStatus>,
    max_age_seconds: i64,
    now: DateTime<Utc>,
) -> (
    crate::controllers::Status,
    &'static str,
    String,
    Option<DateTime<Utc>>,
) {
    use crate::controllers::Status;
    let Some(l) = last else {
        return (
            Status::Unknown,
            "NotYetProven",
            "no restore proof has finished yet".to_string(),
            None,
        );
    };
    if l.result != RestoreTestResult::Succeeded {
        return (
            Status::False,
            if l.result == RestoreTestResult::TimedOut {
                "RestoreTestTimedOut"
            } else {
                "RestoreTestFailed"
            },
            format!(
                "the restore proof started at {} failed ({}): {}",
                l.started_at.to_rfc3339(),
                l.reason,
                l.message
            ),
            None,
        );
    }
    let expires = l.finished_at + Duration::seconds(max_age_seconds);
    if now >= expires {
        return (
            Status::False,
            "RestoreTestTooOld",
            format!(
                "the last successful restore proof finished at {}, more than maxAgeSeconds ({max_age_seconds}) ago",
                l.finished_at.to_rfc3339()
            ),
            None,
        );
    }
    (
        Status::True,
        "RestoreTestSucceeded",
        format!(
            "restore proof of {} ({}): {}",
            l.finished_at.to_rfc3339(),
            l.target,
            l.message
        ),
        Some(expires),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::Status;
    use serde_json::json;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    type TargetCase<'a> = (
        RestoreTestTarget,
        Option<&'a str>,
        Option<&'a str>,
        u64,
        Option<&'a str>,
    );
    type ObserveCase<'a> = (
        &'a str,
        serde_json::Value,
        DateTime<Utc>,
        Option<(RestoreTestResult, &'a str, &'a str)>,
    );
    type RecoverableCase<'a> = (
        Option<&'a RestoreTestStatus>,
        i64,
        Status,
        &'a str,
        Option<DateTime<Utc>>,
    );

    #[test]
    fn targets_table() {
        let cases: &[TargetCase] = &[
            (
                RestoreTestTarget::Latest,
                Some("0/2000028"),
                Some("000000010000000000000009"),
                7,
                None,
            ),
            // Random: between the window's start and segment 9's start (0/9000000).
            (
                RestoreTestTarget::Random,
                Some("0/2000028"),
                Some("000000010000000000000009"),
                0,
                Some("0/2000028"),
            ),
            (
                RestoreTestTarget::Random,
                Some("0/2000028"),
                Some("000000010000000000000009"),
                0x6FFFFD8,
                Some("0/9000000"),
            ),
            // The range wraps, never past the end.
            (
                RestoreTestTarget::Random,
                Some("0/2000028"),
                Some("000000010000000000000009"),
                0x6FFFFD9,
                Some("0/2000028"),
            ),
            // Across a 4 GiB boundary.
            (
                RestoreTestTarget::Random,
                Some("0/FF000028"),
                Some("000000020000000100000003"),
                0xFFFFD8,
                Some("1/0"),
            ),
            // A window inside one segment: the end of the archive.
            (
                RestoreTestTarget::Random,
                Some("0/9000028"),
                Some("000000010000000000000009"),
                5,
                None,
            ),
            // Nothing known yet: the end of the archive.
            (
                RestoreTestTarget::Random,
                None,
                Some("000000010000000000000009"),
                5,
                None,
            ),
            (RestoreTestTarget::Random, Some("0/2000028"), None, 5, None),
            (
                RestoreTestTarget::Random,
                Some("junk"),
                Some("000000010000000000000009"),
                5,
                None,
            ),
            // A segment number above 255: segments smaller than 16 MiB, 1 MiB assumed.
            (
                RestoreTestTarget::Random,
                Some("0/100"),
                Some("000000010000000000000400"),
                0x3FFFFF00,
                Some("0/40000000"),
            ),
        ];
        for (policy, first, last, r, want) in cases {
            let got = choose_target(*policy, *first, *last, *r);
            assert_eq!(
                got.as_deref(),
                *want,
                "{policy:?} {first:?} {last:?} {r:#x}"
            );
        }
        // Every position chosen lies inside the window.
        for r in [1u64, 99, 123_456_789, u64::MAX / 3] {
            let lsn = choose_target(
                RestoreTestTarget::Random,
                Some("0/2000028"),
                Some("000000010000000000000009"),
                r,
            )
            .unwrap();
            let v = parse_lsn(&lsn).unwrap();
            assert!((0x2000028..=0x9000000).contains(&v), "{lsn}");
        }
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "pg-restore-test"}, "status": status}))
            .unwrap()
    }

    const REPORT: &str = r#"{"passed":true,"reason":"Passed","message":"restored backup B1 and recovered to 0/9000060","backup":"B1","reachedLsn":"0/9000060","reachedTime":"2026-12-03T10:00:00Z","replaySeconds":4.5,"amcheck":{"name":"pg_amcheck","passed":true},"checks":[{"name":"rows","passed":true}]}"#;

    #[test]
    fn observe_table() {
        let start = t("2026-12-03T10:00:00Z");
        let now = t("2026-12-03T10:10:00Z");
        let restored = json!({"name": "walden-restore", "state": {"terminated": {
            "exitCode": 0, "message": "restored backup B1 to the end of the archive",
            "startedAt": "2026-12-03T10:00:05Z", "finishedAt": "2026-12-03T10:00:35Z"}}});
        let cases: Vec<ObserveCase> = vec![
            ("pending, early", json!({"phase": "Pending"}), now, None),
            (
                "restoring",
                json!({"phase": "Pending", "initContainerStatuses": [
                {"name": "walden-restore", "state": {"running": {}}}]}),
                now,
                None,
            ),
            (
                "proof passed",
                json!({"phase": "Succeeded", "initContainerStatuses": [restored],
                "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 0, "message": REPORT}}}]}),
                now,
                Some((
                    RestoreTestResult::Succeeded,
                    "Passed",
                    "recovered to 0/9000060",
                )),
            ),
            (
                "proof found a hole",
                json!({"phase": "Failed", "initContainerStatuses": [restored],
                "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 1,
                "message": "{\"passed\":false,\"reason\":\"RecoveryFailed\",\"message\":\"wal-fetch: 000000010000000000000005 is a hole\",\"replaySeconds\":1}"}}}]}),
                now,
                Some((RestoreTestResult::Failed, "RecoveryFailed", "is a hole")),
            ),
            (
                "report after log lines",
                json!({"phase": "Failed",
                "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 1,
                "message": "some log line\n{\"passed\":false,\"reason\":\"TimedOut\",\"message\":\"recovery did not end\",\"replaySeconds\":1}"}}}]}),
                now,
                Some((
                    RestoreTestResult::TimedOut,
                    "TimedOut",
                    "recovery did not end",
                )),
            ),
            (
                "no report",
                json!({"phase": "Failed",
                "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 137, "message": "Killed"}}}]}),
                now,
                Some((
                    RestoreTestResult::Failed,
                    "ProofError",
                    "exited with 137 without a report: Killed",
                )),
            ),
            (
                "restore failed",
                json!({"phase": "Failed", "initContainerStatuses": [
                {"name": "walden-restore", "state": {"terminated": {"exitCode": 1, "message": "restore: part-00001.tar.zst: checksum mismatch"}}}]}),
                now,
                Some((
                    RestoreTestResult::Failed,
                    "RestoreFailed",
                    "checksum mismatch",
                )),
            ),
            (
                "kubelet deadline",
                json!({"phase": "Failed", "reason": "DeadlineExceeded", "message": "Pod was active on the node longer than the specified deadline"}),
                now,
                Some((
                    RestoreTestResult::TimedOut,
                    "TimedOut",
                    "longer than the specified deadline",
                )),
            ),
            (
                "evicted",
                json!({"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: ephemeral-storage."}),
                now,
                Some((RestoreTestResult::Failed, "PodFailed", "ephemeral-storage")),
            ),
            (
                "never scheduled, past the deadline",
                json!({"phase": "Pending", "initContainerStatuses": [
                {"name": "walden-install", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
                t("2026-12-03T11:01:01Z"),
                Some((
                    RestoreTestResult::TimedOut,
                    "TimedOut",
                    "walden-install ImagePullBackOff",
                )),
            ),
            (
                "just inside the grace",
                json!({"phase": "Running"}),
                t("2026-12-03T11:00:59Z"),
                None,
            ),
        ];
        for (name, status, at, want) in cases {
            let got = observe(&pod(status), start, 3600, at);
            match (got, want) {
                (None, None) => {}
                (Some(f), Some((result, reason, text))) => {
                    assert_eq!(f.result, result, "{name}");
                    assert_eq!(f.reason, reason, "{name}");
                    assert!(f.message.contains(text), "{name}: {}", f.message);
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_finished_proof_becomes_its_status() {
        let restored = json!({"name": "walden-restore", "state": {"terminated": {
            "exitCode": 0, "message": "restored backup B1 to the end of the archive",
            "startedAt": "2026-12-03T10:00:05Z", "finishedAt": "2026-12-03T10:00:35Z"}}});
        let p = pod(
            json!({"phase": "Succeeded", "initContainerStatuses": [restored],
            "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 0, "message": REPORT}}}]}),
        );
        let Some(f) = observe(
            &p,
            t("2026-12-03T10:00:00Z"),
            3600,
            t("2026-12-03T10:01:00Z"),
        ) else {
            panic!("not finished");
        };
        let s = f.status(
            t("2026-12-03T10:00:00Z"),
            Some("0/5000000"),
            t("2026-12-03T10:01:00Z"),
        );
        assert_eq!(s.target, "lsn 0/5000000");
        assert_eq!(s.backup_used.as_deref(), Some("B1"));
        assert_eq!(s.restore_seconds, Some(30.0));
        assert_eq!(s.replay_seconds, Some(4.5));
        assert_eq!(
            s.reached.as_ref().and_then(|r| r.lsn.as_deref()),
            Some("0/9000060")
        );
        assert_eq!(
            s.reached.as_ref().and_then(|r| r.time),
            Some(t("2026-12-03T10:00:00Z"))
        );
        let names: Vec<_> = s
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.passed))
            .collect();
        assert_eq!(names, vec![("pg_amcheck", true), ("rows", true)]);
        assert_eq!(s.result, RestoreTestResult::Succeeded);
    }

    #[test]
    fn recoverable_table() {
        let done = |result, finished: &str| RestoreTestStatus {
            started_at: t("2026-12-03T09:59:00Z"),
            finished_at: t(finished),
            target: "latest".into(),
            reached: None,
            backup_used: None,
            restore_seconds: None,
            replay_seconds: None,
            checks: vec![],
            result,
            reason: "Passed".into(),
            message: "m".into(),
        };
        let now = t("2026-12-04T10:00:00Z");
        let ok = done(RestoreTestResult::Succeeded, "2026-12-03T10:00:00Z");
        let failed = done(RestoreTestResult::Failed, "2026-12-04T09:00:00Z");
        let timed_out = done(RestoreTestResult::TimedOut, "2026-12-04T09:00:00Z");
        let cases: Vec<RecoverableCase> = vec![
            (None, 3600, Status::Unknown, "NotYetProven", None),
            (
                Some(&ok),
                2 * 86400,
                Status::True,
                "RestoreTestSucceeded",
                Some(t("2026-12-05T10:00:00Z")),
            ),
            // Exactly max age old: no longer evidence.
            (Some(&ok), 86400, Status::False, "RestoreTestTooOld", None),
            (
                Some(&ok),
                86401,
                Status::True,
                "RestoreTestSucceeded",
                Some(t("2026-12-04T10:00:01Z")),
            ),
            (
                Some(&failed),
                2 * 86400,
                Status::False,
                "RestoreTestFailed",
                None,
            ),
            (
                Some(&timed_out),
                2 * 86400,
                Status::False,
                "RestoreTestTimedOut",
                None,
            ),
        ];
        for (last, max_age, status, reason, expires) in cases {
            let got = recoverable(last, max_age, now);
            assert_eq!(
                (got.0, got.1, got.3),
                (status, reason, expires),
                "{last:?} {max_age}"
            );
        }
    }
}
