//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: String,
    pub result: String,
}

/// Counters the controllers update.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub backups_started: Counter,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("walden_operator");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        let backups_started = Counter::default();
        registry.register(
            "backups_started",
            "Base backups the operator asked a daemon to start",
            backups_started.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        Metrics {
            registry,
            reconciles,
            backups_started,
            leader,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, controller: &str, ok: bool) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
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
        m.reconciled("fork", true);
        m.reconciled("fork", false);
        m.reconciled("fork", false);
        let text = m.encode().expect("encode");
        assert!(
            text.contains(
                r#"walden_operator_reconciles_total{controller="fork",result="error"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains("walden_operator_leader 0"), "{text}");
    }
}
