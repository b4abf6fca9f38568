//! The ContinuousBackup's restore proofs (`spec.restoreTest`): on schedule a
//! proof pod is created (one name per ContinuousBackup, so never two at
//! once), followed until it ends, recorded in status, and deleted; the
//! Recoverable condition says whether the last proof is recent evidence.
//! The decisions are pure, in `crate::restore_test`.

use super::{
    created_at, kube_err, owner_reference, set_condition, ConditionType, Context, Error,
    PendingEvent, Status,
};
use crate::api::{
    ContinuousBackup, ContinuousBackupStatus, MissedBackupPolicy, RestoreTestResult,
    RestoreTestRun, RestoreTestSpec,
};
use crate::metrics::{BackupLabels, ProofLabels};
use crate::restore_test::{choose_target, observe, recoverable, Finished};
use crate::schedule::{decide, Schedule};
use crate::specs::{self, FIELD_MANAGER};
use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use kube::ResourceExt;
use std::time::Duration;
use tracing::info;

/// How often a running proof is looked at.
const POLL: Duration = Duration::from_secs(30);
const CONDITION: ConditionType = ConditionType::Recoverable;

/// Whether `pod` is a proof pod this operator made for `cb_name` (a pod of
/// that name made by anyone else is never touched).
fn is_ours(pod: &Pod, cb_name: &str) -> bool {
    let labels = pod.labels();
    labels.get(specs::COMPONENT_LABEL).map(String::as_str) == Some(specs::RESTORE_TEST_COMPONENT)
        && labels.get(specs::INSTANCE_LABEL).map(String::as_str) == Some(cb_name)
}

/// Runs the proof step of a reconcile; returns when to look again.
pub async fn step(
    ctx: &Context,
    cb: &ContinuousBackup,
    sts: &StatefulSet,
    status: &mut ContinuousBackupStatus,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) -> Result<Option<Duration>, Error> {
    let Some(spec) = &cb.spec.restore_test else {
        status.next_restore_test_time = None;
        status.conditions.retain(|c| c.type_ != CONDITION.as_str());
        // spec.restoreTest removed while a proof ran: it is cancelled.
        if status.restore_test_in_progress.take().is_some() {
            if let Some(pod) = cancel(ctx, cb).await? {
                events.push(PendingEvent::normal(
                    "RestoreTestCancelled",
                    "RestoreTest",
                    format!("spec.restoreTest was removed: restore proof {pod} cancelled, its pod deleted"),
                ));
            }
        }
        return Ok(None);
    };
    let name = cb.name_any();
    let ProofPod {
        pods,
        name: pod_name,
        live,
    } = proof_pod(ctx, cb).await?;
    let mut wait: Option<Duration> = None;
    match (status.restore_test_in_progress.clone(), live) {
        (Some(run), Some(pod)) if is_ours(&pod, &name) => {
            match observe(&pod, run.started_at, spec.deadline_seconds, now) {
                None => wait = Some(POLL),
                Some(f) => {
                    record(ctx, cb, status, &run, &f, now, events);
                    delete(&pods, &pod_name).await?;
                }
            }
        }
        (Some(run), _) => {
            let f = Finished::failed(
                "PodLost",
                format!(
                    "the proof pod {pod_name} disappeared before it reported (deleted or evicted)"
                ),
            );
            record(ctx, cb, status, &run, &f, now, events);
        }
        (None, Some(pod)) if is_ours(&pod, &name) => {
            // Created by a reconcile whose status write was lost (the
            // operator stopped in between): follow it.
            let started_at = created_at(&pod).unwrap_or(now);
            status.restore_test_in_progress = Some(RestoreTestRun {
                pod: pod_name.clone(),
                started_at,
                target_lsn: pod
                    .annotations()
                    .get(specs::RESTORE_TEST_TARGET_ANNOTATION)
                    .cloned(),
            });
            wait = Some(POLL);
        }
        (None, Some(_)) => {
            let msg = format!("a pod named {pod_name} exists that walden did not create; restore proofs wait until it is gone");
            if set_condition(
                &mut status.conditions,
                CONDITION,
                Status::Unknown,
                "PodNameTaken",
                &msg,
                cb.metadata.generation,
                now,
            ) {
                events.push(PendingEvent::warning("PodNameTaken", "RestoreTest", msg));
            }
            return Ok(Some(POLL));
        }
        (None, None) => {
            if let Some(next) = start_if_due(ctx, cb, spec, sts, status, now, events).await? {
                wait = Some((next - now).to_std().unwrap_or_default() + Duration::from_secs(1));
            }
            if status.restore_test_in_progress.is_some() {
                wait = Some(POLL);
            }
        }
    }
    let (st, reason, msg, expires) =
        recoverable(status.last_restore_test.as_ref(), spec.max_age_seconds, now);
    if set_condition(
        &mut status.conditions,
        CONDITION,
        st,
        reason,
        &msg,
        cb.metadata.generation,
        now,
    ) && st == Status::False
    {
        events.push(PendingEvent::warning(reason, "RestoreTest", msg));
    }
    if let Some(e) = expires {
        let until = (e - now).to_std().unwrap_or_default() + Duration::from_secs(1);
        wait = Some(wait.map_or(until, |w| w.min(until)));
    }
    Ok(wait)
}

/// Starts a proof when the schedule says so; returns the next slot.
async fn start_if_due(
    ctx: &Context,
    cb: &ContinuousBackup,
    spec: &RestoreTestSpec,
    sts: &StatefulSet,
    status: &mut ContinuousBackupStatus,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) -> Result<Option<DateTime<Utc>>, Error> {
    let schedule = match Schedule::parse(&spec.schedule) {
        Ok(s) => s,
        Err(e) => {
            status.next_restore_test_time = None;
            let msg = format!("spec.restoreTest.schedule: {e}");
            if set_condition(
                &mut status.conditions,
                CONDITION,
                Status::Unknown,
                "InvalidSchedule",
                &msg,
                cb.metadata.generation,
                now,
            ) {
                events.push(PendingEvent::warning("InvalidSchedule", "RestoreTest", msg));
            }
            return Ok(None);
        }
    };
    if cb.spec.suspend {
        status.next_restore_test_time = None;
        return Ok(None);
    }
    let anchor = created_at(cb).unwrap_or(now);
    let d = decide(
        &schedule,
        MissedBackupPolicy::RunOnce,
        status.last_scheduled_restore_test,
        status.last_restore_test.as_ref().map(|l| l.started_at),
        anchor,
        now,
        &super::continuous_backup::spread_for(ctx, cb),
    );
    status.next_restore_test_time = d.next;
    let Some(slot) = d.slot else {
        return Ok(d.next);
    };
    status.last_scheduled_restore_test = Some(slot);
    if status.first_recoverability_point.is_none() && status.last_backup.is_none() {
        events.push(PendingEvent::normal(
            "RestoreTestSkipped",
            "RestoreTest",
            format!("no base backup yet: the restore proof scheduled for {slot} is skipped"),
        ));
        return Ok(d.next);
    }
    let name = cb.name_any();
    let ns = cb.namespace().unwrap_or_default();
    let image = spec.image.clone().or_else(|| {
        sts.spec
            .as_ref()?
            .template
            .spec
            .as_ref()?
            .containers
            .iter()
            .find(|c| c.name == cb.spec.target.container)?
            .image
            .clone()
    });
    let Some(image) = image else {
        let msg = format!(
            "container {} of StatefulSet {} names no image; set spec.restoreTest.image",
            cb.spec.target.container, cb.spec.target.stateful_set
        );
        events.push(PendingEvent::warning(
            "RestoreTestNotStarted",
            "RestoreTest",
            msg,
        ));
        return Ok(d.next);
    };
    let random = getrandom::u64().unwrap_or_else(|_| now.timestamp_micros() as u64);
    let target = choose_target(
        spec.target,
        status.first_recoverable_lsn.as_deref(),
        status.last_recoverable_wal.as_deref(),
        random,
    );
    let pod = specs::restore_test_pod(&specs::RestoreTestPlan {
        cb_name: &name,
        namespace: &ns,
        owner: owner_reference(cb)?,
        spec,
        storage: &crate::archives::current(&cb.spec.storage, cb.status.as_ref()),
        compression_level: cb.spec.compression_level(),
        postgres_image: &image,
        walden_image: &ctx.config.walden_image,
        run_as_user: cb.spec.target.run_as_user,
        target_lsn: target.as_deref(),
    });
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pod_name = specs::restore_test_pod_name(&name);
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match pods.create(&params, &pod).await {
        // 409: another reconcile made it a moment ago; it is adopted next time.
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(kube_err(format!("creating pod {pod_name}"))(e)),
    }
    let what = target
        .as_deref()
        .map(|l| format!("WAL position {l}"))
        .unwrap_or_else(|| "the end of the archive".to_string());
    info!(pod = %pod_name, target = %what, "restore proof started");
    status.restore_test_in_progress = Some(RestoreTestRun {
        pod: pod_name.clone(),
        started_at: now,
        target_lsn: target,
    });
    events.push(PendingEvent::normal(
        "RestoreTestStarted",
        "RestoreTest",
        format!(
            "restore proof {pod_name} started for the run scheduled at {slot}: restoring to {what}"
        ),
    ));
    Ok(d.next)
}

/// Writes a finished proof into status, metrics and an Event.
fn record(
    ctx: &Context,
    cb: &ContinuousBackup,
    status: &mut ContinuousBackupStatus,
    run: &RestoreTestRun,
    f: &Finished,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let entry = f.status(run.started_at, run.target_lsn.as_deref(), now);
    let labels = BackupLabels {
        namespace: cb.namespace().unwrap_or_default(),
        name: cb.name_any(),
    };
    let ok = entry.result == RestoreTestResult::Succeeded;
    let seconds = (now - run.started_at).num_milliseconds() as f64 / 1000.0;
    ctx.metrics
        .restore_test_result
        .get_or_create(&labels)
        .set(i64::from(ok));
    ctx.metrics
        .restore_test_duration
        .get_or_create(&labels)
        .set(seconds);
    ctx.metrics
        .restore_test_runs
        .get_or_create(&ProofLabels {
            namespace: labels.namespace.clone(),
            name: labels.name.clone(),
            result: format!("{:?}", entry.result),
        })
        .inc();
    if ok {
        status.last_successful_restore_test = Some(now);
        ctx.metrics
            .restore_test_last_success
            .get_or_create(&labels)
            .set(now.timestamp());
        events.push(PendingEvent::normal(
            "RestoreTestSucceeded",
            "RestoreTest",
            format!(
                "restore proof {} succeeded in {seconds:.0}s: {}",
                run.pod, entry.message
            ),
        ));
    } else {
        let reason = if entry.result == RestoreTestResult::TimedOut {
            "RestoreTestTimedOut"
        } else {
            "RestoreTestFailed"
        };
        events.push(PendingEvent::warning(
            reason,
            "RestoreTest",
            format!(
                "restore proof {} failed ({}): {}",
                run.pod, entry.reason, entry.message
            ),
        ));
    }
    info!(pod = %run.pod, result = ?entry.result, reason = %entry.reason, "restore proof finished");
    status.restore_test_in_progress = None;
    status.last_restore_test = Some(entry);
}

async fn delete(pods: &Api<Pod>, name: &str) -> Result<(), Error> {
    match pods.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(kube_err(format!("deleting pod {name}"))(e)),
    }
}

/// The proof pod of a ContinuousBackup, as it is now.
struct ProofPod {
    pods: Api<Pod>,
    name: String,
    live: Option<Pod>,
}

async fn proof_pod(ctx: &Context, cb: &ContinuousBackup) -> Result<ProofPod, Error> {
    let ns = cb.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let name = specs::restore_test_pod_name(&cb.name_any());
    let live = pods
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("reading pod {name}")))?;
    Ok(ProofPod { pods, name, live })
}

/// Cancels a proof in flight (the ContinuousBackup is being deleted, or
/// its spec.restoreTest removed).
pub async fn cancel(ctx: &Context, cb: &ContinuousBackup) -> Result<Option<String>, Error> {
    let ProofPod {
        pods,
        name: pod_name,
        live,
    } = proof_pod(ctx, cb).await?;
    match live {
        Some(pod) if is_ours(&pod, &cb.name_any()) => {
            delete(&pods, &pod_name).await?;
            Ok(Some(pod_name))
        }
        _ => Ok(None),
    }
}
