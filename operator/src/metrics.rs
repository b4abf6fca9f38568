//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

/// A failed reconcile: the controller and the error's reason (the one
/// conditions and Events show).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: String,
    pub reason: String,
}

type DurationFamily = Family<ControllerLabels, Histogram, fn() -> Histogram>;

/// Reconcile durations from 5 ms to about 20 s.
fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// One ContinuousBackup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackupLabels {
    pub namespace: String,
    pub name: String,
}

/// One ContinuousBackup and a proof's result.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProofLabels {
    pub namespace: String,
    pub name: String,
    pub result: String,
}

/// Counters the controllers update.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_duration: DurationFamily,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub backups_started: Counter,
    /// Reconcile failures retried quietly (throttling, connection errors).
    pub transient_errors: Counter,
    /// Scheduled or requested backups held back by the concurrent-backup cap.
    pub backups_queued: Counter,
    pub leader: Gauge,
    /// `walden_restore_test_*`: the restore proofs (the age of the last
    /// success is `time() - walden_restore_test_last_success_timestamp_seconds`).
    pub restore_test_result: Family<BackupLabels, Gauge>,
    pub restore_test_duration: Family<BackupLabels, Gauge<f64, AtomicU64>>,
    pub restore_test_last_success: Family<BackupLabels, Gauge>,
    pub restore_test_runs: Family<ProofLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let proofs = root.sub_registry_with_prefix("walden_restore_test");
        let restore_test_result = Family::<BackupLabels, Gauge>::default();
        proofs.register(
            "result",
            "1 if the last restore proof of the ContinuousBackup succeeded, 0 if it failed or timed out",
            restore_test_result.clone(),
        );
        let restore_test_duration = Family::<BackupLabels, Gauge<f64, AtomicU64>>::default();
        proofs.register(
            "duration_seconds",
            "How long the last restore proof took, from its start to its end",
            restore_test_duration.clone(),
        );
        let restore_test_last_success = Family::<BackupLabels, Gauge>::default();
        proofs.register(
            "last_success_timestamp_seconds",
            "When the last successful restore proof finished (Unix time)",
            restore_test_last_success.clone(),
        );
        let restore_test_runs = Family::<ProofLabels, Counter>::default();
        proofs.register(
            "runs",
            "Finished restore proofs by result",
            restore_test_runs.clone(),
        );
        let registry = root.sub_registry_with_prefix("walden_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        let reconcile_duration: DurationFamily =
            Family::new_with_constructor(reconcile_histogram as fn() -> Histogram);
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles take, by controller",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed reconciles by controller and reason",
            reconcile_errors.clone(),
        );
        let backups_started = Counter::default();
        registry.register(
            "backups_started",
            "Base backups the operator asked a daemon to start",
            backups_started.clone(),
        );
        let transient_errors = Counter::default();
        registry.register(
            "transient_errors",
            "Reconcile failures retried without a status write (throttling, connection errors)",
            transient_errors.clone(),
        );
        let backups_queued = Counter::default();
        registry.register(
            "backups_queued",
            "Backup starts held back because the concurrent-backup cap was reached",
            backups_queued.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry: root,
            reconciles,
            reconcile_duration,
            reconcile_errors,
            backups_started,
            transient_errors,
            backups_queued,
            leader,
            restore_test_result,
            restore_test_duration,
            restore_test_last_success,
            restore_test_runs,
        }
    }
}

impl Metrics {
    /// Records one reconcile: how long it took and, when it failed, why.
    pub fn reconciled(&self, controller: &str, error: Option<&str>, took: std::time::Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.to_string(),
                result: if error.is_none() { "ok" } else { "error" }.to_string(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.to_string(),
            })
            .observe(took.as_secs_f64());
        if let Some(reason) = error {
            self.reconcile_errors
                .get_or_create(&ErrorLabels {
                    controller: controller.to_string(),
                    reason: reason.to_string(),
                })
                .inc();
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_show_in_the_exposition() {
        let m = Metrics::default();
        let ms = std::time::Duration::from_millis;
        m.reconciled("fork", None, ms(3));
        m.reconciled("fork", Some("KubernetesApiError"), ms(40));
        m.reconciled("fork", Some("InvalidSpec"), ms(7000));
        let text = m.encode().expect("encode");
        for series in [
            r#"walden_operator_reconcile_duration_seconds_count{controller="fork"} 3"#,
            r#"walden_operator_reconcile_duration_seconds_bucket{le="0.005",controller="fork"} 1"#,
            r#"walden_operator_reconcile_errors_total{controller="fork",reason="KubernetesApiError"} 1"#,
            r#"walden_operator_reconcile_errors_total{controller="fork",reason="InvalidSpec"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        assert!(
            text.contains(
                r#"walden_operator_reconciles_total{controller="fork",result="error"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("walden_operator_leader 0"), "{text}");
    }
}
