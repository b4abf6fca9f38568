//! Publishing Kubernetes Events (`events.k8s.io/v1`).
//!
//! kube's own `Recorder` folds every Event with the same reason and action
//! into the first one for minutes, keeping the first one's note: the second
//! `BackupSucceeded` showed the first backup's id. Here the note is part of
//! the key, so an Event with new content is a new Event, and only exact
//! repeats are counted as a series.

use chrono::{DateTime, Duration, Utc};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Mutex;

pub use kube::runtime::events::{Event, EventType, Reporter};

/// How long an Event can still be counted as repeated rather than new.
const SERIES_WINDOW: Duration = Duration::minutes(6);

/// What makes two Events the same: everything a reader sees.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    warning: bool,
    reason: String,
    action: String,
    note: Option<String>,
    regarding: (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
    ),
}

/// The published Event a repeat is counted on.
struct Published {
    name: String,
    namespace: String,
    count: i32,
    last: DateTime<Utc>,
}

/// Publishes Events for one reporting controller; repeats of an identical
/// Event within a few minutes increase its series count instead of adding
/// objects.
pub struct Recorder {
    client: Client,
    reporter: Reporter,
    published: Mutex<HashMap<Key, Published>>,
}

impl Recorder {
    pub fn new(client: Client, reporter: Reporter) -> Self {
        Recorder {
            client,
            reporter,
            published: Mutex::new(HashMap::new()),
        }
    }

    fn key(ev: &Event, regarding: &ObjectReference) -> Key {
        Key {
            warning: ev.type_ == EventType::Warning,
            reason: ev.reason.clone(),
            action: ev.action.clone(),
            note: ev.note.clone(),
            regarding: (
                regarding.api_version.clone(),
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.uid.clone().or_else(|| regarding.name.clone()),
            ),
        }
    }

    /// The repeat this Event would be, if any (forgetting expired ones).
    fn repeat_of(&self, key: &Key, now: DateTime<Utc>) -> Option<(String, String, i32)> {
        let mut published = self.published.lock().unwrap_or_else(|p| p.into_inner());
        published.retain(|_, p| now - p.last < SERIES_WINDOW);
        published
            .get(key)
            .map(|p| (p.name.clone(), p.namespace.clone(), p.count + 1))
    }

    fn remember(&self, key: Key, name: String, namespace: String, count: i32, now: DateTime<Utc>) {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                key,
                Published {
                    name,
                    namespace,
                    count,
                    last: now,
                },
            );
    }

    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Utc::now();
        let key = Self::key(ev, regarding);
        if let Some((name, namespace, count)) = self.repeat_of(&key, now) {
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
            let series = EventSeries {
                count,
                last_observed_time: MicroTime(to_timestamp(now)),
            };
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "series": series })),
            )
            .await?;
            self.remember(key, name, namespace, count, now);
            return Ok(());
        }
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_string());
        let name = format!(
            "{}.{:x}",
            regarding
                .name
                .as_deref()
                .unwrap_or(&self.reporter.controller),
            now.timestamp_nanos_opt().unwrap_or_default()
        );
        let event = K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(to_timestamp(now))),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_string(),
            ),
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &event).await?;
        // Counted from 1: the first repeat makes the series count 2.
        self.remember(key, name, namespace, 1, now);
        Ok(())
    }
}

fn to_timestamp(t: DateTime<Utc>) -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::from_nanosecond(
        t.timestamp_nanos_opt().unwrap_or_default().into(),
    )
    .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::testing::FakeApi;

    fn regarding() -> ObjectReference {
        ObjectReference {
            api_version: Some("walden.dev/v1alpha1".into()),
            kind: Some("ContinuousBackup".into()),
            name: Some("pg-backup".into()),
            namespace: Some("db".into()),
            uid: Some("cb-uid".into()),
            ..Default::default()
        }
    }

    fn event(note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: "BackupSucceeded".into(),
            note: Some(note.into()),
            action: "Backup".into(),
            secondary: None,
        }
    }

    #[tokio::test]
    async fn distinct_notes_are_distinct_events_and_repeats_a_series() {
        let api = FakeApi::default();
        let recorder = Recorder::new(
            api.client(),
            Reporter {
                controller: "walden-operator".into(),
                instance: None,
            },
        );
        for note in ["base backup A completed", "base backup B completed"] {
            recorder
                .publish(&event(note), &regarding())
                .await
                .expect("publish");
        }
        recorder
            .publish(&event("base backup B completed"), &regarding())
            .await
            .expect("publish");
        let writes: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|r| r.path.contains("/events"))
            .collect();
        let created: Vec<_> = writes
            .iter()
            .filter(|r| r.method == "POST")
            .map(|r| r.body["note"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            created,
            ["base backup A completed", "base backup B completed"]
        );
        let patches: Vec<_> = writes.iter().filter(|r| r.method == "PATCH").collect();
        assert_eq!(patches.len(), 1, "{writes:?}");
        assert_eq!(patches[0].body["series"]["count"], 2);
        assert!(
            patches[0].path.ends_with(
                writes[1].body["metadata"]["name"]
                    .as_str()
                    .unwrap_or("no name")
            ),
            "the repeat is counted on B's Event: {}",
            patches[0].path
        );
    }
}
