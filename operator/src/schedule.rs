//! When the next base backup is due: pure cron and missed-run logic, so the
//! controller only has to act on a [`Decision`].

use crate::api::MissedBackupPolicy;
use chrono::{DateTime, Duration, Utc};
use std::str::FromStr;

/// A run that starts this late after its slot still counts as on time, so the
/// `Skip` policy does not skip runs merely delayed by a slow reconcile.
pub const ON_TIME_GRACE: Duration = Duration::minutes(5);

/// A parsed backup schedule.
#[derive(Debug, Clone)]
pub struct Schedule(cron::Schedule);

/// Why a schedule string was rejected.
#[derive(Debug, thiserror::Error)]
#[error("invalid schedule {expr:?}: {reason} (expected five cron fields: minute hour day-of-month month day-of-week)")]
pub struct ScheduleError {
    pub expr: String,
    pub reason: String,
}

impl Schedule {
    /// Parses the five-field cron syntax users know from CronJob (in UTC).
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let fields = expr.split_whitespace().count();
        if fields != 5 {
            return Err(ScheduleError {
                expr: expr.to_string(),
                reason: format!("found {fields} fields"),
            });
        }
        // The cron crate wants a leading seconds field.
        cron::Schedule::from_str(&format!("0 {expr}"))
            .map(Schedule)
            .map_err(|e| ScheduleError {
                expr: expr.to_string(),
                reason: e.to_string(),
            })
    }

    /// The latest slot at or before `t`.
    fn latest_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&(t + Duration::seconds(1))).next_back()
    }

    /// The first slot strictly after `t`.
    fn first_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.0.after(&t).next()
    }
}

/// What the controller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The slot now being handled (taken or skipped); record it so it is not handled twice.
    pub slot: Option<DateTime<Utc>>,
    /// Whether to start a base backup for `slot`.
    pub start_backup: bool,
    /// The next slot after now, for `status.nextBackupTime` and the requeue.
    pub next: Option<DateTime<Utc>>,
}

/// Decides whether a backup is due.
///
/// `last_slot` is the slot handled last (none yet: `anchor`, the resource's
/// creation, so a new resource does not back up for slots before it existed).
/// A backup that started after a slot (the first one, or one asked for with
/// spec.backupRequest) already covers it: `last_backup_start` moves the base.
pub fn decide(
    schedule: &Schedule,
    policy: MissedBackupPolicy,
    last_slot: Option<DateTime<Utc>>,
    last_backup_start: Option<DateTime<Utc>>,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Decision {
    let base = last_slot
        .unwrap_or(anchor)
        .max(last_backup_start.unwrap_or(anchor));
    let next = schedule.first_after(now);
    let due = schedule
        .latest_at_or_before(now)
        .filter(|slot| *slot > base);
    match due {
        None => Decision {
            slot: None,
            start_backup: false,
            next,
        },
        Some(slot) => {
            let on_time = now - slot <= ON_TIME_GRACE;
            let start_backup = match policy {
                MissedBackupPolicy::RunOnce => true,
                MissedBackupPolicy::Skip => on_time,
            };
            Decision {
                slot: Some(slot),
                start_backup,
                next,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc)
    }

    #[test]
    fn parse_accepts_five_fields_and_rejects_others() {
        let cases = [
            ("0 3 * * *", true),
            ("*/15 * * * *", true),
            ("0 3 * * 1-5", true),
            ("0 0 3 * * *", false),
            ("0 3 * *", false),
            ("61 3 * * *", false),
            ("every day", false),
            ("", false),
        ];
        for (expr, ok) in cases {
            assert_eq!(Schedule::parse(expr).is_ok(), ok, "{expr:?}");
        }
    }

    #[test]
    fn parse_error_names_the_expression() {
        let err = Schedule::parse("0 3 * *").expect_err("four fields");
        let msg = err.to_string();
        assert!(
            msg.contains("\"0 3 * *\"") && msg.contains("found 4 fields"),
            "{msg}"
        );
    }

    #[test]
    fn decisions() {
        let daily = Schedule::parse("0 3 * * *").expect("schedule");
        let created = t("2025-01-01T12:00:00Z");
        struct Case {
            name: &'static str,
            policy: MissedBackupPolicy,
            last: Option<&'static str>,
            now: &'static str,
            slot: Option<&'static str>,
            start: bool,
            next: &'static str,
        }
        let cases = [
            Case {
                name: "new resource before its first slot",
                policy: MissedBackupPolicy::RunOnce,
                last: None,
                now: "2025-01-01T13:00:00Z",
                slot: None,
                start: false,
                next: "2025-01-02T03:00:00Z",
            },
            Case {
                name: "first slot reached",
                policy: MissedBackupPolicy::RunOnce,
                last: None,
                now: "2025-01-02T03:00:10Z",
                slot: Some("2025-01-02T03:00:00Z"),
                start: true,
                next: "2025-01-03T03:00:00Z",
            },
            Case {
                name: "slot already handled",
                policy: MissedBackupPolicy::RunOnce,
                last: Some("2025-01-02T03:00:00Z"),
                now: "2025-01-02T09:00:00Z",
                slot: None,
                start: false,
                next: "2025-01-03T03:00:00Z",
            },
            Case {
                name: "three slots missed, run once for the latest",
                policy: MissedBackupPolicy::RunOnce,
                last: Some("2025-01-02T03:00:00Z"),
                now: "2025-01-05T10:00:00Z",
                slot: Some("2025-01-05T03:00:00Z"),
                start: true,
                next: "2025-01-06T03:00:00Z",
            },
            Case {
                name: "missed slots skipped",
                policy: MissedBackupPolicy::Skip,
                last: Some("2025-01-02T03:00:00Z"),
                now: "2025-01-05T10:00:00Z",
                slot: Some("2025-01-05T03:00:00Z"),
                start: false,
                next: "2025-01-06T03:00:00Z",
            },
            Case {
                name: "skip policy still runs a slot that is on time",
                policy: MissedBackupPolicy::Skip,
                last: Some("2025-01-02T03:00:00Z"),
                now: "2025-01-03T03:04:00Z",
                slot: Some("2025-01-03T03:00:00Z"),
                start: true,
                next: "2025-01-04T03:00:00Z",
            },
        ];
        for c in cases {
            let d = decide(&daily, c.policy, c.last.map(t), None, created, t(c.now));
            assert_eq!(d.slot, c.slot.map(t), "{}: slot", c.name);
            assert_eq!(d.start_backup, c.start, "{}: start", c.name);
            assert_eq!(d.next, Some(t(c.next)), "{}: next", c.name);
        }
    }

    #[test]
    fn a_long_outage_with_a_frequent_schedule_is_one_decision() {
        let every_minute = Schedule::parse("* * * * *").expect("schedule");
        let d = decide(
            &every_minute,
            MissedBackupPolicy::RunOnce,
            Some(t("2020-01-01T00:00:00Z")),
            None,
            t("2020-01-01T00:00:00Z"),
            t("2025-01-01T00:00:30Z"),
        );
        assert_eq!(d.slot, Some(t("2025-01-01T00:00:00Z")));
        assert!(d.start_backup);
        assert_eq!(d.next, Some(t("2025-01-01T00:01:00Z")));
    }

    /// The first backup (taken at once) or an on-demand one that started
    /// after a slot covers that slot; one that started before it does not.
    #[test]
    fn a_backup_started_after_a_slot_covers_it() {
        let every_minute = Schedule::parse("* * * * *").expect("schedule");
        let created = t("2025-01-01T12:37:55Z");
        // (what, last slot, last backup start, now, due slot)
        let cases = [
            (
                "first backup after the slot",
                None,
                Some("2025-01-01T12:38:03Z"),
                "2025-01-01T12:38:33Z",
                None,
            ),
            (
                "first backup before the slot",
                None,
                Some("2025-01-01T12:37:58Z"),
                "2025-01-01T12:38:33Z",
                Some("2025-01-01T12:38:00Z"),
            ),
            (
                "next slot after the covered one",
                None,
                Some("2025-01-01T12:38:03Z"),
                "2025-01-01T12:39:01Z",
                Some("2025-01-01T12:39:00Z"),
            ),
            (
                "on-demand after a handled slot",
                Some("2025-01-01T12:40:00Z"),
                Some("2025-01-01T12:41:10Z"),
                "2025-01-01T12:41:40Z",
                None,
            ),
            (
                "no backup yet",
                None,
                None,
                "2025-01-01T12:38:33Z",
                Some("2025-01-01T12:38:00Z"),
            ),
        ];
        for (what, last, started, now, slot) in cases {
            let d = decide(
                &every_minute,
                MissedBackupPolicy::RunOnce,
                last.map(t),
                started.map(t),
                created,
                t(now),
            );
            assert_eq!(d.slot, slot.map(t), "{what}");
            assert_eq!(d.start_backup, slot.is_some(), "{what}");
        }
    }
}
