//! What keeps one operator calm with thousands of resources: a cap on
//! concurrent base backups, transient API failures kept out of status until
//! they persist, and backoff with jitter so that retries and requeues never
//! march in lockstep.

use chrono::{DateTime, Duration as Span, Utc};
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

/// A transient failure goes into status and Events only once it has lasted
/// this long and recurred this often: a restart's connection storm or a
/// burst of 429s is retried quietly, an apiserver down for minutes is not.
pub const PERSISTENT_AFTER: Span = Span::minutes(2);
pub const PERSISTENT_COUNT: u32 = 3;
/// First retry after a failure, and the longest wait between retries.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a Kubernetes client error is a passing one: throttling, an
/// apiserver restarting or overloaded, a connection that failed or timed
/// out. Anything else (a 4xx answer, a bad body) is a real problem.
pub fn transient_kube(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => matches!(s.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

/// The cap on base backups running at once across every ContinuousBackup of
/// this operator, so that a shared schedule or a catch-up wave cannot start
/// thousands of backups against one object store.
pub struct BackupGate {
    cap: usize,
    running: Mutex<HashSet<String>>,
}

impl BackupGate {
    pub fn new(cap: usize) -> Self {
        BackupGate {
            cap: cap.max(1),
            running: Mutex::default(),
        }
    }

    /// Takes a place for `key`'s backup; `false` when all places are taken
    /// (the backup waits). A key that already holds a place keeps it.
    pub fn try_start(&self, key: &str) -> bool {
        let mut running = lock(&self.running);
        if running.contains(key) {
            return true;
        }
        if running.len() >= self.cap {
            return false;
        }
        running.insert(key.to_string());
        true
    }

    /// Records a backup found running (after a restart), even above the cap:
    /// it runs already, and counting it keeps new ones waiting.
    pub fn running(&self, key: &str) {
        lock(&self.running).insert(key.to_string());
    }

    /// Gives `key`'s place back.
    pub fn finished(&self, key: &str) {
        lock(&self.running).remove(key);
    }

    pub fn in_use(&self) -> usize {
        lock(&self.running).len()
    }
}

/// A run of consecutive failures of one object's reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub count: u32,
    pub since: DateTime<Utc>,
}

impl Streak {
    /// Whether to write this failure into status and Events: at once for a
    /// real error, for a transient one only once it persists.
    pub fn report(&self, transient: bool, now: DateTime<Utc>) -> bool {
        !transient || (self.count >= PERSISTENT_COUNT && now - self.since >= PERSISTENT_AFTER)
    }

    /// How long to wait before the next attempt: doubling from
    /// [`BACKOFF_FIRST`] up to [`BACKOFF_MAX`], before jitter.
    pub fn backoff(&self) -> Duration {
        let doublings = self.count.saturating_sub(1).min(16);
        BACKOFF_FIRST
            .saturating_mul(1 << doublings)
            .min(BACKOFF_MAX)
    }
}

/// Failure streaks per object (namespace/name), forgotten on success.
#[derive(Default)]
pub struct Failures {
    streaks: Mutex<HashMap<String, Streak>>,
}

impl Failures {
    pub fn failed(&self, key: &str, now: DateTime<Utc>) -> Streak {
        let mut streaks = lock(&self.streaks);
        let streak = streaks.entry(key.to_string()).or_insert(Streak {
            count: 0,
            since: now,
        });
        streak.count += 1;
        *streak
    }

    /// The current streak, if the last attempt failed.
    pub fn current(&self, key: &str) -> Option<Streak> {
        lock(&self.streaks).get(key).copied()
    }

    pub fn succeeded(&self, key: &str) {
        lock(&self.streaks).remove(key);
    }
}

/// The operator-wide settings and state that spread load over time.
pub struct Fleet {
    pub backups: BackupGate,
    pub failures: Failures,
    /// The default window scheduled backups are spread over
    /// (spec.backupWindow overrides it per resource).
    pub backup_window: Span,
    /// When this operator started leading: runs missed before it are catch-ups.
    pub resumed: DateTime<Utc>,
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
    /// Off in tests, where requeue times are asserted exactly.
    pub jitter: bool,
}

impl Fleet {
    /// No spreading, no jitter, no cap worth mentioning: for tests that
    /// assert exact times.
    pub fn exact(resumed: DateTime<Utc>) -> Self {
        Fleet {
            backups: BackupGate::new(usize::MAX),
            failures: Failures::default(),
            backup_window: Span::zero(),
            resumed,
            concurrency: 0,
            jitter: false,
        }
    }

    /// Requeue after about `d`, jittered.
    pub fn requeue(&self, d: Duration) -> kube::runtime::controller::Action {
        let d = match self.jitter {
            true => jittered(d, random_unit()),
            false => d,
        };
        kube::runtime::controller::Action::requeue(d)
    }
}

/// How long a resource that waits (for its StatefulSet, for a primary)
/// sleeps before it looks again, after having waited `waited`: half of that,
/// from 30 s up to 5 min. Watch events wake it sooner.
pub fn wait_interval(waited: Span) -> Duration {
    let half = (waited / 2).to_std().unwrap_or_default();
    half.clamp(Duration::from_secs(30), BACKOFF_MAX)
}

/// Scales `d` by a factor in [0.9, 1.1) drawn from `unit` (in [0, 1)), so
/// that objects created together drift apart instead of requeueing as one.
pub fn jittered(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// A uniformly random number in [0, 1) from the OS.
pub fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(Status::failure("m", "r").with_code(code)))
    }

    #[test]
    fn transient_errors_table() {
        let cases = [
            ("throttled", api(429), true),
            ("apiserver error", api(500), true),
            ("unavailable", api(503), true),
            ("gateway timeout", api(504), true),
            ("forbidden", api(403), false),
            ("not found", api(404), false),
            ("conflict", api(409), false),
            ("invalid", api(422), false),
            (
                "connect failed",
                kube::Error::Service("connection refused".into()),
                true,
            ),
            (
                "bad body",
                kube::Error::SerdeError(serde_json::from_str::<u8>("x").expect_err("not json")),
                false,
            ),
        ];
        for (what, err, want) in cases {
            assert_eq!(transient_kube(&err), want, "{what}");
        }
    }

    #[test]
    fn the_gate_caps_starts_and_frees_places() {
        let gate = BackupGate::new(2);
        assert!(gate.try_start("a"));
        assert!(gate.try_start("b"));
        assert!(!gate.try_start("c"), "third waits");
        assert!(gate.try_start("a"), "a holder keeps its place");
        gate.finished("a");
        assert!(gate.try_start("c"), "a freed place is taken");
        gate.running("d");
        assert_eq!(
            gate.in_use(),
            3,
            "a running backup found counts above the cap"
        );
        gate.finished("b");
        assert!(!gate.try_start("e"), "still full: c and d");
        gate.finished("d");
        assert!(gate.try_start("e"));
    }

    #[test]
    fn streaks_report_real_errors_at_once_and_transient_ones_when_they_persist() {
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).expect("time");
        let failures = Failures::default();
        // (seconds after the first failure, transient, reported)
        let cases = [
            (0, true, false),
            (5, true, false),
            (130, true, true),
            (131, false, true),
        ];
        for (secs, transient, want) in cases {
            let now = t0 + Span::seconds(secs);
            let streak = failures.failed("ns/cb", now);
            assert_eq!(streak.since, t0);
            assert_eq!(streak.report(transient, now), want, "after {secs}s");
        }
        let other = failures.failed("ns/other", t0 + Span::seconds(500));
        assert_eq!(other.count, 1, "streaks are per object");
        assert!(!other.report(true, t0 + Span::seconds(500)));
        failures.succeeded("ns/cb");
        assert!(failures.current("ns/cb").is_none(), "success forgets");
        assert_eq!(failures.failed("ns/cb", t0).count, 1);
    }

    #[test]
    fn waiting_grows_with_the_wait() {
        let cases = [
            (0, 30),
            (30, 30),
            (120, 60),
            (300, 150),
            (3600, 300),
            (-5, 30),
        ];
        for (waited, secs) in cases {
            assert_eq!(
                wait_interval(Span::seconds(waited)),
                Duration::from_secs(secs),
                "{waited}"
            );
        }
    }

    #[test]
    fn backoff_doubles_to_a_ceiling() {
        let t0 = DateTime::<Utc>::from_timestamp(0, 0).expect("time");
        let cases = [(1, 5), (2, 10), (3, 20), (6, 160), (7, 300), (40, 300)];
        for (count, secs) in cases {
            let streak = Streak { count, since: t0 };
            assert_eq!(streak.backoff(), Duration::from_secs(secs), "{count}");
        }
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_varies() {
        let d = Duration::from_secs(60);
        assert_eq!(jittered(d, 0.0), Duration::from_secs(54));
        assert_eq!(jittered(d, 0.5), Duration::from_secs(60));
        assert!(jittered(d, 1.0) <= Duration::from_secs(66));
        let draws: HashSet<u64> = (0..50).map(|_| (random_unit() * 1e9) as u64).collect();
        assert!(draws.len() > 45, "random draws repeat: {}", draws.len());
        assert!((0..1000)
            .map(|_| random_unit())
            .all(|u| (0.0..1.0).contains(&u)));
    }
}
