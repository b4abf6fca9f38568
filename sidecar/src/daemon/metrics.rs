//! The daemon's Prometheus metrics: what a platform team alerts on.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WalLabel {
    pub wal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnswerLabel {
    pub answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

fn fetch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn backup_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

/// Every metric the daemon exports; cheap to clone (all handles are shared).
#[derive(Clone)]
pub struct Metrics {
    pub wal_archived: Counter,
    pub wal_archive_failures: Counter,
    pub wal_push_answers: Family<AnswerLabel, Counter>,
    pub wal_last_archived_time: Gauge<f64, AtomicU64>,
    pub wal_last_archived: Family<WalLabel, Gauge>,
    pub wal_ready_files: Gauge,
    pub wal_uploads_in_flight: Gauge,
    pub storage_uploaded_bytes: Counter,
    pub storage_downloaded_bytes: Counter,
    pub wal_fetches: Family<ResultLabel, Counter>,
    pub wal_fetch_duration: Family<SourceLabel, Histogram, fn() -> Histogram>,
    pub prefetch_hits: Counter,
    pub prefetch_misses: Counter,
    pub prefetch_discarded: Counter,
    pub prefetch_files: Gauge,
    pub backups: Family<ResultLabel, Counter>,
    pub backup_duration: Family<ResultLabel, Histogram, fn() -> Histogram>,
    pub backup_running: Gauge,
    pub backup_last_success_time: Gauge<f64, AtomicU64>,
    pub postgres_in_recovery: Gauge,
    pub replay_lag_seconds: Gauge<f64, AtomicU64>,
    pub replay_lag_bytes: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under the `walden_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            wal_archived: Counter::default(),
            wal_archive_failures: Counter::default(),
            wal_push_answers: Family::default(),
            wal_last_archived_time: Gauge::default(),
            wal_last_archived: Family::default(),
            wal_ready_files: Gauge::default(),
            wal_uploads_in_flight: Gauge::default(),
            storage_uploaded_bytes: Counter::default(),
            storage_downloaded_bytes: Counter::default(),
            wal_fetches: Family::default(),
            wal_fetch_duration: Family::new_with_constructor(fetch_histogram),
            prefetch_hits: Counter::default(),
            prefetch_misses: Counter::default(),
            prefetch_discarded: Counter::default(),
            prefetch_files: Gauge::default(),
            backups: Family::default(),
            backup_duration: Family::new_with_constructor(backup_histogram),
            backup_running: Gauge::default(),
            backup_last_success_time: Gauge::default(),
            postgres_in_recovery: Gauge::default(),
            replay_lag_seconds: Gauge::default(),
            replay_lag_bytes: Gauge::default(),
        };
        let r = registry;
        r.register(
            "wal_archived",
            "WAL files the daemon stored durably (uploaded, or found identical in the archive)",
            m.wal_archived.clone(),
        );
        r.register(
            "wal_archive_failures",
            "WAL uploads that failed (storage errors, conflicts, refused segments)",
            m.wal_archive_failures.clone(),
        );
        r.register(
            "wal_push_answers",
            "wal-push requests answered, by how: uploaded (waited for an upload), remembered (already stored), failed",
            m.wal_push_answers.clone(),
        );
        r.register(
            "wal_last_archived_timestamp_seconds",
            "Unix time the newest WAL segment was stored",
            m.wal_last_archived_time.clone(),
        );
        r.register(
            "wal_last_archived",
            "The newest WAL segment stored (value 1, name in the label)",
            m.wal_last_archived.clone(),
        );
        r.register(
            "wal_ready_files",
            "WAL files PostgreSQL marked .ready and not yet archived (archive lag)",
            m.wal_ready_files.clone(),
        );
        r.register(
            "wal_uploads_in_flight",
            "WAL uploads running now",
            m.wal_uploads_in_flight.clone(),
        );
        r.register(
            "storage_uploaded_bytes",
            "Bytes sent to storage (compressed, as stored)",
            m.storage_uploaded_bytes.clone(),
        );
        r.register(
            "storage_downloaded_bytes",
            "Bytes read from storage (compressed, as stored)",
            m.storage_downloaded_bytes.clone(),
        );
        r.register(
            "wal_fetches",
            "wal-fetch requests answered, by result: restored, not_found, failed",
            m.wal_fetches.clone(),
        );
        r.register(
            "wal_fetch_duration_seconds",
            "Time to answer a wal-fetch request, by source: prefetch or storage",
            m.wal_fetch_duration.clone(),
        );
        r.register(
            "prefetch_hits",
            "wal-fetch requests served from prefetched files",
            m.prefetch_hits.clone(),
        );
        r.register(
            "prefetch_misses",
            "wal-fetch requests for segments that had not been prefetched",
            m.prefetch_misses.clone(),
        );
        r.register(
            "prefetch_discarded",
            "Prefetched segments removed unused (PostgreSQL took another timeline or position)",
            m.prefetch_discarded.clone(),
        );
        r.register(
            "prefetch_files",
            "Prefetched segments waiting on local disk",
            m.prefetch_files.clone(),
        );
        r.register(
            "backups",
            "Base backups the daemon ran, by result: succeeded, failed",
            m.backups.clone(),
        );
        r.register(
            "backup_duration_seconds",
            "Duration of base backups, by result",
            m.backup_duration.clone(),
        );
        r.register(
            "backup_running",
            "1 while a base backup runs",
            m.backup_running.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "Unix time the last successful base backup finished",
            m.backup_last_success_time.clone(),
        );
        r.register(
            "postgres_in_recovery",
            "1 when the local PostgreSQL is a standby (in recovery), 0 when primary",
            m.postgres_in_recovery.clone(),
        );
        r.register(
            "replay_lag_seconds",
            "On a standby: seconds since the last replayed transaction was committed on the primary",
            m.replay_lag_seconds.clone(),
        );
        r.register(
            "replay_lag_bytes",
            "On a standby: bytes of WAL received but not yet replayed",
            m.replay_lag_bytes.clone(),
        );
        m
    }

    pub fn set_last_archived(&self, wal: &str, at: chrono::DateTime<chrono::Utc>) {
        self.wal_last_archived.clear();
        self.wal_last_archived
            .get_or_create(&WalLabel {
                wal: wal.to_string(),
            })
            .set(1);
        self.wal_last_archived_time
            .set(at.timestamp_millis() as f64 / 1000.0);
    }
}
