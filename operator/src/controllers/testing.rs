//! Test doubles for reconciler tests: an in-memory API server behind kube's
//! mock service (tower-test), and a scripted daemon.

use super::Context;
use crate::daemon_client::{
    BackupJob, DaemonApi, DaemonError, DaemonStatus, Endpoint, Promotion, StartBackup,
};
use crate::events::{Recorder, Reporter};
use crate::metrics::Metrics;
use crate::specs::OperatorConfig;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use http::{Request, Response, StatusCode};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// One request the fake API server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// Paths whose next apply answers 409 unless forced.
    conflicts: HashMap<String, String>,
    /// Paths whose GET fails, with the status code it answers.
    broken: HashMap<String, u16>,
}

/// An in-memory Kubernetes API: GET/list, create, server-side apply (merge
/// by name for keyed lists), status subresources, JSON patches of
/// finalizers, and Events.
#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Arc<Mutex<State>>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Path of an object, e.g. `/apis/apps/v1/namespaces/ns/statefulsets/pg`.
pub fn path_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().unwrap_or_default();
    let kind = obj["kind"].as_str().unwrap_or_default();
    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    let plural = format!("{}s", kind.to_lowercase());
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/{ns}/{plural}/{name}")
}

/// Merge as server-side apply would for our objects: maps recursively, lists
/// of named objects by name, anything else replaced.
pub fn merge(into: &mut Value, patch: &Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (Value::Array(a), Value::Array(b))
            if b.iter().all(|x| x.get("name").is_some()) && !b.is_empty() =>
        {
            for item in b {
                match a.iter_mut().find(|x| x.get("name") == item.get("name")) {
                    Some(existing) => merge(existing, item),
                    None => a.push(item.clone()),
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

fn status_error(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "code": code, "reason": reason, "message": message})
}

impl FakeApi {
    pub fn insert(&self, obj: Value) {
        let mut obj = obj;
        if obj["metadata"]["resourceVersion"].is_null() {
            obj["metadata"]["resourceVersion"] = json!("1");
        }
        lock(&self.state).objects.insert(path_of(&obj), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        lock(&self.state).objects.get(path).cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state).requests.clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state).requests.clear();
    }

    pub fn writes(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(Recorded::is_write)
            .collect()
    }

    /// Event reasons posted so far.
    pub fn event_reasons(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.path.contains("/events"))
            .filter_map(|r| r.body["reason"].as_str().map(str::to_string))
            .collect()
    }

    /// Notes of the Events created (not repeats counted on one) with this reason.
    pub fn event_notes(&self, reason: &str) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.contains("/events"))
            .filter(|r| r.body["reason"] == reason)
            .filter_map(|r| r.body["note"].as_str().map(str::to_string))
            .collect()
    }

    pub fn conflict_on_apply(&self, path: &str, manager: &str) {
        lock(&self.state)
            .conflicts
            .insert(path.to_string(), manager.to_string());
    }

    /// GET of `path` answers 500 (a transient apiserver failure).
    pub fn break_get(&self, path: &str) {
        lock(&self.state).broken.insert(path.to_string(), 500);
    }

    /// GET of `path` answers 403 (RBAC missing: a real error).
    pub fn deny_get(&self, path: &str) {
        lock(&self.state).broken.insert(path.to_string(), 403);
    }

    pub fn heal_get(&self, path: &str) {
        lock(&self.state).broken.remove(path);
    }

    fn handle(&self, r: &Recorded) -> (StatusCode, Value) {
        let mut st = lock(&self.state);
        st.requests.push(r.clone());
        let (path, sub) = match r.path.strip_suffix("/status") {
            Some(p) => (p.to_string(), Some("status")),
            None => (r.path.clone(), None),
        };
        match r.method.as_str() {
            "GET" => {
                match st.broken.get(&path) {
                    Some(403) => {
                        return (
                            StatusCode::FORBIDDEN,
                            status_error(403, "Forbidden", "statefulsets is forbidden for walden"),
                        )
                    }
                    Some(_) => {
                        return (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            status_error(500, "InternalError", "etcd is on fire"),
                        )
                    }
                    None => {}
                }
                if let Some(o) = st.objects.get(&path) {
                    return (StatusCode::OK, o.clone());
                }
                let prefix = format!("{path}/");
                let items: Vec<Value> = st
                    .objects
                    .iter()
                    .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                    .map(|(_, v)| v.clone())
                    .collect();
                if path.ends_with('s') && (!items.is_empty() || r.query.contains("labelSelector")) {
                    return (
                        StatusCode::OK,
                        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
                    );
                }
                (
                    StatusCode::NOT_FOUND,
                    status_error(404, "NotFound", &format!("{path} not found")),
                )
            }
            "POST" => {
                let mut obj = r.body.clone();
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let full = format!("{path}/{name}");
                if st.objects.contains_key(&full) {
                    return (
                        StatusCode::CONFLICT,
                        status_error(409, "AlreadyExists", &format!("{name} already exists")),
                    );
                }
                obj["metadata"]["resourceVersion"] = json!("1");
                st.objects.insert(full, obj.clone());
                (StatusCode::CREATED, obj)
            }
            "PATCH" if r.content_type.contains("apply-patch") => {
                if let Some(manager) = st.conflicts.get(&path) {
                    if !r.query.contains("force=true") {
                        let msg = format!("Apply failed with 1 conflict: conflict with \"{manager}\" using apps/v1: .spec.template.spec.containers[name=\"postgres\"].args");
                        return (StatusCode::CONFLICT, status_error(409, "Conflict", &msg));
                    }
                }
                let existing = st.objects.get(&path).cloned();
                let mut obj = match existing {
                    Some(o) => o,
                    None if sub.is_some() => {
                        return (
                            StatusCode::NOT_FOUND,
                            status_error(404, "NotFound", "no such object"),
                        )
                    }
                    None => json!({}),
                };
                if sub.is_some() {
                    // The operator is the status' only manager: fields it
                    // leaves out of an apply are removed.
                    obj["status"] = r.body["status"].clone();
                } else {
                    merge(&mut obj, &r.body);
                }
                st.objects.insert(path, obj.clone());
                (StatusCode::OK, obj)
            }
            "PATCH" => {
                let mut obj = match st.objects.get(&path) {
                    Some(o) => o.clone(),
                    None => {
                        return (
                            StatusCode::NOT_FOUND,
                            status_error(404, "NotFound", "no such object"),
                        )
                    }
                };
                if r.content_type.contains("json-patch") {
                    for op in r.body.as_array().into_iter().flatten() {
                        if op["path"]
                            .as_str()
                            .is_some_and(|p| p.starts_with("/metadata/finalizers"))
                        {
                            match op["op"].as_str() {
                                Some("add") if op["path"] == "/metadata/finalizers" => {
                                    obj["metadata"]["finalizers"] = op["value"].clone()
                                }
                                Some("add") => {
                                    let mut list = obj["metadata"]["finalizers"]
                                        .as_array()
                                        .cloned()
                                        .unwrap_or_default();
                                    list.push(op["value"].clone());
                                    obj["metadata"]["finalizers"] = Value::Array(list);
                                }
                                Some("remove") => {
                                    obj["metadata"]["finalizers"] = json!([]);
                                }
                                _ => {}
                            }
                        }
                    }
                } else {
                    merge(&mut obj, &r.body);
                }
                st.objects.insert(path, obj.clone());
                (StatusCode::OK, obj)
            }
            "DELETE" => match st.objects.remove(&path) {
                Some(o) => (StatusCode::OK, o),
                None => (
                    StatusCode::NOT_FOUND,
                    status_error(404, "NotFound", &format!("{path} not found")),
                ),
            },
            other => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_error(
                    405,
                    "MethodNotAllowed",
                    &format!("fake API does not support {other}"),
                ),
            ),
        }
    }

    /// A kube client talking to this fake.
    pub fn client(&self) -> Client {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let me = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes)
                    .or_else(|_| serde_yaml::from_slice(&bytes))
                    .unwrap_or(Value::Null);
                let recorded = Recorded {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_string(),
                    query: parts.uri.query().unwrap_or_default().to_string(),
                    content_type: parts
                        .headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string(),
                    body,
                };
                let (code, value) = me.handle(&recorded);
                let resp = Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .unwrap_or_else(|_| Response::new(Body::empty()));
                send.send_response(resp);
            }
        });
        Client::new(svc, "default")
    }
}

/// A scripted daemon: answers per endpoint and records every call.
#[derive(Default)]
pub struct FakeDaemon {
    pub statuses: Mutex<HashMap<String, DaemonStatus>>,
    pub start: Mutex<Option<StartBackup>>,
    pub jobs: Mutex<HashMap<String, BackupJob>>,
    pub promotion: Mutex<Option<Promotion>>,
    pub calls: Mutex<Vec<(String, Endpoint)>>,
}

impl FakeDaemon {
    pub fn calls(&self) -> Vec<(String, Endpoint)> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn record(&self, what: &str, ep: &Endpoint) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((what.to_string(), ep.clone()));
    }
    fn unreachable(ep: &Endpoint) -> DaemonError {
        DaemonError::Status {
            url: ep.base_url.clone(),
            status: 503,
            body: "fake daemon has no answer scripted".into(),
        }
    }
}

#[async_trait]
impl DaemonApi for FakeDaemon {
    async fn status(&self, ep: &Endpoint) -> Result<DaemonStatus, DaemonError> {
        self.record("status", ep);
        self.statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ep.base_url)
            .cloned()
            .ok_or_else(|| Self::unreachable(ep))
    }
    async fn start_backup(&self, ep: &Endpoint) -> Result<StartBackup, DaemonError> {
        self.record("start_backup", ep);
        self.start
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Self::unreachable(ep))
    }
    async fn backup(&self, ep: &Endpoint, id: &str) -> Result<Option<BackupJob>, DaemonError> {
        self.record("backup", ep);
        Ok(self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned())
    }
    async fn promote(&self, ep: &Endpoint) -> Result<Promotion, DaemonError> {
        self.record("promote", ep);
        self.promotion
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Self::unreachable(ep))
    }
}

pub const IMAGE: &str = "ghcr.io/walden-dev/walden:test";

/// A context over the fakes with a fixed clock.
pub fn context(api: &FakeApi, daemon: Arc<FakeDaemon>, now: DateTime<Utc>) -> Arc<Context> {
    context_with_image(api, daemon, now, IMAGE)
}

/// The same, as an operator shipping another walden image (an upgrade).
pub fn context_with_image(
    api: &FakeApi,
    daemon: Arc<FakeDaemon>,
    now: DateTime<Utc>,
    image: &str,
) -> Arc<Context> {
    let client = api.client();
    Arc::new(Context {
        client: client.clone(),
        daemon,
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "walden-operator".into(),
                instance: None,
            },
        ),
        config: OperatorConfig {
            walden_image: image.into(),
        },
        clock: Arc::new(move || now),
        metrics: Arc::new(Metrics::default()),
        tokens: Arc::default(),
        fleet: Arc::new(crate::fleet::Fleet::exact(now)),
    })
}

pub fn time(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test time")
        .with_timezone(&Utc)
}

/// A daemon status for a primary with healthy archiving.
pub fn primary_status() -> DaemonStatus {
    serde_json::from_value(json!({
        "role": "primary",
        "archiving": {"lastArchivedWal": "000000010000000000000007", "lastArchivedTime": "2025-05-01T10:00:00Z",
                      "lastFailedWal": null, "lastFailedTime": null, "lastError": null,
                      "archivedCount": 7, "failedCount": 0, "readyCount": 0},
        "lastBackup": {"id": "20250501T030000Z", "startTime": "2025-05-01T03:00:00Z", "stopTime": "2025-05-01T03:02:00Z",
                       "startLsn": "0/2000028", "stopLsn": "0/2000100"},
        "backupInProgress": null,
        "recoveryWindow": {"firstPoint": "2025-05-01T03:02:00Z", "firstLsn": "0/2000100", "lastArchivedWal": "000000010000000000000007"},
        "replay": null
    }))
    .expect("primary status")
}

/// A standby's status with the given replay position.
pub fn standby_status(lsn: &str, lag_seconds: f64, lag_bytes: u64) -> DaemonStatus {
    serde_json::from_value(json!({
        "role": "standby",
        "archiving": {"lastArchivedWal": null, "lastArchivedTime": null, "lastFailedWal": null,
                      "lastFailedTime": null, "lastError": null, "archivedCount": 0, "failedCount": 0, "readyCount": 0},
        "lastBackup": null, "backupInProgress": null, "recoveryWindow": null,
        "replay": {"replayLsn": lsn, "lagSeconds": lag_seconds, "lagBytes": lag_bytes}
    }))
    .expect("standby status")
}

/// A running pod with an IP and labels.
pub fn pod(ns: &str, name: &str, ip: &str, labels: Value, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "postgres", "image": "postgres:16"}]},
        "status": {"phase": "Running", "podIP": ip,
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}
