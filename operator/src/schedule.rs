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

/// How one resource's runs are spread over time, so that thousands of
/// resources on the same schedule do not all start their backups in the same
/// second: each runs `offset` after its slot, and a catch-up after an outage
/// runs `offset` after the controller resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    /// The window runs are spread over (capped per slot at half the time to
    /// the next slot, so a run never drifts into the following one).
    pub window: Duration,
    /// Where in the window this resource falls: stable per resource, e.g.
    /// [`spread_key`] of its UID, so restarts do not move it.
    pub key: u64,
    /// When the controller started watching: a slot whose run time passed
    /// before this was missed (an outage, not a slow reconcile).
    pub resumed: DateTime<Utc>,
}

impl Spread {
    /// No spreading: runs start at their slot.
    pub fn none(resumed: DateTime<Utc>) -> Self {
        Spread {
            window: Duration::zero(),
            key: 0,
            resumed,
        }
    }

    /// This resource's place in a window of `window`.
    fn offset_in(&self, window: Duration) -> Duration {
        let secs = window.num_seconds();
        if secs <= 0 {
            return Duration::zero();
        }
        // Both fit: secs > 0 and the remainder is below it.
        Duration::seconds((self.key % secs.unsigned_abs()) as i64)
    }
}

/// A stable, well-mixed number from a resource's identity (FNV-1a, then a
/// finalizer, so UIDs that differ in one character land far apart).
pub fn spread_key(id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

/// What the controller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The slot now being handled (taken or skipped); record it so it is not handled twice.
    pub slot: Option<DateTime<Utc>>,
    /// Whether to start a base backup for `slot`.
    pub start_backup: bool,
    /// When the next run starts (its slot plus this resource's offset), for
    /// `status.nextBackupTime` and the requeue.
    pub next: Option<DateTime<Utc>>,
}

impl Schedule {
    /// The window of `slot`'s run: at most half the time to the next slot,
    /// so a run never drifts into the following one.
    fn window_of(&self, slot: DateTime<Utc>, spread: &Spread) -> Duration {
        match self.first_after(slot) {
            Some(following) => spread.window.min((following - slot) / 2),
            None => spread.window,
        }
    }

    /// When the run for `slot` starts under `spread`.
    fn run_time(&self, slot: DateTime<Utc>, spread: &Spread) -> DateTime<Utc> {
        slot + spread.offset_in(self.window_of(slot, spread))
    }
}

/// Decides whether a backup is due.
///
/// `last_slot` is the slot handled last (none yet: `anchor`, the resource's
/// creation, so a new resource does not back up for slots before it existed).
/// A backup that started after a slot (the first one, or one asked for with
/// spec.backupRequest) already covers it: `last_backup_start` moves the base.
///
/// Runs start at their slot plus the resource's offset in `spread`. A run
/// more than [`ON_TIME_GRACE`] late is skipped under `Skip`; under `RunOnce`
/// it is taken, and if its time passed while the controller was away, at
/// the same offset after the controller resumed, so catch-ups are spread too.
pub fn decide(
    schedule: &Schedule,
    policy: MissedBackupPolicy,
    last_slot: Option<DateTime<Utc>>,
    last_backup_start: Option<DateTime<Utc>>,
    anchor: DateTime<Utc>,
    now: DateTime<Utc>,
    spread: &Spread,
) -> Decision {
    let base = last_slot
        .unwrap_or(anchor)
        .max(last_backup_start.unwrap_or(anchor));
    let following = schedule
        .first_after(now)
        .map(|slot| schedule.run_time(slot, spread));
    let due = schedule
        .latest_at_or_before(now)
        .filter(|slot| *slot > base);
    let Some(slot) = due else {
        return Decision {
            slot: None,
            start_backup: false,
            next: following,
        };
    };
    let run_at = schedule.run_time(slot, spread);
    let late = run_at + ON_TIME_GRACE < now;
    let start_at = match policy {
        MissedBackupPolicy::Skip if late => {
            return Decision {
                slot: Some(slot),
                start_backup: false,
                next: following,
            }
        }
        MissedBackupPolicy::RunOnce if run_at + ON_TIME_GRACE < spread.resumed => {
            spread.resumed + spread.offset_in(schedule.window_of(slot, spread))
        }
        _ => run_at,
    };
    if now < start_at {
        return Decision {
            slot: None,
            start_backup: false,
            next: Some(start_at),
        };
    }
    Decision {
        slot: Some(slot),
        start_backup: true,
        next: following,
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
            let d = decide(
                &daily,
                c.policy,
                c.last.map(t),
                None,
                created,
                t(c.now),
                &Spread::none(created),
            );
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
            &Spread::none(t("2020-01-01T00:00:00Z")),
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
                &Spread::none(created),
            );
            assert_eq!(d.slot, slot.map(t), "{what}");
            assert_eq!(d.start_backup, slot.is_some(), "{what}");
        }
    }

    fn uids(n: usize) -> Vec<String> {
        // Shaped like Kubernetes UIDs, differing only in their last digits.
        (0..n)
            .map(|i| format!("6f1c0e2a-93d4-4b7e-8a55-{i:012}"))
            .collect()
    }

    fn spread(uid: &str, window_minutes: i64, resumed: &str) -> Spread {
        Spread {
            window: Duration::minutes(window_minutes),
            key: spread_key(uid),
            resumed: t(resumed),
        }
    }

    /// The stampede test: 1,000 resources on `0 3 * * *` with a 1 h window
    /// start over the whole hour, never two dozen in one minute, and each at
    /// the time nextBackupTime announced.
    #[test]
    fn one_schedule_many_resources_spread_over_the_window() {
        let daily = Schedule::parse("0 3 * * *").expect("schedule");
        let created = t("2025-01-01T12:00:00Z");
        let slot = t("2025-01-02T03:00:00Z");
        let mut per_minute = [0usize; 60];
        for uid in uids(1000) {
            let sp = spread(&uid, 60, "2025-01-01T12:00:00Z");
            let before = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                None,
                None,
                created,
                t("2025-01-02T02:59:00Z"),
                &sp,
            );
            let start = before.next.expect("announced");
            assert!(
                start >= slot && start < slot + Duration::hours(1),
                "{uid}: {start}"
            );
            per_minute[((start - slot).num_minutes()) as usize] += 1;
            let early = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                None,
                None,
                created,
                start - Duration::seconds(1),
                &sp,
            );
            assert!(!early.start_backup, "{uid}: a second early");
            assert_eq!(early.next, Some(start), "{uid}: still announced");
            let at = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                None,
                None,
                created,
                start,
                &sp,
            );
            assert_eq!((at.slot, at.start_backup), (Some(slot), true), "{uid}");
            // Stable across restarts: another resume time, same start.
            let restarted = spread(&uid, 60, "2025-01-02T02:00:00Z");
            let again = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                None,
                None,
                created,
                t("2025-01-02T02:59:00Z"),
                &restarted,
            );
            assert_eq!(again.next, Some(start), "{uid}: moved by a restart");
        }
        let busiest = per_minute.iter().max().copied().unwrap_or_default();
        let empty = per_minute.iter().filter(|n| **n == 0).count();
        assert!(
            busiest <= 35,
            "{busiest} starts in one minute: {per_minute:?}"
        );
        assert_eq!(empty, 0, "minutes without a start: {per_minute:?}");
    }

    /// The window never reaches half-way to the next slot.
    #[test]
    fn the_window_is_capped_by_the_schedule() {
        let cases = [
            // (schedule, window minutes, slot, longest offset in seconds)
            ("*/10 * * * *", 60, "2025-01-02T03:10:00Z", 300),
            ("* * * * *", 60, "2025-01-02T03:10:00Z", 30),
            ("0 3 * * *", 60, "2025-01-02T03:00:00Z", 3600),
            ("0 3 * * *", 0, "2025-01-02T03:00:00Z", 0),
        ];
        for (expr, window, slot, longest) in cases {
            let schedule = Schedule::parse(expr).expect("schedule");
            let slot = t(slot);
            let mut seen = 0;
            for uid in uids(200) {
                let sp = spread(&uid, window, "2025-01-01T00:00:00Z");
                let d = decide(
                    &schedule,
                    MissedBackupPolicy::RunOnce,
                    Some(slot - Duration::seconds(1)),
                    None,
                    t("2025-01-01T00:00:00Z"),
                    slot,
                    &sp,
                );
                let offset = match d.start_backup {
                    true => 0,
                    false => (d.next.expect("pending") - slot).num_seconds(),
                };
                assert!(offset <= longest.max(0), "{expr}: {offset}s");
                seen = seen.max(offset);
            }
            assert!(
                seen * 10 >= longest * 9,
                "{expr}: offsets reach {seen}s of {longest}s"
            );
        }
    }

    /// After an outage that missed the slot, catch-ups start over the
    /// window after the controller resumed, not all at once; under Skip
    /// they are skipped, each exactly once.
    #[test]
    fn catch_ups_after_an_outage_are_spread() {
        let daily = Schedule::parse("0 3 * * *").expect("schedule");
        let created = t("2025-01-01T12:00:00Z");
        let resumed = t("2025-01-02T09:00:00Z");
        let mut first_minute = 0;
        let mut latest = resumed;
        for uid in uids(500) {
            let sp = spread(&uid, 60, "2025-01-02T09:00:00Z");
            let at_resume = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                Some(t("2025-01-01T03:00:00Z")),
                None,
                created,
                resumed,
                &sp,
            );
            let start = match at_resume.start_backup {
                true => resumed,
                false => at_resume.next.expect("catch-up announced"),
            };
            assert!(start < resumed + Duration::hours(1), "{uid}: {start}");
            if start < resumed + Duration::minutes(1) {
                first_minute += 1;
            }
            latest = latest.max(start);
            let taken = decide(
                &daily,
                MissedBackupPolicy::RunOnce,
                Some(t("2025-01-01T03:00:00Z")),
                None,
                created,
                start,
                &sp,
            );
            assert_eq!(
                (taken.slot, taken.start_backup),
                (Some(t("2025-01-02T03:00:00Z")), true),
                "{uid}"
            );
            let skipped = decide(
                &daily,
                MissedBackupPolicy::Skip,
                Some(t("2025-01-01T03:00:00Z")),
                None,
                created,
                resumed,
                &sp,
            );
            assert_eq!(
                (skipped.slot, skipped.start_backup),
                (Some(t("2025-01-02T03:00:00Z")), false),
                "{uid}: skip"
            );
        }
        assert!(
            first_minute <= 25,
            "{first_minute} catch-ups in the first minute"
        );
        assert!(
            latest > resumed + Duration::minutes(50),
            "last catch-up {latest}"
        );
    }

    #[test]
    fn spread_keys_differ_and_are_stable() {
        let keys: std::collections::HashSet<u64> =
            uids(1000).iter().map(|u| spread_key(u)).collect();
        assert_eq!(keys.len(), 1000);
        assert_eq!(spread_key("abc"), spread_key("abc"));
    }
}
