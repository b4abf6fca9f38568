//! Follower: N standbys restored from the source archive that keep
//! following it (optionally streaming), with per-replica replay lag in
//! status and `spec.promote` for a manual failover (one replica only).

use super::instance;
use super::{
    apply_status, backoff, conclude, controller_config, ensure_token, kube_err, namespace_of,
    owner_reference, publish, report_invalid, resolve_source, set_condition, ConditionType,
    Context, Error, PendingEvent, Status,
};
use crate::api::{Follower, FollowerStatus, ReplicaStatus};
use crate::daemon_client::{Endpoint, Promotion, Role};
use crate::specs::{self, InstanceKind, InstancePlan};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::{watcher, Controller};
use kube::ResourceExt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{instrument, warn};

const CONTROLLER: &str = "follower";
const POLL: Duration = Duration::from_secs(30);

pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let followers: Api<Follower> = Api::all(ctx.client.clone());
    let owned = watcher::Config::default().labels(&format!("{}=follower", specs::COMPONENT_LABEL));
    Controller::new(followers, watcher::Config::default())
        .owns(Api::<StatefulSet>::all(ctx.client.clone()), owned)
        .graceful_shutdown_on(shutdown)
        .with_config(controller_config(&ctx))
        .run(reconcile, backoff, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                warn!(controller = CONTROLLER, error = %e, "reconcile failed");
            }
        })
        .await;
}

#[instrument(skip_all, fields(follower = %f.name_any(), ns = f.namespace().unwrap_or_default()))]
pub async fn reconcile(f: Arc<Follower>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = apply(&f, &ctx).await;
    conclude(
        &ctx,
        CONTROLLER,
        f.as_ref(),
        f.status.as_ref(),
        &result,
        started,
    )
    .await;
    result
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == ConditionType::Ready.as_str() && c.status == "True")
        })
}

async fn apply(f: &Follower, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace_of(f)?;
    let name = f.name_any();
    let now = ctx.now();
    let generation = f.metadata.generation;
    let api: Api<Follower> = Api::namespaced(ctx.client.clone(), &ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status: FollowerStatus = f.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut events = Vec::new();

    'outcome: {
        let violations = crate::rules::follower(&f.spec);
        if report_invalid(
            &mut status.conditions,
            &violations,
            generation,
            now,
            &mut events,
        ) {
            break 'outcome;
        }
        let source = match resolve_source(
            ctx,
            &ns,
            &f.spec.source,
            f.spec.instance.credentials_secret.as_deref(),
            // A follower follows the archive written now.
            None,
        )
        .await?
        {
            Ok(s) => s,
            Err(msg) if status.promoted => {
                instance::source_gone(&mut status.conditions, &msg, generation, now, &mut events);
                break 'outcome;
            }
            Err(msg) => {
                if set_condition(
                    &mut status.conditions,
                    ConditionType::Ready,
                    Status::False,
                    "SourceNotFound",
                    &msg,
                    generation,
                    now,
                ) {
                    events.push(PendingEvent::warning("SourceNotFound", "Resolve", msg));
                }
                break 'outcome;
            }
        };
        let token = ensure_token(ctx, f).await?;
        let plan = InstancePlan {
            kind: InstanceKind::Follower,
            name: &name,
            namespace: &ns,
            owner: owner_reference(f)?,
            replicas: f.spec.replicas,
            instance: &f.spec.instance,
            storage: &source.storage,
            compression_level: source.compression_level,
            credentials_secret: source.credentials_secret.as_deref(),
            target: None,
            streaming: f.spec.streaming.as_ref(),
            walden_image: &ctx.config.walden_image,
        };
        let current_sts = sts_api
            .get_opt(&name)
            .await
            .map_err(kube_err(format!("reading StatefulSet {name}")))?;
        let (svc_name, changed) =
            instance::apply(&svc_api, &sts_api, &plan, current_sts.as_ref()).await?;
        if changed {
            events.push(PendingEvent::normal(
                "Applied",
                "Apply",
                format!(
                    "StatefulSet {name} ({} replicas) and read-only Service {svc_name} applied",
                    f.spec.replicas
                ),
            ));
        }
        status.service = Some(svc_name);

        let mut replicas = Vec::new();
        let mut ready = 0;
        let mut first_endpoint = None;
        // Replicas whose daemon did not answer: reported, not just logged.
        let mut unreachable: Vec<String> = Vec::new();
        for i in 0..f.spec.replicas {
            let pod_name = format!("{name}-{i}");
            let Some(pod) = pods
                .get_opt(&pod_name)
                .await
                .map_err(kube_err(format!("reading Pod {pod_name}")))?
            else {
                continue;
            };
            if pod_ready(&pod) {
                ready += 1;
            }
            let mut replica = ReplicaStatus {
                pod: pod_name,
                role: None,
                replay_lsn: None,
                lag_seconds: None,
                lag_bytes: None,
                streaming: None,
            };
            if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
                let ep = Endpoint::for_pod_ip(&ip, &token);
                match ctx.daemon.status(&ep).await {
                    Ok(d) => {
                        replica.role = Some(match d.role {
                            Role::Primary => "primary".into(),
                            Role::Standby => "standby".into(),
                        });
                        if let Some(r) = d.replay {
                            replica.replay_lsn = Some(r.replay_lsn);
                            replica.lag_seconds = Some(r.lag_seconds);
                            replica.lag_bytes = Some(r.lag_bytes);
                            replica.streaming = r.streaming;
                        }
                        if i == 0 {
                            first_endpoint = Some((ep, d.role));
                        }
                    }
                    Err(e) => {
                        warn!(pod = %replica.pod, error = %e, "daemon status unavailable");
                        unreachable.push(format!("{}: {e}", replica.pod));
                    }
                }
            }
            replicas.push(replica);
        }
        status.replicas = replicas;
        status.ready_replicas = ready;
        let (ready_status, reason, msg) = if ready == f.spec.replicas {
            (
                Status::True,
                "AllReplicasReady",
                format!("{ready}/{} replicas ready", f.spec.replicas),
            )
        } else {
            (
                Status::False,
                "ReplicasNotReady",
                format!("{ready}/{} replicas ready", f.spec.replicas),
            )
        };
        if set_condition(
            &mut status.conditions,
            ConditionType::Ready,
            ready_status,
            reason,
            &msg,
            generation,
            now,
        ) {
            events.push(PendingEvent::normal(reason, "Observe", msg));
        }

        let (reach_status, reason, msg) = if unreachable.is_empty() {
            (
                Status::True,
                "DaemonsReachable",
                "every running replica's walden daemon answered".to_string(),
            )
        } else {
            (
                Status::False,
                "DaemonUnreachable",
                format!(
                    "no answer from the walden daemon of {}",
                    unreachable.join("; ")
                ),
            )
        };
        if set_condition(
            &mut status.conditions,
            ConditionType::DaemonsReachable,
            reach_status,
            reason,
            &msg,
            generation,
            now,
        ) {
            events.push(if unreachable.is_empty() {
                PendingEvent::normal(reason, "Observe", msg)
            } else {
                PendingEvent::warning(reason, "Observe", msg)
            });
        }

        report_streaming(
            &mut status,
            f.spec.streaming.is_some(),
            f.spec.replicas,
            generation,
            now,
            &mut events,
        );

        if f.spec.promote && !status.promoted {
            promote(ctx, f, &mut status, first_endpoint, &mut events).await;
        }
    }

    apply_status(&api, f, f.status.as_ref(), &status).await?;
    publish(ctx, f, &events).await;
    Ok(ctx.fleet.requeue(POLL))
}

/// Where the checked replicas get their WAL from (pure).
#[derive(Clone, Debug, PartialEq, Eq)]
enum StreamingVerdict {
    /// spec.streaming is unset, or no replica is a standby any more: no condition.
    NotApplicable,
    /// Every expected standby streams.
    Streaming(usize),
    /// These standbys replay from the archive only.
    ArchiveFallback(Vec<String>),
    /// These standbys are missing or did not say.
    Unknown(Vec<String>),
}

fn streaming_verdict(
    configured: bool,
    promoted: bool,
    expected: i32,
    replicas: &[ReplicaStatus],
) -> StreamingVerdict {
    if !configured || promoted {
        return StreamingVerdict::NotApplicable;
    }
    let standbys: Vec<&ReplicaStatus> = replicas
        .iter()
        .filter(|r| r.role.as_deref() != Some("primary"))
        .collect();
    let fallback: Vec<String> = standbys
        .iter()
        .filter(|r| r.streaming == Some(false))
        .map(|r| r.pod.clone())
        .collect();
    if !fallback.is_empty() {
        return StreamingVerdict::ArchiveFallback(fallback);
    }
    let mut unknown: Vec<String> = standbys
        .iter()
        .filter(|r| r.streaming.is_none())
        .map(|r| r.pod.clone())
        .collect();
    let primaries = replicas.len() - standbys.len();
    let missing = usize::try_from(expected)
        .unwrap_or(0)
        .saturating_sub(replicas.len());
    if missing > 0 {
        unknown.push(format!("{missing} replica(s) without a pod"));
    }
    if !unknown.is_empty() {
        return StreamingVerdict::Unknown(unknown);
    }
    if standbys.is_empty() && primaries > 0 {
        return StreamingVerdict::NotApplicable;
    }
    StreamingVerdict::Streaming(standbys.len())
}

/// The `Streaming` condition: spec.streaming asks for it, but a standby
/// whose connection the primary refuses (the official image's pg_hba.conf
/// has no `host replication` line) silently replays from the archive.
fn report_streaming(
    status: &mut FollowerStatus,
    configured: bool,
    expected: i32,
    generation: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let verdict = streaming_verdict(configured, status.promoted, expected, &status.replicas);
    let (s, reason, msg) = match verdict {
        StreamingVerdict::NotApplicable => {
            status.conditions.retain(|c| c.type_ != "Streaming");
            return;
        }
        StreamingVerdict::Streaming(n) => (
            Status::True,
            "Streaming",
            format!("{n} standby replica(s) stream WAL from the primary"),
        ),
        StreamingVerdict::ArchiveFallback(pods) => (
            Status::False,
            "ArchiveFallback",
            format!(
                "spec.streaming is set, but {} replay(s) from the archive only (no WAL receiver): the primary refuses or cannot be reached for replication; its pg_hba.conf needs a `host replication <user> <pod network> scram-sha-256` line and the conninfo's user the REPLICATION attribute (see operator/README.md, Streaming)",
                pods.join(", ")
            ),
        ),
        StreamingVerdict::Unknown(pods) => (
            Status::Unknown,
            "StreamingUnknown",
            format!("not known whether these stream: {}", pods.join(", ")),
        ),
    };
    let warn = s == Status::False;
    if set_condition(
        &mut status.conditions,
        ConditionType::Streaming,
        s,
        reason,
        &msg,
        generation,
        now,
    ) && reason != "StreamingUnknown"
    {
        events.push(if warn {
            PendingEvent::warning(reason, "Observe", msg)
        } else {
            PendingEvent::normal(reason, "Observe", msg)
        });
    }
}

fn mark_promoted(
    f: &Follower,
    status: &mut FollowerStatus,
    events: &mut Vec<PendingEvent>,
    now: chrono::DateTime<chrono::Utc>,
    msg: &str,
) {
    status.promoted = true;
    if set_condition(
        &mut status.conditions,
        ConditionType::Promoted,
        Status::True,
        "Promoted",
        msg,
        f.metadata.generation,
        now,
    ) {
        events.push(PendingEvent::normal("Promoted", "Promote", msg));
    }
}

/// Promotes replica 0 when allowed; otherwise a `Promoted=False` condition
/// says why.
async fn promote(
    ctx: &Context,
    f: &Follower,
    status: &mut FollowerStatus,
    first: Option<(Endpoint, Role)>,
    events: &mut Vec<PendingEvent>,
) {
    let now = ctx.now();
    let generation = f.metadata.generation;
    let mut refuse = |status: &mut FollowerStatus, reason: &str, msg: String, warn: bool| {
        if set_condition(
            &mut status.conditions,
            ConditionType::Promoted,
            Status::False,
            reason,
            &msg,
            generation,
            now,
        ) && warn
        {
            events.push(PendingEvent::warning(reason, "Promote", msg));
        }
    };
    if f.spec.replicas != 1 {
        let msg = format!(
            "spec.promote needs spec.replicas: 1 (it is {}); scale down first so that exactly one server becomes the primary",
            f.spec.replicas
        );
        refuse(status, "TooManyReplicas", msg, true);
        return;
    }
    let (ep, role) = match first {
        Some(x) => x,
        None => {
            let msg = format!("waiting for the daemon of pod {}-0 to answer", f.name_any());
            refuse(status, "WaitingForPod", msg, false);
            return;
        }
    };
    if role == Role::Primary {
        mark_promoted(
            f,
            status,
            events,
            now,
            "replica 0 already runs as a primary",
        );
        return;
    }
    match ctx.daemon.promote(&ep).await {
        Ok(Promotion::Promoted) => mark_promoted(
            f,
            status,
            events,
            now,
            "replica 0 promoted to a standalone primary",
        ),
        Ok(Promotion::NotStandby(body)) => refuse(
            status,
            "PromoteRefused",
            format!("the daemon refused to promote: {body}"),
            true,
        ),
        Err(e) => refuse(
            status,
            "PromoteFailed",
            format!("promotion request failed: {e}"),
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::testing::{
        context, pod, primary_status, standby_status, time, FakeApi, FakeDaemon,
    };
    use serde_json::{json, Value};

    const NS: &str = "db";
    const PATH: &str = "/apis/walden.dev/v1alpha1/namespaces/db/followers/r";
    const STS_PATH: &str = "/apis/apps/v1/namespaces/db/statefulsets/r";

    fn setup(replicas: i32, promote: bool) -> FakeApi {
        let api = FakeApi::default();
        api.insert(json!({
            "apiVersion": "walden.dev/v1alpha1", "kind": "Follower",
            "metadata": {"name": "r", "namespace": NS, "uid": "fol-uid", "generation": 2},
            "spec": {
                "source": {"storage": {"s3": {"bucket": "old", "prefix": "gone-db", "workloadIdentity": true}}},
                "replicas": replicas, "promote": promote,
                "streaming": {"primaryConninfoSecret": "conninfo"},
                "instance": {"image": "postgres:16", "storageSize": "1Gi", "credentialsSecret": "pg-creds"}
            }
        }));
        api
    }

    fn labels() -> Value {
        json!({"walden.dev/instance": "r", "app.kubernetes.io/component": "follower"})
    }

    fn stored(api: &FakeApi) -> Arc<Follower> {
        Arc::new(serde_json::from_value(api.get(PATH).expect("follower")).expect("parses"))
    }

    fn cond(f: &Follower, t: &str) -> (String, String, String) {
        let c = f
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
            .unwrap_or_else(|| panic!("no {t} condition"));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    fn replica(pod: &str, role: Option<&str>, streaming: Option<bool>) -> ReplicaStatus {
        ReplicaStatus {
            pod: pod.into(),
            role: role.map(str::to_string),
            replay_lsn: None,
            lag_seconds: None,
            lag_bytes: None,
            streaming,
        }
    }

    #[test]
    fn streaming_verdict_table() {
        use StreamingVerdict::*;
        let sb = Some("standby");
        let both = [
            replica("r-0", sb, Some(true)),
            replica("r-1", sb, Some(false)),
        ];
        let ok = [
            replica("r-0", sb, Some(true)),
            replica("r-1", sb, Some(true)),
        ];
        let silent = [replica("r-0", sb, Some(true)), replica("r-1", sb, None)];
        let primary = [replica("r-0", Some("primary"), Some(false))];
        let cases: Vec<(bool, bool, i32, &[ReplicaStatus], StreamingVerdict)> = vec![
            (false, false, 2, &both, NotApplicable),
            (true, true, 1, &primary, NotApplicable),
            (true, false, 2, &ok, Streaming(2)),
            (true, false, 2, &both, ArchiveFallback(vec!["r-1".into()])),
            (true, false, 2, &silent, Unknown(vec!["r-1".into()])),
            (
                true,
                false,
                3,
                &ok,
                Unknown(vec!["1 replica(s) without a pod".into()]),
            ),
            (true, false, 1, &primary, NotApplicable),
            (
                true,
                false,
                1,
                &[],
                Unknown(vec!["1 replica(s) without a pod".into()]),
            ),
        ];
        for (configured, promoted, expected, replicas, want) in cases {
            assert_eq!(
                streaming_verdict(configured, promoted, expected, replicas),
                want,
                "configured={configured} promoted={promoted} expected={expected} {replicas:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_replica_replaying_from_the_archive_is_named_in_the_streaming_condition() {
        let api = setup(2, false);
        api.insert(pod(NS, "r-0", "10.0.1.1", labels(), true));
        api.insert(pod(NS, "r-1", "10.0.1.2", labels(), true));
        let daemon = Arc::new(FakeDaemon::default());
        let set = |url: &str, streaming: bool| {
            let mut s = standby_status("0/5000060", 0.5, 0);
            if let Some(r) = s.replay.as_mut() {
                r.streaming = Some(streaming);
            }
            daemon.statuses.lock().expect("lock").insert(url.into(), s);
        };
        set("http://10.0.1.1:8008", true);
        set("http://10.0.1.2:8008", false);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");
        let f = stored(&api);
        let replicas = &f.status.as_ref().expect("status").replicas;
        assert_eq!(
            replicas
                .iter()
                .map(|r| (r.pod.as_str(), r.streaming))
                .collect::<Vec<_>>(),
            [("r-0", Some(true)), ("r-1", Some(false))]
        );
        let (s, reason, message) = cond(&f, "Streaming");
        assert_eq!((s.as_str(), reason.as_str()), ("False", "ArchiveFallback"));
        assert!(
            message.contains("r-1") && !message.contains("r-0") && message.contains("pg_hba.conf"),
            "{message}"
        );
        assert_eq!(cond(&f, "Ready").0, "True", "serving, only not streaming");
        assert!(api.event_reasons().contains(&"ArchiveFallback".to_string()));

        set("http://10.0.1.2:8008", true);
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let (s, reason, _) = cond(&stored(&api), "Streaming");
        assert_eq!((s.as_str(), reason.as_str()), ("True", "Streaming"));
    }

    #[tokio::test]
    async fn replicas_and_lag_in_status_then_no_writes() {
        let api = setup(2, false);
        api.insert(pod(NS, "r-0", "10.0.1.1", labels(), true));
        api.insert(pod(NS, "r-1", "10.0.1.2", labels(), false));
        let daemon = Arc::new(FakeDaemon::default());
        daemon.statuses.lock().expect("lock").insert(
            "http://10.0.1.1:8008".into(),
            standby_status("0/5000060", 0.5, 0),
        );
        daemon.statuses.lock().expect("lock").insert(
            "http://10.0.1.2:8008".into(),
            standby_status("0/4000000", 12.0, 16_777_216),
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");

        let sts = api.get(STS_PATH).expect("sts");
        assert_eq!(sts["spec"]["replicas"], 2);
        assert_eq!(sts["metadata"]["ownerReferences"][0]["uid"], "fol-uid");
        let svc = api
            .get("/api/v1/namespaces/db/services/r-ro")
            .expect("read-only service");
        assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], "fol-uid");
        let restore = sts["spec"]["template"]["spec"]["initContainers"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "walden-restore"))
            .cloned()
            .expect("restore");
        assert_eq!(
            restore["command"],
            json!([
                "/usr/local/bin/walden",
                "restore",
                "/var/lib/postgresql/data/pgdata",
                "--restore-command",
                "/walden/bin/walden wal-fetch %f %p",
                "--standby",
                "--primary-conninfo",
                "$(WALDEN_PRIMARY_CONNINFO)"
            ])
        );
        let env = restore["env"].as_array().expect("env");
        assert!(env.iter().any(|e| e["name"] == "WALDEN_PRIMARY_CONNINFO"
            && e["valueFrom"]["secretKeyRef"]
                == json!({"name": "conninfo", "key": "primary_conninfo", "optional": false})));
        assert!(env
            .iter()
            .any(|e| e["name"] == "WALDEN_STORAGE" && e["value"] == "s3://old/gone-db"));

        let f = stored(&api);
        let status = f.status.clone().expect("status");
        assert_eq!(status.ready_replicas, 1);
        assert_eq!(status.service.as_deref(), Some("r-ro"));
        assert_eq!(status.replicas.len(), 2);
        assert_eq!(status.replicas[1].pod, "r-1");
        assert_eq!(status.replicas[1].replay_lsn.as_deref(), Some("0/4000000"));
        assert_eq!(status.replicas[1].lag_bytes, Some(16_777_216));
        assert_eq!(status.replicas[0].lag_seconds, Some(0.5));
        assert_eq!(cond(&f, "Ready").1, "ReplicasNotReady");
        assert!(daemon
            .calls()
            .iter()
            .all(|(w, ep)| w == "status" && ep.token.len() == 64));

        api.clear_requests();
        reconcile(stored(&api), ctx)
            .await
            .expect("second reconcile");
        assert!(api.writes().is_empty(), "{:?}", api.writes());
    }

    #[tokio::test]
    async fn promote_with_several_replicas_is_refused_with_a_reason() {
        let api = setup(3, true);
        let daemon = Arc::new(FakeDaemon::default());
        let ctx = context(&api, daemon.clone(), time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let f = stored(&api);
        let (status, reason, message) = cond(&f, "Promoted");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "TooManyReplicas")
        );
        assert!(message.contains("it is 3"), "{message}");
        assert!(!f.status.as_ref().expect("status").promoted);
        assert!(api.event_reasons().contains(&"TooManyReplicas".to_string()));
        assert!(daemon.calls().iter().all(|(w, _)| w != "promote"));
    }

    #[tokio::test]
    async fn promote_with_one_replica_calls_the_daemon_once() {
        let api = setup(1, true);
        api.insert(pod(NS, "r-0", "10.0.1.1", labels(), true));
        let daemon = Arc::new(FakeDaemon::default());
        daemon.statuses.lock().expect("lock").insert(
            "http://10.0.1.1:8008".into(),
            standby_status("0/5000060", 0.0, 0),
        );
        *daemon.promotion.lock().expect("lock") = Some(Promotion::Promoted);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");
        let f = stored(&api);
        assert!(f.status.as_ref().expect("status").promoted);
        assert_eq!(cond(&f, "Promoted").0, "True");
        assert!(api.event_reasons().contains(&"Promoted".to_string()));

        // The server is now a primary; reconciling again does not promote again.
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.1.1:8008".into(), primary_status());
        api.clear_requests();
        reconcile(stored(&api), ctx).await.expect("reconcile");
        assert_eq!(
            daemon
                .calls()
                .iter()
                .filter(|(w, _)| w == "promote")
                .count(),
            1
        );
        assert_eq!(
            stored(&api).status.as_ref().expect("status").replicas[0]
                .role
                .as_deref(),
            Some("primary")
        );
    }

    #[tokio::test]
    async fn unreachable_daemon_is_a_condition_and_a_warning_event() {
        let api = setup(2, false);
        api.insert(pod(NS, "r-0", "10.0.1.1", labels(), true));
        api.insert(pod(NS, "r-1", "10.0.1.2", labels(), true));
        let daemon = Arc::new(FakeDaemon::default());
        // Only r-0's daemon answers.
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.1.1:8008".into(), standby_status("0/1", 0.0, 0));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");
        let (status, reason, message) = cond(&stored(&api), "DaemonsReachable");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "DaemonUnreachable")
        );
        assert!(
            message.contains("r-1") && !message.contains("r-0"),
            "{message}"
        );
        assert!(api
            .event_reasons()
            .contains(&"DaemonUnreachable".to_string()));

        // Once it answers, the condition recovers.
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.1.2:8008".into(), standby_status("0/1", 0.0, 0));
        reconcile(stored(&api), ctx)
            .await
            .expect("second reconcile");
        let (status, reason, _) = cond(&stored(&api), "DaemonsReachable");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("True", "DaemonsReachable")
        );
    }

    #[tokio::test]
    async fn refused_promotion_is_a_condition_and_an_event() {
        let api = setup(1, true);
        api.insert(pod(NS, "r-0", "10.0.1.1", labels(), true));
        let daemon = Arc::new(FakeDaemon::default());
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.1.1:8008".into(), standby_status("0/1", 0.0, 0));
        *daemon.promotion.lock().expect("lock") = Some(Promotion::NotStandby(
            "{\"error\":\"not in recovery\"}".into(),
        ));
        let ctx = context(&api, daemon, time("2025-05-01T12:00:00Z"));
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let (status, reason, message) = cond(&stored(&api), "Promoted");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "PromoteRefused")
        );
        assert!(message.contains("not in recovery"), "{message}");
        assert!(api.event_reasons().contains(&"PromoteRefused".to_string()));
    }
}
