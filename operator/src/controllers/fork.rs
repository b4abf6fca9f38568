//! Fork: a StatefulSet of one restored from the source archive to a target,
//! with phases Pending → Restoring → Recovering → Ready (or Failed). A target
//! that cannot be reached is refused before anything is created.

use super::instance::{self, source_gone};
use super::{
    apply_status, backoff, conclude, controller_config, ensure_token, kube_err, namespace_of,
    owner_reference, publish, report_invalid, resolve_source, set_condition, ConditionType,
    Context, Error, PendingEvent, Status,
};
use crate::api::{Fork, ForkPhase, RecoveryTarget};
use crate::daemon_client::{DaemonStatus, Endpoint, Role};
use crate::specs::{self, InstanceKind, InstancePlan};
use chrono::{DateTime, Utc};
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

const CONTROLLER: &str = "fork";
const POLL: Duration = Duration::from_secs(15);
const SETTLED: Duration = Duration::from_secs(300);

pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let forks: Api<Fork> = Api::all(ctx.client.clone());
    let owned = watcher::Config::default().labels(&format!("{}=fork", specs::COMPONENT_LABEL));
    Controller::new(forks, watcher::Config::default())
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

/// Why a recovery target cannot be reached, known before restoring.
#[derive(Debug, PartialEq, Eq)]
pub struct TargetProblem {
    pub reason: &'static str,
    pub message: String,
}

/// Checks a target against what is known of the archive.
pub fn check_target(
    target: Option<&RecoveryTarget>,
    first_recoverability_point: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(), TargetProblem> {
    let Some(time) = target.and_then(|t| t.time) else {
        return Ok(());
    };
    if time > now {
        return Err(TargetProblem {
            reason: "TargetInFuture",
            message: format!(
                "target time {} is in the future (now {})",
                time.to_rfc3339(),
                now.to_rfc3339()
            ),
        });
    }
    if let Some(first) = first_recoverability_point {
        if time < first {
            return Err(TargetProblem {
                reason: "TargetBeforeRecoveryWindow",
                message: format!(
                    "target time {} is before the first recoverable point {} of the archive",
                    time.to_rfc3339(),
                    first.to_rfc3339()
                ),
            });
        }
    }
    Ok(())
}

/// The line of a postgres log or termination message saying the target
/// cannot be reached: PostgreSQL ended recovery early, or `wal-fetch`
/// stopped at a hole in the archive (it names the hole).
pub fn target_unreachable(text: &str) -> Option<String> {
    text.lines()
        .find(|l| {
            let lower = l.to_ascii_lowercase();
            lower.contains("recovery ended before configured recovery target was reached")
                || (lower.contains("wal-fetch")
                    && lower
                        .split(|c: char| !c.is_ascii_alphanumeric())
                        .any(|w| w == "hole"))
        })
        .map(|l| l.trim().to_string())
}

/// The backup a finished `walden restore` names in its termination message.
pub fn restored_backup(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .filter(|c| c.name == specs::RESTORE_CONTAINER)
        .flat_map(|c| {
            [c.state.as_ref(), c.last_state.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated.as_ref())
                .filter(|t| t.exit_code == 0)
                .filter_map(|t| t.message.clone())
        })
        .find_map(|m| {
            let rest = m.split("restored backup ").nth(1)?;
            rest.split_whitespace().next().map(str::to_string)
        })
}

/// Phase of a fork from its pod and daemon, with a reason and message.
pub fn observe_phase(
    pod: Option<&Pod>,
    daemon: Option<&DaemonStatus>,
) -> (ForkPhase, &'static str, String) {
    let Some(pod) = pod else {
        return (
            ForkPhase::Pending,
            "PodNotCreated",
            "waiting for the pod to be created".into(),
        );
    };
    let name = pod.name_any();
    let status = pod.status.clone().unwrap_or_default();
    for c in status.init_container_statuses.iter().flatten() {
        if c.name != specs::RESTORE_CONTAINER {
            continue;
        }
        let state = c.state.clone().unwrap_or_default();
        let last = c.last_state.clone().unwrap_or_default();
        let failed = state
            .terminated
            .as_ref()
            .or(last.terminated.as_ref())
            .filter(|t| t.exit_code != 0);
        if let Some(t) = failed {
            if state.running.is_none() {
                let msg = t
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code));
                return (
                    ForkPhase::Failed,
                    "RestoreFailed",
                    format!("walden restore failed in pod {name}: {}", msg.trim()),
                );
            }
        }
        if state.running.is_some() {
            return (
                ForkPhase::Restoring,
                "Restoring",
                format!("walden restore is running in pod {name}"),
            );
        }
        if state.terminated.is_none() {
            return (
                ForkPhase::Pending,
                "PodStarting",
                format!("pod {name} is starting"),
            );
        }
    }
    for c in status
        .container_statuses
        .iter()
        .flatten()
        .filter(|c| c.name == specs::POSTGRES_CONTAINER)
    {
        let messages = [c.state.as_ref(), c.last_state.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| s.terminated.as_ref())
            .filter_map(|t| t.message.as_deref());
        for m in messages {
            if let Some(line) = target_unreachable(m) {
                return (
                    ForkPhase::Failed,
                    "TargetUnreachable",
                    format!("PostgreSQL in pod {name} cannot reach the recovery target: {line}"),
                );
            }
        }
    }
    let pod_ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == ConditionType::Ready.as_str() && c.status == "True");
    match daemon {
        Some(d) if d.role == Role::Primary && pod_ready => (
            ForkPhase::Ready,
            "RecoveryComplete",
            "recovery finished; the fork accepts connections".into(),
        ),
        Some(d) => (
            ForkPhase::Recovering,
            "Recovering",
            match &d.replay {
                Some(r) => format!("replaying WAL, at {}", r.replay_lsn),
                None => "replaying WAL".into(),
            },
        ),
        None if status.phase.as_deref() == Some("Running") => (
            ForkPhase::Recovering,
            "Recovering",
            format!("pod {name} is running; waiting for its daemon"),
        ),
        None => (
            ForkPhase::Pending,
            "PodStarting",
            format!("pod {name} is starting"),
        ),
    }
}

#[instrument(skip_all, fields(fork = %fork.name_any(), ns = fork.namespace().unwrap_or_default()))]
pub async fn reconcile(fork: Arc<Fork>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = apply(&fork, &ctx).await;
    conclude(
        &ctx,
        CONTROLLER,
        fork.as_ref(),
        fork.status.as_ref(),
        &result,
        started,
    )
    .await;
    result
}

async fn apply(fork: &Fork, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace_of(fork)?;
    let name = fork.name_any();
    let now = ctx.now();
    let generation = fork.metadata.generation;
    let api: Api<Fork> = Api::namespaced(ctx.client.clone(), &ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let svc_api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = fork.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let old_phase = fork.status.as_ref().map(|s| s.phase);
    let mut events = Vec::new();

    let action = 'outcome: {
        let violations = crate::rules::fork(&fork.spec);
        if report_invalid(
            &mut status.conditions,
            &violations,
            generation,
            now,
            &mut events,
        ) {
            status.phase = ForkPhase::Failed;
            break 'outcome Action::await_change();
        }
        let source = match resolve_source(
            ctx,
            &ns,
            &fork.spec.source,
            fork.spec.instance.credentials_secret.as_deref(),
            crate::archives::target_time(fork.spec.target.as_ref()),
        )
        .await?
        {
            Ok(s) => s,
            // A fork that finished recovery is a database of its own: it
            // no longer needs its source (its objects are left as they are).
            Err(msg) if old_phase == Some(ForkPhase::Ready) => {
                source_gone(&mut status.conditions, &msg, generation, now, &mut events);
                break 'outcome ctx.fleet.requeue(SETTLED);
            }
            Err(msg) => {
                status.phase = ForkPhase::Pending;
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
                break 'outcome ctx.fleet.requeue(POLL);
            }
        };
        let existing = sts_api
            .get_opt(&name)
            .await
            .map_err(kube_err(format!("reading StatefulSet {name}")))?;
        // A restore already under way is not second-guessed by a clock check.
        if existing.is_none() {
            if let Err(p) = check_target(
                fork.spec.target.as_ref(),
                source.first_recoverability_point,
                now,
            ) {
                status.phase = ForkPhase::Failed;
                if set_condition(
                    &mut status.conditions,
                    ConditionType::Ready,
                    Status::False,
                    p.reason,
                    &p.message,
                    generation,
                    now,
                ) {
                    events.push(PendingEvent::warning(
                        p.reason,
                        "Validate",
                        format!("{}; nothing was created", p.message),
                    ));
                }
                break 'outcome Action::await_change();
            }
        }

        let token = ensure_token(ctx, fork).await?;
        let plan = InstancePlan {
            kind: InstanceKind::Fork,
            name: &name,
            namespace: &ns,
            owner: owner_reference(fork)?,
            replicas: 1,
            instance: &fork.spec.instance,
            storage: &source.storage,
            compression_level: source.compression_level,
            credentials_secret: source.credentials_secret.as_deref(),
            target: fork.spec.target.as_ref(),
            streaming: None,
            walden_image: &ctx.config.walden_image,
        };
        let (svc_name, created) =
            instance::apply(&svc_api, &sts_api, &plan, existing.as_ref()).await?;
        if created {
            events.push(PendingEvent::normal(
                "Applied",
                "Apply",
                format!(
                    "StatefulSet {name} and Service {svc_name} applied; restoring from {}",
                    specs::storage_url(&source.storage)
                ),
            ));
        }
        status.service = Some(svc_name);
        // What was restored never changes once known (the source's newer
        // backups are no answer: they may postdate the target).
        if status.restored_from_backup.is_none() {
            status.restored_from_backup =
                fork.spec.target.as_ref().and_then(|t| t.backup_id.clone());
        }

        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let pod_name = format!("{name}-0");
        let pod = pods
            .get_opt(&pod_name)
            .await
            .map_err(kube_err(format!("reading Pod {pod_name}")))?;
        let daemon = match pod
            .as_ref()
            .and_then(|p| p.status.as_ref())
            .and_then(|s| s.pod_ip.clone())
        {
            Some(ip) => match ctx.daemon.status(&Endpoint::for_pod_ip(&ip, &token)).await {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!(pod = %pod_name, error = %e, "daemon status unavailable");
                    None
                }
            },
            None => None,
        };
        if status.restored_from_backup.is_none() {
            status.restored_from_backup = pod.as_ref().and_then(restored_backup);
        }
        if let Some(d) = &daemon {
            if let Some(r) = &d.replay {
                status.recovered_to_lsn = Some(r.replay_lsn.clone());
            }
            if let Some(r) = &d.recovered_to {
                status.recovered_to_lsn = Some(r.lsn.clone());
                if r.time.is_some() {
                    status.recovered_to_time = r.time;
                }
            }
        }
        let (phase, reason, message) = observe_phase(pod.as_ref(), daemon.as_ref());
        status.phase = phase;
        if phase == ForkPhase::Ready && status.recovered_to_time.is_none() {
            // Without a replayed commit, a time target is the best statement.
            status.recovered_to_time = fork.spec.target.as_ref().and_then(|t| t.time);
        }
        let ready = if phase == ForkPhase::Ready {
            Status::True
        } else {
            Status::False
        };
        set_condition(
            &mut status.conditions,
            ConditionType::Ready,
            ready,
            reason,
            &message,
            generation,
            now,
        );
        if old_phase != Some(phase) {
            events.push(if phase == ForkPhase::Failed {
                PendingEvent::warning(reason, "Observe", message)
            } else {
                PendingEvent::normal(reason, "Observe", format!("phase {phase:?}: {message}"))
            });
        }
        if phase == ForkPhase::Ready {
            ctx.fleet.requeue(SETTLED)
        } else {
            ctx.fleet.requeue(POLL)
        }
    };

    apply_status(&api, fork, fork.status.as_ref(), &status).await?;
    publish(ctx, fork, &events).await;
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::testing::{context, standby_status, time, FakeApi, FakeDaemon};
    use serde_json::{json, Value};

    const NS: &str = "db";
    const FORK_PATH: &str = "/apis/walden.dev/v1alpha1/namespaces/db/forks/f";
    const STS_PATH: &str = "/apis/apps/v1/namespaces/db/statefulsets/f";
    const SVC_PATH: &str = "/api/v1/namespaces/db/services/f";
    const NOW: &str = "2025-05-01T12:00:00Z";

    fn source_cb(first_point: Option<&str>) -> Value {
        json!({
            "apiVersion": "walden.dev/v1alpha1", "kind": "ContinuousBackup",
            "metadata": {"name": "pg-backup", "namespace": NS, "uid": "cb-uid"},
            "spec": {
                "target": {"statefulSet": "pg", "credentialsSecret": "pg-creds"},
                "storage": {"s3": {"bucket": "backups", "prefix": "pg", "credentials": {"secret": "s3"}}},
                "compression": {"level": 9}
            },
            "status": {"firstRecoverabilityPoint": first_point}
        })
    }

    fn fork(target: Value) -> Value {
        json!({
            "apiVersion": "walden.dev/v1alpha1", "kind": "Fork",
            "metadata": {"name": "f", "namespace": NS, "uid": "fork-uid", "generation": 1},
            "spec": {
                "source": {"continuousBackup": "pg-backup"},
                "target": target,
                "instance": {"image": "postgres:16", "storageSize": "1Gi"}
            }
        })
    }

    fn stored(api: &FakeApi) -> Arc<Fork> {
        Arc::new(serde_json::from_value(api.get(FORK_PATH).expect("fork")).expect("fork parses"))
    }

    fn ready(f: &Fork) -> (String, String, String) {
        let c = f
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .expect("Ready condition");
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn target_checks_table() {
        let now = time(NOW);
        let at = |s: &str| RecoveryTarget {
            time: Some(time(s)),
            ..Default::default()
        };
        let first = Some(time("2025-05-01T03:00:00Z"));
        let cases = [
            ("no target", None, first, None),
            (
                "lsn target is not checked here",
                Some(RecoveryTarget {
                    lsn: Some("0/1".into()),
                    ..Default::default()
                }),
                first,
                None,
            ),
            (
                "inside the window",
                Some(at("2025-05-01T04:00:00Z")),
                first,
                None,
            ),
            (
                "window unknown",
                Some(at("2020-01-01T00:00:00Z")),
                None,
                None,
            ),
            (
                "before the window",
                Some(at("2025-05-01T02:59:59Z")),
                first,
                Some("TargetBeforeRecoveryWindow"),
            ),
            (
                "in the future",
                Some(at("2025-05-01T12:00:01Z")),
                first,
                Some("TargetInFuture"),
            ),
        ];
        for (name, target, first, want) in cases {
            let got = check_target(target.as_ref(), first, now)
                .err()
                .map(|p| p.reason);
            assert_eq!(got, want, "{name}");
        }
    }

    fn pod(init: Value, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "f-0"},
            "status": {"phase": phase, "podIP": "10.0.0.9", "initContainerStatuses": init,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .expect("pod")
    }

    #[test]
    fn target_unreachable_table() {
        let cases = [
            (
                "2025-05-01 10:00:00 UTC [1] FATAL:  recovery ended before configured recovery target was reached\n",
                true,
            ),
            (
                "walden wal-fetch 000000010000000000000009: archive hole: 000000010000000000000008 is missing but later segments exist",
                true,
            ),
            ("LOG:  restored log file \"000000010000000000000007\" from archive", false),
            ("wal-fetch: the whole archive was read", false),
            ("a hole in the schedule", false),
        ];
        for (text, want) in cases {
            assert_eq!(target_unreachable(text).is_some(), want, "{text}");
        }
    }

    /// Issue 14.5: PostgreSQL crash-looping on an unreachable target makes
    /// the fork Failed TargetUnreachable, not Recovering forever.
    #[test]
    fn an_unreachable_target_fails_the_fork() {
        let install_done = json!({"name": "walden-install", "ready": true, "restartCount": 0, "image": "w", "imageID": "", "state": {"terminated": {"exitCode": 0}}});
        let restore_done = json!({"name": "walden-restore", "ready": true, "restartCount": 0, "image": "w", "imageID": "",
            "state": {"terminated": {"exitCode": 0, "message": "restored backup 20250501T030000Z to time 2025-05-01T10:00:00+00:00"}}});
        let mut p = pod(json!([install_done, restore_done]), "Running", false);
        let postgres: k8s_openapi::api::core::v1::ContainerStatus = serde_json::from_value(json!({
            "name": "postgres", "ready": false, "restartCount": 4, "image": "postgres:16", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "LOG:  redo done at 0/7000060\nFATAL:  recovery ended before configured recovery target was reached\n"}}
        }))
        .expect("container status");
        if let Some(st) = p.status.as_mut() {
            st.container_statuses = Some(vec![postgres]);
        }
        let (phase, reason, message) = observe_phase(Some(&p), None);
        assert_eq!(
            (phase, reason),
            (ForkPhase::Failed, "TargetUnreachable"),
            "{message}"
        );
        assert!(message.contains("recovery ended before"), "{message}");
        assert_eq!(restored_backup(&p).as_deref(), Some("20250501T030000Z"));
    }

    /// Issue 14.6: restoredFromBackup comes from the restore itself and is
    /// never replaced by the source's newest backup; once Ready the fork no
    /// longer needs its source.
    #[tokio::test]
    async fn status_keeps_what_was_restored_and_survives_the_source() {
        let api = FakeApi::default();
        api.insert(source_cb(None));
        api.insert(fork(json!({"time": "2025-05-01T10:00:00Z"})));
        api.insert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "f-0", "namespace": NS},
            "status": {"phase": "Running", "podIP": "10.0.0.9",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "initContainerStatuses": [{"name": "walden-restore", "ready": true, "restartCount": 0, "image": "w", "imageID": "",
                           "state": {"terminated": {"exitCode": 0, "message": "restored backup 20250501T030000Z to time 2025-05-01T10:00:00+00:00"}}}]}
        }));
        let daemon = Arc::new(FakeDaemon::default());
        let mut promoted = crate::controllers::testing::primary_status();
        // The source's newest backup, taken after the fork's target.
        if let Some(b) = promoted.last_backup.as_mut() {
            b.id = "20250501T120000Z".into();
        }
        promoted.recovered_to = Some(crate::daemon_client::RecoveredTo {
            lsn: "0/7000028".into(),
            time: Some(time("2025-05-01T09:59:58Z")),
        });
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.0.9:8008".into(), promoted);
        let ctx = context(&api, daemon, time(NOW));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");
        let status = stored(&api).status.clone().expect("status");
        assert_eq!(status.phase, ForkPhase::Ready);
        assert_eq!(
            status.restored_from_backup.as_deref(),
            Some("20250501T030000Z")
        );
        assert_eq!(status.recovered_to_lsn.as_deref(), Some("0/7000028"));
        assert_eq!(status.recovered_to_time, Some(time("2025-05-01T09:59:58Z")));

        // The source ContinuousBackup is deleted.
        let mut none = api.get(FORK_PATH).expect("fork");
        none["spec"]["source"]["continuousBackup"] = json!("deleted");
        api.insert(none);
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let f = stored(&api);
        assert_eq!(ready(&f).0, "True", "{:?}", f.status);
        assert_eq!(f.status.as_ref().map(|s| s.phase), Some(ForkPhase::Ready));
        assert_eq!(
            f.status
                .as_ref()
                .and_then(|s| s.restored_from_backup.as_deref()),
            Some("20250501T030000Z")
        );
        let gone = f
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "SourceAvailable"))
            .expect("SourceAvailable");
        assert_eq!(
            (gone.status.as_str(), gone.reason.as_str()),
            ("False", "SourceGone")
        );
    }

    #[test]
    fn phases_table() {
        let install_done = json!({"name": "walden-install", "ready": true, "restartCount": 0, "image": "w", "imageID": "", "state": {"terminated": {"exitCode": 0}}});
        let restore = |state: Value, last: Value| json!({"name": "walden-restore", "ready": false, "restartCount": 1, "image": "w", "imageID": "", "state": state, "lastState": last});
        let primary = crate::controllers::testing::primary_status();
        let standby = standby_status("0/5000000", 3.0, 100);
        let cases = [
            ("no pod", None, None, ForkPhase::Pending, "PodNotCreated"),
            (
                "restore waiting",
                Some(pod(
                    json!([install_done, restore(json!({"waiting": {}}), json!({}))]),
                    "Pending",
                    false,
                )),
                None,
                ForkPhase::Pending,
                "PodStarting",
            ),
            (
                "restore running",
                Some(pod(
                    json!([install_done, restore(json!({"running": {}}), json!({}))]),
                    "Pending",
                    false,
                )),
                None,
                ForkPhase::Restoring,
                "Restoring",
            ),
            (
                "restore failed (crash-looping)",
                Some(pod(
                    json!([
                        install_done,
                        restore(
                            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                            json!({"terminated": {"exitCode": 2, "message": "backup 2024 not found\n"}})
                        )
                    ]),
                    "Pending",
                    false,
                )),
                None,
                ForkPhase::Failed,
                "RestoreFailed",
            ),
            (
                "replaying",
                Some(pod(
                    json!([
                        install_done,
                        restore(json!({"terminated": {"exitCode": 0}}), json!({}))
                    ]),
                    "Running",
                    false,
                )),
                Some(&standby),
                ForkPhase::Recovering,
                "Recovering",
            ),
            (
                "running, daemon silent",
                Some(pod(json!([]), "Running", false)),
                None,
                ForkPhase::Recovering,
                "Recovering",
            ),
            (
                "promoted and ready",
                Some(pod(json!([]), "Running", true)),
                Some(&primary),
                ForkPhase::Ready,
                "RecoveryComplete",
            ),
            (
                "primary but not ready yet",
                Some(pod(json!([]), "Running", false)),
                Some(&primary),
                ForkPhase::Recovering,
                "Recovering",
            ),
        ];
        for (name, p, d, phase, reason) in cases {
            let (got_phase, got_reason, message) = observe_phase(p.as_ref(), d);
            assert_eq!(
                (got_phase, got_reason),
                (phase, reason),
                "{name}: {message}"
            );
            if phase == ForkPhase::Failed {
                assert!(
                    message.contains("backup 2024 not found"),
                    "{name}: {message}"
                );
            }
        }
    }

    #[tokio::test]
    async fn creates_owned_objects_then_writes_nothing_more() {
        let api = FakeApi::default();
        api.insert(source_cb(Some("2025-05-01T03:00:00Z")));
        api.insert(fork(json!({"time": "2025-05-01T10:00:00Z"})));
        let ctx = context(&api, Arc::new(FakeDaemon::default()), time(NOW));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");

        let sts = api.get(STS_PATH).expect("statefulset");
        let svc = api.get(SVC_PATH).expect("service");
        let secret = api
            .get("/api/v1/namespaces/db/secrets/f-walden-token")
            .expect("token");
        for o in [&sts, &svc, &secret] {
            assert_eq!(
                o["metadata"]["ownerReferences"][0]["uid"], "fork-uid",
                "{}",
                o["kind"]
            );
            assert_eq!(o["metadata"]["ownerReferences"][0]["controller"], true);
        }
        let init = &sts["spec"]["template"]["spec"]["initContainers"];
        let restore = init
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "walden-restore"))
            .expect("restore");
        assert_eq!(
            restore["command"],
            json!([
                "/usr/local/bin/walden",
                "restore",
                "/var/lib/postgresql/data/pgdata",
                "--restore-command",
                "/walden/bin/walden wal-fetch %f %p",
                "--target-time",
                "2025-05-01T10:00:00Z"
            ])
        );
        assert_eq!(sts["spec"]["replicas"], 1);
        let f = stored(&api);
        let status = f.status.clone().expect("status");
        assert_eq!(status.phase, ForkPhase::Pending);
        assert_eq!(status.service.as_deref(), Some("f"));
        assert_eq!(ready(&f).1, "PodNotCreated");
        assert!(api.event_reasons().contains(&"Applied".to_string()));

        api.clear_requests();
        reconcile(stored(&api), ctx)
            .await
            .expect("second reconcile");
        assert!(api.writes().is_empty(), "{:?}", api.writes());
    }

    #[tokio::test]
    async fn bad_targets_fail_before_anything_is_created() {
        let cases = [
            (
                "future",
                json!({"time": "2030-01-01T00:00:00Z"}),
                "TargetInFuture",
            ),
            (
                "before window",
                json!({"time": "2025-05-01T01:00:00Z"}),
                "TargetBeforeRecoveryWindow",
            ),
        ];
        for (name, target, reason) in cases {
            let api = FakeApi::default();
            api.insert(source_cb(Some("2025-05-01T03:00:00Z")));
            api.insert(fork(target));
            let ctx = context(&api, Arc::new(FakeDaemon::default()), time(NOW));
            let action = reconcile(stored(&api), ctx).await.expect("reconcile");
            assert_eq!(action, Action::await_change(), "{name}");
            let f = stored(&api);
            assert_eq!(
                f.status.as_ref().map(|s| s.phase),
                Some(ForkPhase::Failed),
                "{name}"
            );
            let (status, got_reason, message) = ready(&f);
            assert_eq!(
                (status.as_str(), got_reason.as_str()),
                ("False", reason),
                "{name}: {message}"
            );
            assert!(
                api.get(STS_PATH).is_none() && api.get(SVC_PATH).is_none(),
                "{name}: nothing created"
            );
            assert!(
                api.get("/api/v1/namespaces/db/secrets/f-walden-token")
                    .is_none(),
                "{name}"
            );
            assert_eq!(api.event_reasons(), vec![reason.to_string()], "{name}");
        }
    }

    /// On a cluster with the legacy CRDs (no CEL) a spec breaking a CEL
    /// rule reaches the operator; it refuses it the same way.
    #[tokio::test]
    async fn rule_violations_are_refused_before_anything_is_created() {
        let api = FakeApi::default();
        api.insert(source_cb(Some("2025-05-01T03:00:00Z")));
        api.insert(fork(
            json!({"time": "2025-05-01T10:00:00Z", "lsn": "0/3000060"}),
        ));
        let ctx = context(&api, Arc::new(FakeDaemon::default()), time(NOW));
        let action = reconcile(stored(&api), ctx).await.expect("reconcile");
        assert_eq!(action, Action::await_change());
        let f = stored(&api);
        assert_eq!(f.status.as_ref().map(|s| s.phase), Some(ForkPhase::Failed));
        let (status, reason, message) = ready(&f);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
        assert!(
            message.contains("spec.target: set at most one recovery target"),
            "{message}"
        );
        assert!(api.get(STS_PATH).is_none() && api.get(SVC_PATH).is_none());
        assert!(api
            .get("/api/v1/namespaces/db/secrets/f-walden-token")
            .is_none());
        assert_eq!(api.event_reasons(), vec!["Invalid".to_string()]);
    }

    #[tokio::test]
    async fn missing_source_waits_with_a_reason() {
        let api = FakeApi::default();
        api.insert(fork(json!(null)));
        let ctx = context(&api, Arc::new(FakeDaemon::default()), time(NOW));
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let f = stored(&api);
        assert_eq!(f.status.as_ref().map(|s| s.phase), Some(ForkPhase::Pending));
        let (_, reason, message) = ready(&f);
        assert_eq!(reason, "SourceNotFound");
        assert!(message.contains("pg-backup"), "{message}");
        assert!(api.get(STS_PATH).is_none());
        assert_eq!(api.event_reasons(), vec!["SourceNotFound".to_string()]);
    }

    #[tokio::test]
    async fn recovery_complete_makes_the_fork_ready() {
        let api = FakeApi::default();
        api.insert(source_cb(None));
        api.insert(fork(json!({"time": "2025-05-01T10:00:00Z"})));
        api.insert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "f-0", "namespace": NS},
            "status": {"phase": "Running", "podIP": "10.0.0.9",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        let daemon = Arc::new(FakeDaemon::default());
        let mut promoted = crate::controllers::testing::primary_status();
        promoted.replay = Some(crate::daemon_client::Replay {
            replay_lsn: "0/7000028".into(),
            lag_seconds: 0.0,
            lag_bytes: 0,
            streaming: None,
        });
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert("http://10.0.0.9:8008".into(), promoted);
        let ctx = context(&api, daemon, time(NOW));
        let action = reconcile(stored(&api), ctx).await.expect("reconcile");
        assert_eq!(action, Action::requeue(SETTLED));
        let f = stored(&api);
        let status = f.status.clone().expect("status");
        assert_eq!(status.phase, ForkPhase::Ready);
        assert_eq!(status.recovered_to_lsn.as_deref(), Some("0/7000028"));
        assert_eq!(status.recovered_to_time, Some(time("2025-05-01T10:00:00Z")));
        assert_eq!(ready(&f).0, "True");
        assert!(
            api.event_reasons()
                .contains(&"RecoveryComplete".to_string()),
            "{:?}",
            api.event_reasons()
        );
    }

    #[tokio::test]
    async fn failed_restore_shows_in_phase_condition_and_event() {
        let api = FakeApi::default();
        api.insert(source_cb(None));
        api.insert(fork(json!({"backupId": "20240101T000000Z"})));
        let ctx = context(&api, Arc::new(FakeDaemon::default()), time(NOW));
        reconcile(stored(&api), ctx.clone())
            .await
            .expect("reconcile");
        api.insert(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "f-0", "namespace": NS},
            "status": {"phase": "Pending", "initContainerStatuses": [
                {"name": "walden-restore", "ready": false, "restartCount": 2, "image": "w", "imageID": "",
                 "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                 "lastState": {"terminated": {"exitCode": 1, "message": "unknown backup 20240101T000000Z"}}}
            ]}
        }));
        api.clear_requests();
        reconcile(stored(&api), ctx).await.expect("reconcile");
        let f = stored(&api);
        assert_eq!(f.status.as_ref().map(|s| s.phase), Some(ForkPhase::Failed));
        let (_, reason, message) = ready(&f);
        assert_eq!(reason, "RestoreFailed");
        assert!(
            message.contains("unknown backup 20240101T000000Z"),
            "{message}"
        );
        assert_eq!(api.event_reasons(), vec!["RestoreFailed".to_string()]);
        assert_eq!(
            f.status
                .as_ref()
                .and_then(|s| s.restored_from_backup.clone())
                .as_deref(),
            Some("20240101T000000Z")
        );
    }
}
