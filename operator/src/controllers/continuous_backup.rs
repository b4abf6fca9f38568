//! ContinuousBackup: injects archiving into the target StatefulSet, schedules
//! base backups through the primary's daemon, and mirrors the daemon's view of
//! the archive into status. Deletion removes the injection and never deletes
//! a backup: the operator has no storage credentials at all.

use super::{
    apply_if_changed, apply_status, backoff, conclude, controller_config, created_at, ensure_token,
    kube_err, namespace_of, publish, report_invalid, set_condition, ApplyDecision, ConditionType,
    Context, Desired, Error, PendingEvent, Status,
};
use crate::api::{
    ArchiveRecord, BackupInfo, ContinuousBackup, ContinuousBackupStatus, SidecarUpdatePolicy,
    CONTINUOUS_BACKUP_FINALIZER,
};
use crate::archives::{self, OnMismatch};
use crate::daemon_client::{ApiToken, BackupState, DaemonStatus, Endpoint, Role, StartBackup};
use crate::schedule::{decide, spread_key, Schedule, Spread};
use crate::specs::{self, FIELD_MANAGER};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::ResourceExt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, instrument, warn};

const CONTROLLER: &str = "continuousbackup";
/// How often status is refreshed from the daemon when nothing is due sooner.
const REFRESH: Duration = Duration::from_secs(60);
const RETRY: Duration = Duration::from_secs(30);
/// Longest daemon error quoted in a condition message, in bytes.
const MAX_ERROR: usize = 300;

pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<ContinuousBackup> = Api::all(ctx.client.clone());
    let controller = Controller::new(api, watcher::Config::default());
    // A change of a target StatefulSet (created, its pods becoming ready)
    // wakes the ContinuousBackups waiting for it: they need not poll. Only
    // metadata is watched, so memory stays small with many StatefulSets.
    let protecting = controller.store();
    controller
        .watches(
            Api::<PartialObjectMeta<StatefulSet>>::all(ctx.client.clone()),
            watcher::Config::default(),
            move |sts| {
                let (ns, name) = (sts.namespace(), sts.name_any());
                protecting
                    .state_filter(|cb| cb.namespace() == ns && cb.spec.target.stateful_set == name)
                    .iter()
                    .map(|cb| ObjectRef::from_obj(cb.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
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

/// Reconciles one ContinuousBackup (finalizer first, then apply or cleanup).
#[instrument(skip_all, fields(cb = %cb.name_any(), ns = cb.namespace().unwrap_or_default()))]
pub async fn reconcile(cb: Arc<ContinuousBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let ns = namespace_of(cb.as_ref())?;
    let api: Api<ContinuousBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let result = finalizer(
        &api,
        CONTINUOUS_BACKUP_FINALIZER,
        cb.clone(),
        |event| async {
            match event {
                Finalizer::Apply(cb) => apply(cb, &ctx).await,
                Finalizer::Cleanup(cb) => cleanup(cb, &ctx).await,
            }
        },
    )
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    conclude(
        &ctx,
        CONTROLLER,
        cb.as_ref(),
        cb.status.as_ref(),
        &result,
        started,
    )
    .await;
    result
}

/// How long to wait before looking again at a resource that waits for its
/// StatefulSet or primary: longer the longer it has waited, since a change
/// of the StatefulSet (its pods becoming ready) wakes it anyway.
fn waiting(status: &ContinuousBackupStatus, now: DateTime<Utc>) -> Duration {
    let since = status
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Ready.as_str() && c.status == "False")
        .and_then(|c| DateTime::<Utc>::from_timestamp(c.last_transition_time.0.as_second(), 0))
        .unwrap_or(now);
    crate::fleet::wait_interval(now - since)
}

/// The outcome of asking the StatefulSet's pods who is primary.
struct Primary {
    pod: String,
    endpoint: Endpoint,
    status: DaemonStatus,
}

async fn find_primary(
    ctx: &Context,
    ns: &str,
    sts: &StatefulSet,
    token: &ApiToken,
) -> Result<Result<Primary, String>, Error> {
    let selector = sts
        .spec
        .as_ref()
        .and_then(|s| s.selector.match_labels.as_ref())
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    if selector.is_empty() {
        return Ok(Err("the StatefulSet has no matchLabels selector".into()));
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let list = pods
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err(format!("listing pods {selector}")))?;
    let mut problems = Vec::new();
    for pod in list.items {
        let name = pod.name_any();
        let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            problems.push(format!("{name}: no IP yet"));
            continue;
        };
        let endpoint = Endpoint::for_pod_ip(&ip, token);
        match ctx.daemon.status(&endpoint).await {
            Ok(status) if status.role == Role::Primary => {
                return Ok(Ok(Primary {
                    pod: name,
                    endpoint,
                    status,
                }))
            }
            Ok(_) => problems.push(format!("{name}: standby")),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    if problems.is_empty() {
        problems.push("no pods".into());
    }
    Ok(Err(problems.join("; ")))
}

/// Ensures protection and refreshes status.
async fn apply(cb: Arc<ContinuousBackup>, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace_of(cb.as_ref())?;
    let name = cb.name_any();
    let now = ctx.now();
    let generation = cb.metadata.generation;
    let mut status = cb.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let mut events = Vec::new();
    let api: Api<ContinuousBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let target = &cb.spec.target.stateful_set;

    let action = 'outcome: {
        let violations = crate::rules::continuous_backup(&cb.spec);
        if report_invalid(
            &mut status.conditions,
            &violations,
            generation,
            now,
            &mut events,
        ) {
            break 'outcome Action::await_change();
        }
        let Some(sts) = sts_api
            .get_opt(target)
            .await
            .map_err(kube_err(format!("reading StatefulSet {target}")))?
        else {
            let msg = format!("StatefulSet {target} not found in namespace {ns}");
            if set_condition(
                &mut status.conditions,
                ConditionType::Ready,
                Status::False,
                "TargetNotFound",
                &msg,
                generation,
                now,
            ) {
                events.push(PendingEvent::warning("TargetNotFound", "Inject", msg));
            }
            break 'outcome ctx.fleet.requeue(waiting(&status, now));
        };

        let token = ensure_token(ctx, cb.as_ref()).await?;
        let sidecar = specs::choose_sidecar_image(
            cb.spec.sidecar.as_ref(),
            specs::live_sidecar_image(&sts).as_deref(),
            &ctx.config.walden_image,
        );
        let image = sidecar.image.clone();
        let hold_back = cb
            .spec
            .sidecar
            .as_ref()
            .is_none_or(|s| s.update_policy == SidecarUpdatePolicy::Manual);
        let patch = match specs::primary_patch(&cb, &sts, &image) {
            Ok(p) => Desired::new(p, &specs::primary_inputs(&cb, &sts, &image)),
            Err(e) => {
                if set_condition(
                    &mut status.conditions,
                    ConditionType::Ready,
                    Status::False,
                    e.reason(),
                    e.to_string(),
                    generation,
                    now,
                ) {
                    events.push(PendingEvent::warning(e.reason(), "Inject", e.to_string()));
                }
                break 'outcome ctx.fleet.requeue(RETRY);
            }
        };
        match apply_if_changed(
            &sts_api,
            target,
            Some(&sts),
            &patch,
            cb.spec.target.force_conflicts,
            hold_back,
        )
        .await
        {
            Ok(ApplyDecision::Apply) => {
                report_sidecar(&mut status, &sidecar, generation, now, &mut events);
                info!(statefulset = %target, "injected archiving");
                events.push(PendingEvent::normal(
                    "Injected",
                    "Inject",
                    format!("walden sidecar and archive settings applied to StatefulSet {target}"),
                ));
            }
            Ok(ApplyDecision::Unchanged) => {
                report_sidecar(&mut status, &sidecar, generation, now, &mut events);
            }
            Ok(ApplyDecision::HoldBack) => {
                info!(statefulset = %target, "operator changed its injection; held back until a field it is built from changes");
                let held = specs::SidecarChoice {
                    current: false,
                    reason: "UpdateAvailable",
                    message: format!(
                        "this operator would change the injection on StatefulSet {target} (an upgrade); held back so the database does not restart: it is applied with the next change of a field the injection is built from (target, storage, compression, archiveTimeout, retention, sidecar), or at once with spec.sidecar.updatePolicy: Automatic"
                    ),
                    ..sidecar.clone()
                };
                report_sidecar(&mut status, &held, generation, now, &mut events);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let msg = format!(
                    "another field manager owns fields walden needs on StatefulSet {target}: {}; remove them from that manager's manifest, or set spec.target.forceConflicts: true",
                    s.message
                );
                if set_condition(
                    &mut status.conditions,
                    ConditionType::Ready,
                    Status::False,
                    "FieldConflict",
                    &msg,
                    generation,
                    now,
                ) {
                    events.push(PendingEvent::warning("FieldConflict", "Inject", msg));
                }
                break 'outcome ctx.fleet.requeue(REFRESH);
            }
            Err(e) => return Err(kube_err(format!("applying StatefulSet {target}"))(e)),
        }

        // Proofs read the archive, not the primary: they run whatever the
        // primary's state.
        let proof_wait =
            super::restore_test::step(ctx, &cb, &sts, &mut status, now, &mut events).await?;
        let primary = match find_primary(ctx, &ns, &sts, &token).await? {
            Ok(p) => p,
            Err(why) => {
                let msg = format!("no pod of StatefulSet {target} answered as primary: {why}");
                set_condition(
                    &mut status.conditions,
                    ConditionType::Archiving,
                    Status::Unknown,
                    "PrimaryUnreachable",
                    &msg,
                    generation,
                    now,
                );
                if set_condition(
                    &mut status.conditions,
                    ConditionType::Ready,
                    Status::False,
                    "WaitingForPrimary",
                    &msg,
                    generation,
                    now,
                ) {
                    events.push(PendingEvent::warning("WaitingForPrimary", "Status", msg));
                }
                break 'outcome ctx.fleet.requeue(waiting(&status, now));
            }
        };
        status.primary_pod = Some(primary.pod.clone());
        let refused = match primary
            .status
            .archiving
            .identity_mismatch
            .as_ref()
            .map(|m| archives::on_mismatch(&cb.spec.storage, Some(&status), m, now))
        {
            Some(OnMismatch::Start { current, previous }) => {
                start_new_archive(&cb, current, previous, &mut status, now, &mut events);
                // The next pass applies the injection with the new archive.
                break 'outcome ctx.fleet.requeue(Duration::from_secs(1));
            }
            Some(OnMismatch::Moving) => {
                let msg = format!("waiting for the pods of StatefulSet {target} to restart with the new archive after pg_upgrade");
                set_condition(
                    &mut status.conditions,
                    ConditionType::Archiving,
                    Status::False,
                    NEW_ARCHIVE,
                    msg,
                    generation,
                    now,
                );
                break 'outcome ctx.fleet.requeue(RETRY);
            }
            Some(OnMismatch::Refuse(why)) => Some(why),
            None => None,
        };
        mirror_daemon_status(
            &mut status,
            &primary.status,
            refused.as_deref(),
            generation,
            now,
            &mut events,
        );

        let mut requeue = REFRESH;
        track_backup(ctx, &primary, &mut status, generation, now, &mut events).await;
        match status.backup_in_progress {
            Some(_) => ctx.fleet.backups.running(&backup_key(&cb)),
            None => ctx.fleet.backups.finished(&backup_key(&cb)),
        }
        extra_backup(ctx, &cb, &primary, &mut status, now, &mut events).await;
        if let Some(next) = schedule_backup(ctx, &cb, &primary, &mut status, now, &mut events).await
        {
            let until = (next - now).to_std().unwrap_or_default() + Duration::from_secs(1);
            requeue = requeue.min(until);
        }
        if status.backup_in_progress.is_some() {
            requeue = requeue.min(RETRY);
        }
        if let Some(w) = proof_wait {
            requeue = requeue.min(w);
        }
        ctx.fleet.requeue(requeue)
    };

    apply_status(&api, cb.as_ref(), cb.status.as_ref(), &status).await?;
    publish(ctx, cb.as_ref(), &events).await;
    tracing::debug!(cb = %name, "reconciled");
    Ok(action)
}

/// The condition reason and Event of a move to a new archive after pg_upgrade.
const NEW_ARCHIVE: &str = "NewArchive";

/// Records the new archive pg_upgrade calls for (the injection follows it
/// on the next pass) and forgets what status said about the old one.
fn start_new_archive(
    cb: &ContinuousBackup,
    current: ArchiveRecord,
    previous: ArchiveRecord,
    status: &mut ContinuousBackupStatus,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let generation = cb.metadata.generation;
    let version = |v: Option<u32>| v.map_or("?".to_string(), |v| v.to_string());
    let msg = format!(
        "pg_upgrade: the server is now database {} (PostgreSQL {}); archiving moves to {} (the pods of StatefulSet {} restart with it) and a first base backup is taken there; the archive of database {} (PostgreSQL {}) stays at {} for forks to times before {}",
        current.system_identifier,
        version(current.pg_version),
        archives::url(&current),
        cb.spec.target.stateful_set,
        previous.system_identifier,
        version(previous.pg_version),
        archives::url(&previous),
        now.to_rfc3339(),
    );
    info!(archive = %archives::url(&current), "pg_upgrade: new archive");
    status.previous_archives.push(previous);
    status.archive = Some(current);
    status.last_backup = None;
    // A backup running into the old archive is refused there, and its pod restarts.
    status.backup_in_progress = None;
    status.first_recoverability_point = None;
    status.first_recoverable_lsn = None;
    status.last_recoverable_wal = None;
    status.last_archived_wal = None;
    status.last_archived_time = None;
    for (condition, s) in [
        (ConditionType::Archiving, Status::False),
        (ConditionType::Ready, Status::False),
        (ConditionType::BackupSucceeded, Status::Unknown),
    ] {
        set_condition(
            &mut status.conditions,
            condition,
            s,
            NEW_ARCHIVE,
            &msg,
            generation,
            now,
        );
    }
    events.push(PendingEvent::normal(NEW_ARCHIVE, "Archive", msg));
}

/// Copies the daemon's archive view into status and sets Archiving/Ready;
/// `refused` says why the archive refuses a server of another database.
fn mirror_daemon_status(
    status: &mut ContinuousBackupStatus,
    d: &DaemonStatus,
    refused: Option<&str>,
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    // A recreated primary pod starts a daemon that has archived nothing
    // yet (its log is in an emptyDir): keep what was last known until it
    // reports a newer segment.
    if let Some(wal) = &d.archiving.last_archived_wal {
        status.last_archived_wal = Some(wal.clone());
        status.last_archived_time = d.archiving.last_archived_time;
    } else if status.last_archived_wal.is_none() {
        // Nothing kept either (a re-created ContinuousBackup): the archive
        // listing knows its newest segment, though not when it was stored.
        status.last_archived_wal = d
            .recovery_window
            .as_ref()
            .and_then(|w| w.last_archived_wal.clone());
    }
    status.archive_backlog = Some(d.archiving.ready_count);
    status.archive_backlog_since = d.archiving.oldest_ready_time;
    if let Some(b) = &d.last_backup {
        status.last_backup = Some(BackupInfo {
            id: b.id.clone(),
            start_time: b.start_time,
            stop_time: b.stop_time,
            start_lsn: b.start_lsn.clone(),
            stop_lsn: b.stop_lsn.clone(),
        });
    }
    if let Some(w) = &d.recovery_window {
        status.first_recoverability_point = Some(w.first_point);
        status.first_recoverable_lsn = Some(w.first_lsn.clone());
        status.last_recoverable_wal = w.last_archived_wal.clone();
    }
    let failing = archive_failing(d);
    let has_backup = d.last_backup.is_some() || status.last_backup.is_some();
    if let Some(hole) = archive_hole(d) {
        report_archive_hole(status, &hole, generation, now, events);
    } else if let Some(why) = refused {
        const REASON: &str = "SystemIdentifierMismatch";
        for condition in [ConditionType::Archiving, ConditionType::Ready] {
            if set_condition(
                &mut status.conditions,
                condition,
                Status::False,
                REASON,
                why,
                generation,
                now,
            ) && condition == ConditionType::Archiving
            {
                events.push(PendingEvent::warning(REASON, "Archive", why));
            }
        }
    } else if failing {
        let msg = format!(
            "archiving {} failed: {}",
            d.archiving
                .last_failed_wal
                .as_deref()
                .unwrap_or("a segment"),
            // An old or third-party daemon may send a whole error dump.
            super::truncate(
                d.archiving.last_error.as_deref().unwrap_or("unknown error"),
                MAX_ERROR
            )
        );
        if set_condition(
            &mut status.conditions,
            ConditionType::Archiving,
            Status::False,
            "ArchiveFailing",
            &msg,
            generation,
            now,
        ) {
            events.push(PendingEvent::warning(
                "ArchiveFailing",
                "Archive",
                msg.clone(),
            ));
        }
        set_condition(
            &mut status.conditions,
            ConditionType::Ready,
            Status::False,
            "ArchiveFailing",
            msg,
            generation,
            now,
        );
    } else {
        let msg = match &status.last_archived_wal {
            Some(wal) => format!("last archived {wal}"),
            None => "archiving enabled, nothing archived yet".to_string(),
        };
        set_condition(
            &mut status.conditions,
            ConditionType::Archiving,
            Status::True,
            "Archiving",
            &msg,
            generation,
            now,
        );
        if !has_backup {
            let why = "WAL archiving works, but no base backup exists yet: nothing can be forked or followed until the first one (started now) completes";
            if set_condition(
                &mut status.conditions,
                ConditionType::Ready,
                Status::False,
                "NoBaseBackup",
                why,
                generation,
                now,
            ) {
                events.push(PendingEvent::normal("NoBaseBackup", "Archive", why));
            }
        } else if set_condition(
            &mut status.conditions,
            ConditionType::Ready,
            Status::True,
            "Protected",
            "WAL archiving and backups are running",
            generation,
            now,
        ) {
            events.push(PendingEvent::normal("Protected", "Archive", msg));
        }
    }
}

/// The `SidecarCurrent` condition, with an Event when it changes.
fn report_sidecar(
    status: &mut ContinuousBackupStatus,
    choice: &specs::SidecarChoice,
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let s = if choice.current {
        Status::True
    } else {
        Status::False
    };
    if set_condition(
        &mut status.conditions,
        ConditionType::SidecarCurrent,
        s,
        choice.reason,
        &choice.message,
        generation,
        now,
    ) && !choice.current
    {
        events.push(PendingEvent::normal(
            &format!("Sidecar{}", choice.reason),
            "Inject",
            choice.message.clone(),
        ));
    }
}

/// The hole the daemon found in the archive, as a condition message (pure).
fn archive_hole(d: &DaemonStatus) -> Option<String> {
    let hole = d.continuity.as_ref()?.first_hole.as_ref()?;
    let mut msg = match &hole.after {
        Some(after) => format!(
            "the archive has a hole: {} is missing after {after}; recovery cannot pass it, so the recovery window ends at {after}",
            hole.missing
        ),
        None => format!(
            "the archive has a hole: {} is missing, and the oldest backup needs it; no restore can start from that backup",
            hole.missing
        ),
    };
    if archive_failing(d) {
        msg.push_str(&format!(
            "; archiving {} also fails: {}",
            d.archiving
                .last_failed_wal
                .as_deref()
                .unwrap_or("a segment"),
            d.archiving.last_error.as_deref().unwrap_or("unknown error")
        ));
    }
    Some(msg)
}

/// `Archiving=False` and `Ready=False` with reason `ArchiveHole`, and a
/// Warning Event when it is new: a window that cannot be reached is not one.
fn report_archive_hole(
    status: &mut ContinuousBackupStatus,
    msg: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    if set_condition(
        &mut status.conditions,
        ConditionType::Archiving,
        Status::False,
        "ArchiveHole",
        msg,
        generation,
        now,
    ) {
        events.push(PendingEvent::warning("ArchiveHole", "Archive", msg));
    }
    set_condition(
        &mut status.conditions,
        ConditionType::Ready,
        Status::False,
        "ArchiveHole",
        msg,
        generation,
        now,
    );
}

/// Whether the daemon's last archive attempt failed.
fn archive_failing(d: &DaemonStatus) -> bool {
    match (d.archiving.last_failed_time, d.archiving.last_archived_time) {
        (Some(failed), Some(ok)) => failed > ok,
        (Some(_), None) => true,
        _ => false,
    }
}

/// A backup outside the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ExtraBackup {
    /// spec.backupRequest has a value not handled yet.
    Requested(String),
    /// No base backup exists and archiving works: without one nothing can
    /// be restored, so the first is taken at once, not at the first slot.
    First,
}

/// Whether to start a backup outside the schedule (pure).
fn decide_extra_backup(
    requested: Option<&str>,
    handled: Option<&str>,
    has_backup: bool,
    archiving_ok: bool,
    in_progress: bool,
) -> Option<ExtraBackup> {
    if in_progress {
        return None;
    }
    match requested {
        Some(r) if handled != Some(r) => Some(ExtraBackup::Requested(r.to_string())),
        _ if !has_backup && archiving_ok => Some(ExtraBackup::First),
        _ => None,
    }
}

/// Starts the first backup, or the one spec.backupRequest asks for.
async fn extra_backup(
    ctx: &Context,
    cb: &ContinuousBackup,
    primary: &Primary,
    status: &mut ContinuousBackupStatus,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let d = &primary.status;
    // A backup that just succeeded may not be in the daemon's answer yet.
    let succeeded = status
        .conditions
        .iter()
        .any(|c| c.type_ == ConditionType::BackupSucceeded.as_str() && c.status == "True");
    let Some(why) = decide_extra_backup(
        cb.spec.backup_request.as_deref(),
        status.backup_request.as_deref(),
        d.last_backup.is_some() || status.last_backup.is_some() || succeeded,
        !archive_failing(d),
        status.backup_in_progress.is_some() || d.backup_in_progress.is_some(),
    ) else {
        return;
    };
    let what = match &why {
        ExtraBackup::Requested(token) => format!("for spec.backupRequest {token:?}"),
        ExtraBackup::First => "as the first one (no base backup existed)".to_string(),
    };
    if !take_backup_place(ctx, cb) {
        return;
    }
    match ctx.daemon.start_backup(&primary.endpoint).await {
        Ok(StartBackup::Started(id)) | Ok(StartBackup::AlreadyRunning(id)) => {
            ctx.metrics.backups_started.inc();
            status.backup_in_progress = Some(id.clone());
            if let ExtraBackup::Requested(token) = why {
                status.backup_request = Some(token);
            }
            events.push(PendingEvent::normal(
                "BackupStarted",
                "Backup",
                format!("base backup {id} started on {} {what}", primary.pod),
            ));
        }
        Err(e) => {
            ctx.fleet.backups.finished(&backup_key(cb));
            let msg = format!("could not start a base backup {what}: {e}");
            set_condition(
                &mut status.conditions,
                ConditionType::BackupSucceeded,
                Status::False,
                "BackupStartFailed",
                &msg,
                cb.metadata.generation,
                now,
            );
            events.push(PendingEvent::warning("BackupStartFailed", "Backup", msg));
        }
    }
}

/// Follows the backup the operator started, until it succeeds or fails.
async fn track_backup(
    ctx: &Context,
    primary: &Primary,
    status: &mut ContinuousBackupStatus,
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let Some(id) = status.backup_in_progress.clone() else {
        return;
    };
    match ctx.daemon.backup(&primary.endpoint, &id).await {
        Ok(Some(job)) => match job.state {
            BackupState::Running => {}
            BackupState::Succeeded => {
                status.backup_in_progress = None;
                let msg = format!("base backup {id} completed");
                set_condition(
                    &mut status.conditions,
                    ConditionType::BackupSucceeded,
                    Status::True,
                    "BackupCompleted",
                    &msg,
                    generation,
                    now,
                );
                events.push(PendingEvent::normal("BackupSucceeded", "Backup", msg));
            }
            BackupState::Failed => {
                status.backup_in_progress = None;
                let msg = format!(
                    "base backup {id} failed: {}",
                    job.error.as_deref().unwrap_or("no error given")
                );
                set_condition(
                    &mut status.conditions,
                    ConditionType::BackupSucceeded,
                    Status::False,
                    "BackupFailed",
                    &msg,
                    generation,
                    now,
                );
                events.push(PendingEvent::warning("BackupFailed", "Backup", msg));
            }
        },
        Ok(None) => {
            status.backup_in_progress = None;
            let msg = format!("daemon on {} no longer knows backup {id} (restarted?); the next scheduled run will take a new one", primary.pod);
            set_condition(
                &mut status.conditions,
                ConditionType::BackupSucceeded,
                Status::False,
                "BackupLost",
                &msg,
                generation,
                now,
            );
            events.push(PendingEvent::warning("BackupLost", "Backup", msg));
        }
        Err(e) => {
            warn!(backup = %id, error = %e, "could not read backup state; will retry");
            let msg = format!("could not read the state of backup {id} (will retry): {e}");
            if set_condition(
                &mut status.conditions,
                ConditionType::BackupSucceeded,
                Status::Unknown,
                "BackupStateUnknown",
                &msg,
                generation,
                now,
            ) {
                events.push(PendingEvent::warning("BackupStateUnknown", "Backup", msg));
            }
        }
    }
}

/// Where in the backup window this resource's runs fall: stable per
/// resource (its UID), the window from spec.backupWindow or the operator's.
/// Restore proofs on a shared schedule are spread the same way.
pub(super) fn spread_for(ctx: &Context, cb: &ContinuousBackup) -> Spread {
    Spread {
        window: cb
            .spec
            .backup_window
            .as_deref()
            .and_then(|w| walden_contract::duration::parse(w).ok())
            .unwrap_or(ctx.fleet.backup_window),
        key: spread_key(cb.metadata.uid.as_deref().unwrap_or(&backup_key(cb))),
        resumed: ctx.fleet.resumed,
    }
}

/// How soon a backup held back by the cap tries again.
const QUEUED: Duration = Duration::from_secs(20);

/// The key of a ContinuousBackup's place in the backup cap.
fn backup_key(cb: &ContinuousBackup) -> String {
    format!("{}/{}", cb.namespace().unwrap_or_default(), cb.name_any())
}

/// Takes a place under the operator's cap on concurrent backups; when all
/// are taken the backup waits (its slot stays unhandled, so it is not lost).
fn take_backup_place(ctx: &Context, cb: &ContinuousBackup) -> bool {
    if ctx.fleet.backups.try_start(&backup_key(cb)) {
        return true;
    }
    info!(
        running = ctx.fleet.backups.in_use(),
        "concurrent-backup cap reached; the backup waits"
    );
    ctx.metrics.backups_queued.inc();
    false
}

/// Starts a scheduled backup when due; returns the next due time.
async fn schedule_backup(
    ctx: &Context,
    cb: &ContinuousBackup,
    primary: &Primary,
    status: &mut ContinuousBackupStatus,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) -> Option<DateTime<Utc>> {
    let generation = cb.metadata.generation;
    let Some(expr) = &cb.spec.schedule else {
        status.next_backup_time = None;
        return None;
    };
    let schedule = match Schedule::parse(expr) {
        Ok(s) => s,
        Err(e) => {
            status.next_backup_time = None;
            if set_condition(
                &mut status.conditions,
                ConditionType::BackupSucceeded,
                Status::False,
                "InvalidSchedule",
                e.to_string(),
                generation,
                now,
            ) {
                events.push(PendingEvent::warning(
                    "InvalidSchedule",
                    "Schedule",
                    e.to_string(),
                ));
            }
            return None;
        }
    };
    if cb.spec.suspend {
        status.next_backup_time = None;
        return None;
    }
    let anchor = created_at(cb).unwrap_or(now);
    let last_backup_start = primary
        .status
        .last_backup
        .as_ref()
        .map(|b| b.start_time)
        .max(status.last_backup.as_ref().map(|b| b.start_time));
    let spread = spread_for(ctx, cb);
    let d = decide(
        &schedule,
        cb.spec.missed_backup_policy,
        status.last_scheduled_time,
        last_backup_start,
        anchor,
        now,
        &spread,
    );
    status.next_backup_time = d.next;
    let Some(slot) = d.slot else {
        return d.next;
    };
    if !d.start_backup {
        status.last_scheduled_time = Some(slot);
        events.push(PendingEvent::normal(
            "BackupSkipped",
            "Schedule",
            format!("missed the run scheduled for {slot} (missedBackupPolicy: Skip)"),
        ));
        return d.next;
    }
    if status.backup_in_progress.is_some() {
        // Taken when the running one finishes.
        return d.next;
    }
    if !take_backup_place(ctx, cb) {
        return Some(now + chrono::Duration::from_std(QUEUED).unwrap_or_default());
    }
    match ctx.daemon.start_backup(&primary.endpoint).await {
        Ok(StartBackup::Started(id)) | Ok(StartBackup::AlreadyRunning(id)) => {
            ctx.metrics.backups_started.inc();
            status.backup_in_progress = Some(id.clone());
            status.last_scheduled_time = Some(slot);
            events.push(PendingEvent::normal(
                "BackupStarted",
                "Backup",
                format!(
                    "base backup {id} started on {} for the run scheduled at {slot}",
                    primary.pod
                ),
            ));
        }
        Err(e) => {
            ctx.fleet.backups.finished(&backup_key(cb));
            let msg = format!("could not start the base backup scheduled for {slot}: {e}");
            set_condition(
                &mut status.conditions,
                ConditionType::BackupSucceeded,
                Status::False,
                "BackupStartFailed",
                &msg,
                generation,
                now,
            );
            events.push(PendingEvent::warning("BackupStartFailed", "Backup", msg));
        }
    }
    d.next
}

/// Removes the injection. Backups and WAL in storage are left alone: the
/// operator cannot reach storage, and retention is the engine's business.
async fn cleanup(cb: Arc<ContinuousBackup>, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace_of(cb.as_ref())?;
    ctx.fleet.backups.finished(&backup_key(&cb));
    if let Some(pod) = super::restore_test::cancel(ctx, cb.as_ref()).await? {
        publish(
            ctx,
            cb.as_ref(),
            &[PendingEvent::normal(
                "RestoreTestCancelled",
                "Cleanup",
                format!("restore proof {pod} cancelled: its pod is deleted"),
            )],
        )
        .await;
    }
    let target = &cb.spec.target.stateful_set;
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = sts_api
        .get_opt(target)
        .await
        .map_err(kube_err(format!("reading StatefulSet {target}")))?;
    let owns_fields = sts.as_ref().is_some_and(|s| {
        s.metadata
            .managed_fields
            .iter()
            .flatten()
            .any(|m| m.manager.as_deref() == Some(FIELD_MANAGER))
    });
    if owns_fields {
        sts_api
            .patch(
                target,
                &PatchParams::apply(FIELD_MANAGER),
                &Patch::Apply(specs::release_patch(target, &ns)),
            )
            .await
            .map_err(kube_err(format!(
                "removing the injection from StatefulSet {target}"
            )))?;
        info!(statefulset = %target, "injection removed");
        publish(
            ctx,
            cb.as_ref(),
            &[PendingEvent::normal(
                "InjectionRemoved",
                "Cleanup",
                format!("walden sidecar and archive settings removed from StatefulSet {target}; backups in storage are kept"),
            )],
        )
        .await;
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::testing::{
        context, context_with_image, pod, primary_status, time, FakeApi, FakeDaemon, IMAGE,
    };
    use crate::controllers::APPLIED_ANNOTATION;
    use crate::daemon_client::{BackupJob, DaemonStatus};
    use serde_json::{json, Value};

    const NS: &str = "db";
    const STS_PATH: &str = "/apis/apps/v1/namespaces/db/statefulsets/pg";
    const CB_PATH: &str = "/apis/walden.dev/v1alpha1/namespaces/db/continuousbackups/pg-backup";
    const POD_URL: &str = "http://10.0.0.5:8008";

    fn statefulset() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "pg", "namespace": NS, "uid": "sts-uid"},
            "spec": {
                "serviceName": "pg", "replicas": 1,
                "selector": {"matchLabels": {"app": "pg"}},
                "template": {
                    "metadata": {"labels": {"app": "pg"}},
                    "spec": {"containers": [{
                        "name": "postgres", "image": "postgres:16",
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
                    }]}
                }
            }
        })
    }

    fn cb(spec_extra: Value) -> Value {
        let mut spec = json!({
            "target": {"statefulSet": "pg", "credentialsSecret": "pg-creds"},
            "storage": {"s3": {"bucket": "backups", "prefix": "pg", "credentials": {"secret": "s3-creds"}}},
        });
        super::super::testing::merge(&mut spec, &spec_extra);
        json!({
            "apiVersion": "walden.dev/v1alpha1", "kind": "ContinuousBackup",
            "metadata": {"name": "pg-backup", "namespace": NS, "uid": "cb-uid", "generation": 1,
                         "creationTimestamp": "2025-05-01T00:00:00Z",
                         "finalizers": [CONTINUOUS_BACKUP_FINALIZER]},
            "spec": spec,
        })
    }

    fn setup(spec_extra: Value, daemon_status: Option<DaemonStatus>) -> (FakeApi, Arc<FakeDaemon>) {
        let api = FakeApi::default();
        api.insert(statefulset());
        api.insert(cb(spec_extra));
        api.insert(pod(NS, "pg-0", "10.0.0.5", json!({"app": "pg"}), true));
        let daemon = Arc::new(FakeDaemon::default());
        if let Some(s) = daemon_status {
            daemon
                .statuses
                .lock()
                .expect("lock")
                .insert(POD_URL.into(), s);
        }
        (api, daemon)
    }

    fn stored_cb(api: &FakeApi) -> Arc<ContinuousBackup> {
        Arc::new(serde_json::from_value(api.get(CB_PATH).expect("cb stored")).expect("cb parses"))
    }

    fn condition(cb: &ContinuousBackup, type_: &str) -> (String, String, String) {
        let c = cb
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
            .unwrap_or_else(|| panic!("no {type_} condition in {:?}", cb.status));
        (c.status.clone(), c.reason.clone(), c.message.clone())
    }

    #[test]
    fn extra_backup_table() {
        let r = |t: &str| Some(ExtraBackup::Requested(t.to_string()));
        let cases = [
            ("nothing to do", None, None, true, true, false, None),
            (
                "first backup",
                None,
                None,
                false,
                true,
                false,
                Some(ExtraBackup::First),
            ),
            (
                "first waits for archiving",
                None,
                None,
                false,
                false,
                false,
                None,
            ),
            (
                "first waits for the running one",
                None,
                None,
                false,
                true,
                true,
                None,
            ),
            ("new request", Some("a"), None, true, true, false, r("a")),
            (
                "request handled",
                Some("a"),
                Some("a"),
                true,
                true,
                false,
                None,
            ),
            (
                "changed request",
                Some("b"),
                Some("a"),
                true,
                true,
                false,
                r("b"),
            ),
            (
                "request waits for the running one",
                Some("b"),
                Some("a"),
                true,
                true,
                true,
                None,
            ),
            (
                "request even while archiving fails",
                Some("a"),
                None,
                true,
                false,
                false,
                r("a"),
            ),
            ("request removed", None, Some("a"), true, true, false, None),
        ];
        for (name, req, handled, has, ok, running, want) in cases {
            assert_eq!(
                decide_extra_backup(req, handled, has, ok, running),
                want,
                "{name}"
            );
        }
    }

    #[tokio::test]
    async fn token_secret_is_written_by_the_operators_field_manager() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let secret_writes: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|r| r.path.contains("/secrets"))
            .collect();
        assert!(!secret_writes.is_empty(), "the token Secret was written");
        for w in secret_writes {
            assert!(
                w.query.contains("fieldManager=walden-operator"),
                "{} {} without the operator's field manager: {:?}",
                w.method,
                w.path,
                w.query
            );
        }
    }

    /// After the Secret is rotated, daemon calls carry the old token too (the
    /// pod mounts it until the kubelet refreshes the volume).
    #[tokio::test]
    async fn a_rotated_token_secret_keeps_the_old_token_for_the_daemon_calls() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("first reconcile");
        let path = "/api/v1/namespaces/db/secrets/pg-backup-walden-token";
        let mut secret = api.get(path).expect("token secret");
        let old = daemon
            .calls()
            .last()
            .expect("a daemon call")
            .1
            .token
            .clone();
        // "rotated" in base64, as a user's `kubectl edit` leaves it.
        secret["data"]["token"] = json!("cm90YXRlZA==");
        api.insert(secret);
        reconcile(stored_cb(&api), ctx)
            .await
            .expect("after rotation");
        let (_, ep) = daemon.calls().last().cloned().expect("a daemon call");
        assert_eq!(ep.token, "rotated");
        assert_eq!(ep.previous_token.as_deref(), Some(old.as_str()));
    }

    #[tokio::test]
    async fn injects_then_a_second_reconcile_writes_nothing() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("first reconcile");

        let applies: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|r| r.path == STS_PATH)
            .collect();
        assert_eq!(applies.len(), 1, "one apply of the StatefulSet");
        assert!(applies[0].content_type.contains("apply-patch"));
        assert!(
            applies[0].query.contains("fieldManager=walden-operator"),
            "{}",
            applies[0].query
        );
        assert!(!applies[0].query.contains("force=true"));
        let sts = api.get(STS_PATH).expect("sts");
        let containers = sts["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        assert!(containers
            .iter()
            .any(|c| c["name"] == "walden" && c["image"] == IMAGE));
        let token = api
            .get("/api/v1/namespaces/db/secrets/pg-backup-walden-token")
            .expect("token secret");
        assert_eq!(token["metadata"]["ownerReferences"][0]["uid"], "cb-uid");

        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "Ready").0, "True");
        assert_eq!(condition(&cb, "Archiving").1, "Archiving");
        let status = cb.status.clone().expect("status");
        assert_eq!(
            status.last_archived_wal.as_deref(),
            Some("000000010000000000000007")
        );
        assert_eq!(
            status.first_recoverability_point,
            Some(time("2025-05-01T03:02:00Z"))
        );
        assert_eq!(
            status.last_backup.map(|b| b.id),
            Some("20250501T030000Z".to_string())
        );
        assert_eq!(status.primary_pod.as_deref(), Some("pg-0"));
        assert_eq!(status.observed_generation, Some(1));
        assert!(
            api.event_reasons().contains(&"Injected".to_string()),
            "{:?}",
            api.event_reasons()
        );
        // The daemon was called with the token from the Secret.
        let calls = daemon.calls();
        assert!(
            calls
                .iter()
                .all(|(_, ep)| ep.base_url == POD_URL && ep.token.len() == 64),
            "{calls:?}"
        );

        api.clear_requests();
        reconcile(stored_cb(&api), ctx)
            .await
            .expect("second reconcile");
        assert!(
            api.writes().is_empty(),
            "no writes expected: {:?}",
            api.writes()
        );
        assert!(!api.requests().is_empty(), "it still read the world");
    }

    fn sidecar_env_names(body: &Value) -> Vec<String> {
        body["spec"]["template"]["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "walden")
            .flat_map(|c| c["env"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect()
    }

    /// The `WALDEN_STORAGE` the injection gives the walden sidecar.
    fn sidecar_storage(sts: &Value) -> Option<String> {
        sts["spec"]["template"]["spec"]["containers"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "walden")?["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "WALDEN_STORAGE")?["value"]
            .as_str()
            .map(str::to_string)
    }

    fn set_daemon_status(daemon: &FakeDaemon, status: DaemonStatus) {
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), status);
    }

    /// The daemon's archive refuses its server as database 222 (PostgreSQL
    /// `server`), the archive being 111's (PostgreSQL `archive`).
    fn refused(server: u32, archive: u32) -> DaemonStatus {
        let mut s = primary_status();
        s.archiving.last_failed_wal = Some("000000010000000000000008".into());
        s.archiving.last_failed_time = Some(time("2025-05-01T10:01:00Z"));
        s.archiving.failed_count = 3;
        s.archiving.last_error = Some("refusing 000000010000000000000008: it belongs to the database with system identifier 222 ... give this one its own storage prefix".into());
        s.archiving.identity_mismatch = Some(walden_contract::api::IdentityMismatch {
            server_system_identifier: "222".into(),
            server_pg_version: Some(server),
            archive_system_identifier: "111".into(),
            archive_pg_version: Some(archive),
        });
        s
    }

    /// Issue 17: after pg_upgrade (a newer major version, a new system
    /// identifier) the injection moves to a new archive below spec's prefix
    /// by itself, the old one is recorded for forks, status forgets the old
    /// archive's facts, and a first base backup is taken in the new one.
    #[tokio::test]
    async fn pg_upgrade_moves_the_injection_to_a_new_archive_with_a_first_backup() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let before = time("2025-05-01T10:05:00Z");
        reconcile(stored_cb(&api), context(&api, daemon.clone(), before))
            .await
            .expect("protected");
        let sts = api.get(STS_PATH).expect("sts");
        assert_eq!(sidecar_storage(&sts).as_deref(), Some("s3://backups/pg"));

        set_daemon_status(&daemon, refused(18, 15));
        let upgraded = time("2025-05-02T09:00:00Z");
        let ctx = context(&api, daemon.clone(), upgraded);
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("refused");
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        let current = status.archive.clone().expect("a new archive");
        assert_eq!(
            (current.bucket.as_str(), current.prefix.as_deref()),
            ("backups", Some("pg/pg18-222"))
        );
        assert_eq!(
            (current.system_identifier.as_str(), current.pg_version),
            ("222", Some(18))
        );
        let [previous] = status.previous_archives.as_slice() else {
            panic!("one previous archive: {:?}", status.previous_archives);
        };
        assert_eq!(previous.prefix.as_deref(), Some("pg"));
        assert_eq!(previous.system_identifier, "111");
        assert_eq!(previous.until, Some(upgraded));
        assert_eq!(
            previous.first_recoverability_point,
            Some(time("2025-05-01T03:02:00Z")),
            "the old archive's window is kept with it"
        );
        assert_eq!(
            status.last_backup, None,
            "the old archive's backup is not the new one's"
        );
        assert_eq!(status.first_recoverability_point, None);
        let (archiving, reason, message) = condition(&cb, "Archiving");
        assert_eq!(
            (archiving.as_str(), reason.as_str()),
            ("False", "NewArchive")
        );
        assert!(message.contains("s3://backups/pg/pg18-222"), "{message}");
        assert_eq!(condition(&cb, "BackupSucceeded").0, "Unknown");
        assert_eq!(api.event_notes("NewArchive").len(), 1);
        assert!(
            !api.event_reasons().contains(&"ArchiveFailing".to_string()),
            "an upgrade is not reported as a failure: {:?}",
            api.event_reasons()
        );

        // The next pass moves the injection; the old pods still run and
        // are still refused: nothing is recorded twice.
        api.clear_requests();
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("moving");
        let sts = api.get(STS_PATH).expect("sts");
        assert_eq!(
            sidecar_storage(&sts).as_deref(),
            Some("s3://backups/pg/pg18-222")
        );
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        assert_eq!(status.previous_archives.len(), 1);
        assert!(api.event_notes("NewArchive").is_empty());
        assert_eq!(
            start_count(&daemon),
            0,
            "no backup into the refusing archive"
        );

        // The pods restarted: the new archive is empty and archiving works.
        let mut fresh = primary_status();
        fresh.last_backup = None;
        fresh.recovery_window = None;
        set_daemon_status(&daemon, fresh);
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250502T090100Z".into()));
        reconcile(
            stored_cb(&api),
            context(&api, daemon.clone(), time("2025-05-02T09:01:00Z")),
        )
        .await
        .expect("archiving again");
        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "Archiving").0, "True");
        assert_eq!(start_count(&daemon), 1, "the new archive's first backup");
        assert_eq!(
            cb.status
                .as_ref()
                .and_then(|s| s.archive.as_ref())
                .map(|a| a.system_identifier.as_str()),
            Some("222")
        );
    }

    /// Issue 17: a refusal that is not an upgrade (the same major version:
    /// another database on the prefix, or a new initdb) moves nothing and
    /// says why, with one Warning.
    #[tokio::test]
    async fn another_database_on_the_prefix_stays_refused() {
        let (api, daemon) = setup(json!({}), Some(refused(16, 16)));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        for _ in 0..2 {
            reconcile(stored_cb(&api), ctx.clone())
                .await
                .expect("reconcile");
        }
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        assert_eq!(status.archive, None);
        assert!(status.previous_archives.is_empty());
        assert_eq!(
            sidecar_storage(&api.get(STS_PATH).expect("sts")).as_deref(),
            Some("s3://backups/pg")
        );
        for type_ in ["Archiving", "Ready"] {
            let (s, reason, message) = condition(&cb, type_);
            assert_eq!(
                (s.as_str(), reason.as_str()),
                ("False", "SystemIdentifierMismatch")
            );
            assert!(
                message.contains("database 222 (PostgreSQL 16)")
                    && message.contains("database 111"),
                "{message}"
            );
        }
        assert_eq!(api.event_notes("SystemIdentifierMismatch").len(), 1);
    }

    /// Issue 12.6: removing spec.retention must send a body without the
    /// retention env, so that server-side apply releases it.
    #[tokio::test]
    async fn removing_a_spec_field_applies_the_smaller_body() {
        let (api, daemon) = setup(
            json!({"retention": {"fullBackups": 3}}),
            Some(primary_status()),
        );
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("first reconcile");
        let sts = api.get(STS_PATH).expect("sts");
        assert!(
            sidecar_env_names(&sts).contains(&"WALDEN_RETENTION_FULL".to_string()),
            "{:?}",
            sidecar_env_names(&sts)
        );
        assert!(sts["metadata"]["annotations"][crate::controllers::APPLIED_ANNOTATION].is_string());

        let mut without = api.get(CB_PATH).expect("cb");
        without["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("retention");
        without["metadata"]["generation"] = json!(2);
        api.insert(without);
        api.clear_requests();
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile without retention");
        let applies: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|r| r.path == STS_PATH)
            .collect();
        assert_eq!(applies.len(), 1, "the smaller body is applied once");
        let names = sidecar_env_names(&applies[0].body);
        assert!(names.contains(&"WALDEN_STORAGE".to_string()), "{names:?}");
        assert!(
            !names.iter().any(|n| n.starts_with("WALDEN_RETENTION")),
            "{names:?}"
        );

        api.clear_requests();
        reconcile(stored_cb(&api), ctx)
            .await
            .expect("third reconcile");
        assert!(
            api.writes().iter().all(|r| r.path != STS_PATH),
            "then nothing more: {:?}",
            api.writes()
        );
    }

    fn sidecar_image(sts: &Value) -> Option<String> {
        sts["spec"]["template"]["spec"]["containers"]
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "walden"))
            .and_then(|c| c["image"].as_str().map(str::to_string))
    }

    /// Issue 14.2: an operator upgrade (a new walden image) does not touch
    /// the protected StatefulSet; the status says an update is available,
    /// and the user opts in with updatePolicy: Automatic.
    #[tokio::test]
    async fn an_operator_upgrade_does_not_restart_the_database() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let now = time("2025-05-01T10:05:00Z");
        reconcile(stored_cb(&api), context(&api, daemon.clone(), now))
            .await
            .expect("first reconcile");
        assert_eq!(
            sidecar_image(&api.get(STS_PATH).expect("sts")).as_deref(),
            Some(IMAGE)
        );
        assert_eq!(condition(&stored_cb(&api), "SidecarCurrent").0, "True");

        let upgraded =
            context_with_image(&api, daemon.clone(), now, "ghcr.io/walden-dev/walden:next");
        api.clear_requests();
        reconcile(stored_cb(&api), upgraded.clone())
            .await
            .expect("reconcile after the upgrade");
        assert!(
            api.writes().iter().all(|r| r.path != STS_PATH),
            "no write to the StatefulSet: {:?}",
            api.writes()
        );
        let cb = stored_cb(&api);
        let (current, reason, message) = condition(&cb, "SidecarCurrent");
        assert_eq!(
            (current.as_str(), reason.as_str()),
            ("False", "UpdateAvailable")
        );
        assert!(
            message.contains("walden:next") && message.contains(IMAGE),
            "{message}"
        );
        assert!(api
            .event_reasons()
            .contains(&"SidecarUpdateAvailable".to_string()));

        // A spec change re-applies, still with the running image.
        let mut changed = api.get(CB_PATH).expect("cb");
        changed["spec"]["archiveTimeout"] = json!("30s");
        api.insert(changed);
        reconcile(stored_cb(&api), upgraded.clone())
            .await
            .expect("reconcile");
        let sts = api.get(STS_PATH).expect("sts");
        assert_eq!(sidecar_image(&sts).as_deref(), Some(IMAGE), "still pinned");
        assert!(sts["spec"]["template"]["spec"]["containers"]
            .to_string()
            .contains("archive_timeout=30s"));

        // Opt in: the sidecar follows the operator.
        let mut auto = api.get(CB_PATH).expect("cb");
        auto["spec"]["sidecar"] = json!({"updatePolicy": "Automatic"});
        api.insert(auto);
        reconcile(stored_cb(&api), upgraded)
            .await
            .expect("reconcile");
        assert_eq!(
            sidecar_image(&api.get(STS_PATH).expect("sts")).as_deref(),
            Some("ghcr.io/walden-dev/walden:next")
        );
        assert_eq!(condition(&stored_cb(&api), "SidecarCurrent").0, "True");
    }

    /// A held-back injection (the operator's body changed, the user's inputs
    /// did not) stays held back when only fields that shape no pod change:
    /// an on-demand backup or a restore proof must not restart the database.
    #[tokio::test]
    async fn asking_for_a_backup_or_a_proof_does_not_apply_a_held_back_injection() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let now = time("2025-05-01T10:05:00Z");
        reconcile(stored_cb(&api), context(&api, daemon.clone(), now))
            .await
            .expect("first reconcile");
        // As if an older operator had built another body from the same inputs.
        let mut sts = api.get(STS_PATH).expect("sts");
        let stamp = sts["metadata"]["annotations"][APPLIED_ANNOTATION]
            .as_str()
            .expect("stamp")
            .to_string();
        let (inputs, _) = stamp.split_once('.').expect("inputs.body");
        sts["metadata"]["annotations"][APPLIED_ANNOTATION] = json!(format!("{inputs}.0ld0b0dy"));
        api.insert(sts);
        for (field, value) in [
            ("backupRequest", json!("before-migration")),
            ("restoreTest", json!({"schedule": "0 5 * * *"})),
            ("schedule", json!("0 4 * * *")),
            ("suspend", json!(true)),
        ] {
            let mut obj = api.get(CB_PATH).expect("cb");
            obj["spec"][field] = value;
            api.insert(obj);
            api.clear_requests();
            reconcile(stored_cb(&api), context(&api, daemon.clone(), now))
                .await
                .expect("reconcile");
            assert!(
                api.writes().iter().all(|r| r.path != STS_PATH),
                "spec.{field} applied the held-back injection: {:?}",
                api.writes()
            );
        }
        // A field the injection is built from does apply it.
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["spec"]["archiveTimeout"] = json!("30s");
        api.insert(obj);
        api.clear_requests();
        reconcile(stored_cb(&api), context(&api, daemon.clone(), now))
            .await
            .expect("reconcile");
        assert!(api.writes().iter().any(|r| r.path == STS_PATH));
    }

    #[tokio::test]
    async fn missing_target_is_a_condition_and_an_event() {
        let api = FakeApi::default();
        api.insert(cb(json!({})));
        let ctx = context(
            &api,
            Arc::new(FakeDaemon::default()),
            time("2025-05-01T10:05:00Z"),
        );
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let cb = stored_cb(&api);
        let (status, reason, message) = condition(&cb, "Ready");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "TargetNotFound")
        );
        assert!(message.contains("StatefulSet pg not found"), "{message}");
        assert_eq!(api.event_reasons(), vec!["TargetNotFound".to_string()]);
        // No repeated Event or status write while nothing changes.
        api.clear_requests();
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert!(api.writes().is_empty(), "{:?}", api.writes());
    }

    #[tokio::test]
    async fn conflicting_field_manager_is_reported_then_forced_when_asked() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        api.conflict_on_apply(STS_PATH, "helm");
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let (status, reason, message) = condition(&stored_cb(&api), "Ready");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "FieldConflict")
        );
        assert!(
            message.contains("helm") && message.contains("forceConflicts"),
            "{message}"
        );
        assert!(api.event_reasons().contains(&"FieldConflict".to_string()));
        assert!(
            daemon.calls().is_empty(),
            "no daemon calls before the injection is in place"
        );

        let mut forced = cb(json!({"target": {"forceConflicts": true}}));
        forced["status"] = api.get(CB_PATH).expect("cb")["status"].clone();
        api.insert(forced);
        api.clear_requests();
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let applies: Vec<_> = api
            .writes()
            .into_iter()
            .filter(|r| r.path == STS_PATH)
            .collect();
        assert_eq!(applies.len(), 1);
        assert!(
            applies[0].query.contains("force=true"),
            "{}",
            applies[0].query
        );
        assert_eq!(condition(&stored_cb(&api), "Ready").0, "True");
    }

    fn start_count(daemon: &FakeDaemon) -> usize {
        daemon
            .calls()
            .iter()
            .filter(|(w, _)| w == "start_backup")
            .count()
    }

    /// Issue 14.3: a database without a base backup gets one at once (not at
    /// the first slot of `0 3 * * *`), and is not Ready until it exists.
    #[tokio::test]
    async fn first_backup_is_taken_at_once_and_ready_waits_for_it() {
        let mut fresh = primary_status();
        fresh.last_backup = None;
        fresh.recovery_window = None;
        let (api, daemon) = setup(json!({"schedule": "0 3 * * *"}), Some(fresh.clone()));
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250501T100500Z".into()));
        // Before the first slot (03:00): without the first backup there
        // would be none until then.
        let ctx = context(&api, daemon.clone(), time("2025-05-01T01:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let cb = stored_cb(&api);
        let (ready, reason, message) = condition(&cb, "Ready");
        assert_eq!(
            (ready.as_str(), reason.as_str()),
            ("False", "NoBaseBackup"),
            "{message}"
        );
        assert_eq!(start_count(&daemon), 1, "first backup started at once");
        assert_eq!(
            cb.status
                .as_ref()
                .and_then(|s| s.backup_in_progress.as_deref()),
            Some("20250501T100500Z")
        );
        assert!(api.event_reasons().contains(&"BackupStarted".to_string()));

        // It completes; the daemon's answer still lags behind.
        daemon.jobs.lock().expect("lock").insert(
            "20250501T100500Z".into(),
            BackupJob {
                id: "20250501T100500Z".into(),
                state: BackupState::Succeeded,
                error: None,
                start_time: None,
                stop_time: None,
            },
        );
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        assert_eq!(start_count(&daemon), 1, "not started twice");
        // Then the daemon lists it: Ready.
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), primary_status());
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "Ready").1, "Protected");
        assert_eq!(start_count(&daemon), 1);
    }

    /// Issue 14.3: spec.backupRequest takes one backup per new value, and
    /// status.backupRequest says which value was handled.
    #[tokio::test]
    async fn backup_request_takes_one_backup_per_value() {
        let (api, daemon) = setup(
            json!({"backupRequest": "before-upgrade"}),
            Some(primary_status()),
        );
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250501T100500Z".into()));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.backup_request.as_deref(), Some("before-upgrade"));
        assert_eq!(
            status.backup_in_progress.as_deref(),
            Some("20250501T100500Z")
        );
        assert_eq!(start_count(&daemon), 1);
        daemon.jobs.lock().expect("lock").insert(
            "20250501T100500Z".into(),
            BackupJob {
                id: "20250501T100500Z".into(),
                state: BackupState::Succeeded,
                error: None,
                start_time: None,
                stop_time: None,
            },
        );
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        assert_eq!(start_count(&daemon), 1, "a handled value starts nothing");

        let mut cb = api.get(CB_PATH).expect("cb");
        cb["spec"]["backupRequest"] = json!("after-upgrade");
        api.insert(cb);
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250501T110000Z".into()));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.backup_request.as_deref(), Some("after-upgrade"));
        assert_eq!(start_count(&daemon), 2);
    }

    #[tokio::test]
    async fn each_backup_gets_its_own_succeeded_event() {
        let (api, daemon) = setup(json!({"backupRequest": "one"}), Some(primary_status()));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        for (token, id) in [("one", "20250501T100500Z"), ("two", "20250501T100600Z")] {
            let mut cb = api.get(CB_PATH).expect("cb");
            cb["spec"]["backupRequest"] = json!(token);
            api.insert(cb);
            *daemon.start.lock().expect("lock") = Some(StartBackup::Started(id.into()));
            reconcile(stored_cb(&api), ctx.clone())
                .await
                .expect("reconcile");
            daemon.jobs.lock().expect("lock").insert(
                id.into(),
                BackupJob {
                    id: id.into(),
                    state: BackupState::Succeeded,
                    error: None,
                    start_time: None,
                    stop_time: None,
                },
            );
            reconcile(stored_cb(&api), ctx.clone())
                .await
                .expect("reconcile");
        }
        assert_eq!(
            api.event_notes("BackupSucceeded"),
            [
                "base backup 20250501T100500Z completed",
                "base backup 20250501T100600Z completed"
            ]
        );
    }

    fn starts(daemon: &FakeDaemon) -> usize {
        daemon
            .calls()
            .iter()
            .filter(|(w, _)| w == "start_backup")
            .count()
    }

    /// With every place under the concurrent-backup cap taken, a due backup
    /// waits (its slot stays unhandled and it retries soon); once a place is
    /// free it starts for the same slot.
    #[tokio::test]
    async fn the_backup_cap_holds_a_due_backup_until_a_place_is_free() {
        let (api, daemon) = setup(json!({"schedule": "0 3 * * *"}), Some(primary_status()));
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250502T030005Z".into()));
        let now = time("2025-05-02T03:00:05Z");
        let Ok(mut ctx) = Arc::try_unwrap(context(&api, daemon.clone(), now)) else {
            panic!("a fresh context is not shared");
        };
        ctx.fleet = Arc::new(crate::fleet::Fleet {
            backups: crate::fleet::BackupGate::new(1),
            ..crate::fleet::Fleet::exact(now)
        });
        let ctx = Arc::new(ctx);
        ctx.fleet.backups.running("other/cb");
        let action = reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        assert_eq!(starts(&daemon), 0, "no place: not started");
        assert_eq!(action, Action::requeue(QUEUED + Duration::from_secs(1)));
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.last_scheduled_time, None, "the slot is still due");
        assert_eq!(ctx.metrics.backups_queued.get(), 1);

        ctx.fleet.backups.finished("other/cb");
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        assert_eq!(starts(&daemon), 1);
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(
            status.last_scheduled_time,
            Some(time("2025-05-02T03:00:00Z"))
        );
        assert!(
            !ctx.fleet.backups.try_start("third/cb"),
            "the place is held"
        );
    }

    /// With a backup window, the scheduled backup waits for this resource's
    /// offset (from its UID) and nextBackupTime says when it will start.
    #[tokio::test]
    async fn a_backup_window_moves_the_start_and_shows_it() {
        let (api, daemon) = setup(
            json!({"schedule": "0 3 * * *", "backupWindow": "1h"}),
            Some(primary_status()),
        );
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250502T030005Z".into()));
        let spread = crate::schedule::Spread {
            window: chrono::Duration::hours(1),
            key: spread_key("cb-uid"),
            resumed: time("2025-05-01T00:00:00Z"),
        };
        let slot = time("2025-05-02T03:00:00Z");
        let start = crate::schedule::decide(
            &Schedule::parse("0 3 * * *").expect("schedule"),
            crate::api::MissedBackupPolicy::RunOnce,
            Some(time("2025-05-01T03:00:00Z")),
            None,
            time("2025-05-01T00:00:00Z"),
            slot,
            &spread,
        )
        .next
        .expect("pending");
        assert!(
            start > slot + chrono::Duration::seconds(1),
            "offset {start}"
        );
        let ctx = |now| {
            let Ok(mut c) = Arc::try_unwrap(context(&api, daemon.clone(), now)) else {
                panic!("a fresh context is not shared");
            };
            c.fleet = Arc::new(crate::fleet::Fleet::exact(time("2025-05-01T00:00:00Z")));
            Arc::new(c)
        };
        reconcile(stored_cb(&api), ctx(slot + chrono::Duration::seconds(1)))
            .await
            .expect("reconcile");
        assert_eq!(starts(&daemon), 0, "before its offset");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.next_backup_time, Some(start));
        reconcile(stored_cb(&api), ctx(start))
            .await
            .expect("reconcile");
        assert_eq!(starts(&daemon), 1, "at its offset");
    }

    #[tokio::test]
    async fn schedule_starts_a_backup_and_follows_it_to_success() {
        let (api, daemon) = setup(json!({"schedule": "0 3 * * *"}), Some(primary_status()));
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("20250502T030005Z".into()));
        let now = time("2025-05-02T03:00:05Z");
        let ctx = context(&api, daemon.clone(), now);
        let action = reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert_eq!(action, Action::requeue(RETRY), "polls the running backup");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(
            status.backup_in_progress.as_deref(),
            Some("20250502T030005Z")
        );
        assert_eq!(
            status.last_scheduled_time,
            Some(time("2025-05-02T03:00:00Z"))
        );
        assert_eq!(status.next_backup_time, Some(time("2025-05-03T03:00:00Z")));
        assert!(api.event_reasons().contains(&"BackupStarted".to_string()));
        assert_eq!(
            daemon
                .calls()
                .iter()
                .filter(|(w, _)| w == "start_backup")
                .count(),
            1
        );

        daemon.jobs.lock().expect("lock").insert(
            "20250502T030005Z".into(),
            BackupJob {
                id: "20250502T030005Z".into(),
                state: BackupState::Succeeded,
                error: None,
                start_time: Some(now),
                stop_time: Some(now),
            },
        );
        api.clear_requests();
        let later = context(&api, daemon.clone(), time("2025-05-02T03:10:00Z"));
        let action = reconcile(stored_cb(&api), later).await.expect("reconcile");
        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "BackupSucceeded").0, "True");
        assert!(cb
            .status
            .as_ref()
            .expect("status")
            .backup_in_progress
            .is_none());
        assert_eq!(api.event_reasons(), vec!["BackupSucceeded".to_string()]);
        assert_eq!(
            daemon
                .calls()
                .iter()
                .filter(|(w, _)| w == "start_backup")
                .count(),
            1,
            "not started twice"
        );
        assert_eq!(action, Action::requeue(REFRESH));
    }

    #[tokio::test]
    async fn failed_backup_is_a_condition_and_a_warning() {
        let (api, daemon) = setup(json!({"schedule": "0 3 * * *"}), Some(primary_status()));
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["status"] =
            json!({"backupInProgress": "B1", "lastScheduledTime": "2025-05-02T03:00:00Z"});
        api.insert(obj);
        daemon.jobs.lock().expect("lock").insert(
            "B1".into(),
            BackupJob {
                id: "B1".into(),
                state: BackupState::Failed,
                error: Some("pg_backup_start: permission denied".into()),
                start_time: None,
                stop_time: None,
            },
        );
        let ctx = context(&api, daemon, time("2025-05-02T03:10:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let (status, reason, message) = condition(&stored_cb(&api), "BackupSucceeded");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "BackupFailed")
        );
        assert!(message.contains("permission denied"), "{message}");
        assert!(api.event_reasons().contains(&"BackupFailed".to_string()));
    }

    #[tokio::test]
    async fn suspend_stops_scheduled_backups() {
        let (api, daemon) = setup(
            json!({"schedule": "0 3 * * *", "suspend": true}),
            Some(primary_status()),
        );
        *daemon.start.lock().expect("lock") = Some(StartBackup::Started("X".into()));
        let ctx = context(&api, daemon.clone(), time("2025-05-02T03:00:05Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert!(daemon.calls().iter().all(|(w, _)| w != "start_backup"));
        let status = stored_cb(&api).status.clone().expect("status");
        assert!(status.next_backup_time.is_none() && status.backup_in_progress.is_none());
    }

    #[tokio::test]
    async fn invalid_schedule_is_reported() {
        let (api, daemon) = setup(json!({"schedule": "0 3 * * * *"}), Some(primary_status()));
        let ctx = context(&api, daemon, time("2025-05-02T03:00:05Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let (status, reason, message) = condition(&stored_cb(&api), "BackupSucceeded");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "InvalidSchedule")
        );
        assert!(message.contains("found 6 fields"), "{message}");
        assert!(api.event_reasons().contains(&"InvalidSchedule".to_string()));
    }

    #[tokio::test]
    async fn failing_archive_is_reported() {
        let mut s = primary_status();
        s.archiving.last_failed_wal = Some("000000010000000000000008".into());
        s.archiving.last_failed_time = Some(time("2025-05-01T10:01:00Z"));
        s.archiving.last_error = Some("s3: AccessDenied".into());
        let (api, daemon) = setup(json!({}), Some(s));
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        let (status, reason, message) = condition(&cb, "Archiving");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "ArchiveFailing")
        );
        assert!(
            message.contains("AccessDenied") && message.contains("000000010000000000000008"),
            "{message}"
        );
        assert_eq!(condition(&cb, "Ready").0, "False");
        assert!(api.event_reasons().contains(&"ArchiveFailing".to_string()));
    }

    #[test]
    fn archive_hole_messages() {
        let hole = |after: Option<&str>| {
            let mut s = primary_status();
            s.continuity = Some(crate::daemon_client::Continuity {
                checked_through: after.map(String::from),
                first_hole: Some(crate::daemon_client::ArchiveHole {
                    missing: "000000010000000000000005".into(),
                    after: after.map(String::from),
                }),
            });
            s
        };
        let healthy = {
            let mut s = primary_status();
            s.continuity = Some(crate::daemon_client::Continuity {
                checked_through: Some("000000010000000000000007".into()),
                first_hole: None,
            });
            s
        };
        let failing = {
            let mut s = hole(Some("000000010000000000000004"));
            s.archiving.last_failed_wal = Some("000000010000000000000008".into());
            s.archiving.last_failed_time = Some(time("2025-05-01T10:01:00Z"));
            s.archiving.last_error = Some("s3: AccessDenied".into());
            s
        };
        // (what, status, expected fragments; empty: no hole)
        let cases: Vec<(&str, DaemonStatus, Vec<&str>)> = vec![
            ("an older daemon says nothing", primary_status(), vec![]),
            ("continuous", healthy, vec![]),
            (
                "a hole after a segment",
                hole(Some("000000010000000000000004")),
                vec![
                    "000000010000000000000005 is missing after 000000010000000000000004",
                    "window ends at 000000010000000000000004",
                ],
            ),
            (
                "the oldest backup's start is missing",
                hole(None),
                vec!["000000010000000000000005 is missing, and the oldest backup needs it"],
            ),
            (
                "a hole while archiving fails",
                failing,
                vec![
                    "000000010000000000000005 is missing",
                    "archiving 000000010000000000000008 also fails: s3: AccessDenied",
                ],
            ),
        ];
        for (what, s, want) in cases {
            match archive_hole(&s) {
                None => assert!(want.is_empty(), "{what}: no hole reported"),
                Some(msg) => {
                    assert!(!want.is_empty(), "{what}: {msg}");
                    for w in want {
                        assert!(msg.contains(w), "{what}: {msg}");
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn archive_hole_is_a_condition_an_event_and_the_end_of_the_window() {
        let mut s = primary_status();
        s.continuity = Some(crate::daemon_client::Continuity {
            checked_through: Some("000000010000000000000004".into()),
            first_hole: Some(crate::daemon_client::ArchiveHole {
                missing: "000000010000000000000005".into(),
                after: Some("000000010000000000000004".into()),
            }),
        });
        if let Some(w) = s.recovery_window.as_mut() {
            w.last_archived_wal = Some("000000010000000000000004".into());
        }
        let (api, daemon) = setup(json!({}), Some(s));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let cb = stored_cb(&api);
        let (status, reason, message) = condition(&cb, "Archiving");
        assert_eq!((status.as_str(), reason.as_str()), ("False", "ArchiveHole"));
        assert!(message.contains("000000010000000000000005"), "{message}");
        let (ready, ready_reason, _) = condition(&cb, "Ready");
        assert_eq!(
            (ready.as_str(), ready_reason.as_str()),
            ("False", "ArchiveHole")
        );
        let st = cb.status.clone().expect("status");
        assert_eq!(
            st.last_recoverable_wal.as_deref(),
            Some("000000010000000000000004"),
            "the window ends before the hole"
        );
        // Archiving itself goes on: the daemon's own view is still mirrored.
        assert_eq!(
            st.last_archived_wal.as_deref(),
            Some("000000010000000000000007")
        );
        let warnings: Vec<Value> = api
            .requests()
            .into_iter()
            .filter(|r| r.path.contains("/events") && r.body["reason"] == "ArchiveHole")
            .map(|r| r.body)
            .collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0]["type"], "Warning");
        assert!(!api.event_reasons().contains(&"Protected".to_string()));

        // The same hole again: no new write, no second Event.
        api.clear_requests();
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("second reconcile");
        assert!(api.writes().is_empty(), "{:?}", api.writes());

        // Repaired: Archiving and Ready come back, the window reaches the end.
        let mut repaired = primary_status();
        repaired.continuity = Some(crate::daemon_client::Continuity {
            checked_through: Some("000000010000000000000007".into()),
            first_hole: None,
        });
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), repaired);
        reconcile(stored_cb(&api), ctx)
            .await
            .expect("third reconcile");
        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "Archiving").0, "True");
        assert_eq!(condition(&cb, "Ready").1, "Protected");
        assert_eq!(
            cb.status
                .as_ref()
                .and_then(|s| s.last_recoverable_wal.as_deref()),
            Some("000000010000000000000007")
        );
    }

    #[tokio::test]
    async fn archive_backlog_is_the_ready_count_not_the_time_since_the_last_segment() {
        let mut s = primary_status();
        s.archiving.ready_count = 3;
        s.archiving.oldest_ready_time = Some(time("2025-05-01T15:58:00Z"));
        let (api, daemon) = setup(json!({}), Some(s));
        // Hours after the last segment: an idle database, not a lagging one.
        let ctx = context(&api, daemon.clone(), time("2025-05-01T16:00:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.archive_backlog, Some(3));
        assert_eq!(
            status.archive_backlog_since,
            Some(time("2025-05-01T15:58:00Z"))
        );

        let mut s = primary_status();
        s.archiving.ready_count = 0;
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), s);
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(status.archive_backlog, Some(0));
        assert_eq!(status.archive_backlog_since, None, "nothing waits: no lag");
    }

    #[tokio::test]
    async fn a_fresh_daemon_does_not_blank_the_last_archived_wal() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let ctx = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");

        // The primary pod is recreated: its daemon has archived nothing yet.
        let mut fresh = primary_status();
        fresh.archiving.last_archived_wal = None;
        fresh.archiving.last_archived_time = None;
        fresh.archiving.archived_count = 0;
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), fresh);
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        assert_eq!(
            status.last_archived_wal.as_deref(),
            Some("000000010000000000000007")
        );
        assert_eq!(
            status.last_archived_time,
            Some(time("2025-05-01T10:00:00Z"))
        );
        let (s, _, message) = condition(&cb, "Archiving");
        assert_eq!(s, "True");
        assert!(message.contains("000000010000000000000007"), "{message}");

        // Once it archives, the newer segment replaces the kept one.
        let mut later = primary_status();
        later.archiving.last_archived_wal = Some("000000010000000000000009".into());
        later.archiving.last_archived_time = Some(time("2025-05-01T10:06:00Z"));
        daemon
            .statuses
            .lock()
            .expect("lock")
            .insert(POD_URL.into(), later);
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(
            status.last_archived_wal.as_deref(),
            Some("000000010000000000000009")
        );
        assert_eq!(
            status.last_archived_time,
            Some(time("2025-05-01T10:06:00Z"))
        );
    }

    #[tokio::test]
    async fn a_long_archive_error_is_cut_in_the_condition() {
        let mut s = primary_status();
        s.archiving.last_failed_wal = Some("000000010000000000000008".into());
        s.archiving.last_failed_time = Some(time("2025-05-01T10:01:00Z"));
        s.archiving.last_error = Some(format!(
            "upload s3://b/wal: dispatch failure ({})",
            "DispatchFailure { source: ConnectorError { .. } } ".repeat(100)
        ));
        let (api, daemon) = setup(json!({}), Some(s));
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let (_, reason, message) = condition(&stored_cb(&api), "Archiving");
        assert_eq!(reason, "ArchiveFailing");
        assert!(
            message.len() <= 400 && message.contains("upload s3://b/wal: dispatch failure"),
            "{} bytes: {message}",
            message.len()
        );
    }

    #[tokio::test]
    async fn with_nothing_kept_the_newest_archived_wal_comes_from_the_archive_listing() {
        let mut fresh = primary_status();
        fresh.archiving.last_archived_wal = None;
        fresh.archiving.last_archived_time = None;
        if let Some(w) = fresh.recovery_window.as_mut() {
            w.last_archived_wal = Some("00000001000000000000000A".into());
        }
        let (api, daemon) = setup(json!({}), Some(fresh));
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let status = stored_cb(&api).status.clone().expect("status");
        assert_eq!(
            status.last_archived_wal.as_deref(),
            Some("00000001000000000000000A")
        );
        assert_eq!(status.last_archived_time, None, "not invented");
    }

    #[tokio::test]
    async fn unreachable_daemon_leaves_known_status_and_waits() {
        let (api, daemon) = setup(json!({}), None);
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["status"] = json!({"firstRecoverabilityPoint": "2025-05-01T03:02:00Z"});
        api.insert(obj);
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        let (_, reason, message) = condition(&cb, "Ready");
        assert_eq!(reason, "WaitingForPrimary");
        assert!(message.contains("pg-0"), "{message}");
        assert_eq!(condition(&cb, "Archiving").0, "Unknown");
        assert_eq!(
            cb.status
                .as_ref()
                .and_then(|s| s.first_recoverability_point),
            Some(time("2025-05-01T03:02:00Z"))
        );
    }

    #[tokio::test]
    async fn api_errors_end_in_a_condition_and_an_event() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        api.deny_get(STS_PATH);
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        let err = reconcile(stored_cb(&api), ctx)
            .await
            .expect_err("GET fails");
        assert!(err.to_string().contains("reading StatefulSet pg"), "{err}");
        let (status, reason, message) = condition(&stored_cb(&api), "Ready");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "KubernetesApiError")
        );
        assert!(message.contains("forbidden"), "{message}");
        assert!(api
            .event_reasons()
            .contains(&"KubernetesApiError".to_string()));
    }

    /// The same context (failure streaks, backup places) at another time.
    fn later(
        ctx: &Arc<Context>,
        api: &FakeApi,
        daemon: Arc<FakeDaemon>,
        now: &str,
    ) -> Arc<Context> {
        let Ok(mut next) = Arc::try_unwrap(context(api, daemon, time(now))) else {
            panic!("a fresh context is not shared");
        };
        next.fleet = ctx.fleet.clone();
        Arc::new(next)
    }

    /// A restart's connection storm or a burst of 5xx/429 answers is retried
    /// with growing backoff and writes nothing into status or Events; only
    /// a failure that persists is reported, and success forgets the streak.
    #[tokio::test]
    async fn transient_errors_write_no_status_until_they_persist() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        api.break_get(STS_PATH);
        let first = context(&api, daemon.clone(), time("2025-05-01T10:05:00Z"));
        let mut last = first.clone();
        for (at, backoff_secs) in [("2025-05-01T10:05:00Z", 5), ("2025-05-01T10:05:30Z", 10)] {
            let ctx = later(&first, &api, daemon.clone(), at);
            let err = reconcile(stored_cb(&api), ctx.clone())
                .await
                .expect_err("GET fails");
            assert!(err.transient(), "{err}");
            assert_eq!(
                backoff(stored_cb(&api), &err, ctx.clone()),
                Action::requeue(Duration::from_secs(backoff_secs)),
                "{at}"
            );
            last = ctx;
        }
        assert!(api.writes().is_empty(), "{:?}", api.writes());
        assert!(api.event_reasons().is_empty());
        // Each context has its own metrics: the last one saw one quiet retry.
        assert_eq!(last.metrics.transient_errors.get(), 1);

        let persisting = later(&first, &api, daemon.clone(), "2025-05-01T10:07:30Z");
        reconcile(stored_cb(&api), persisting)
            .await
            .expect_err("still failing");
        let (status, reason, _) = condition(&stored_cb(&api), "Ready");
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "KubernetesApiError")
        );
        assert!(api
            .event_reasons()
            .contains(&"KubernetesApiError".to_string()));

        api.heal_get(STS_PATH);
        let healed = later(&first, &api, daemon, "2025-05-01T10:08:00Z");
        reconcile(stored_cb(&api), healed.clone())
            .await
            .expect("healed");
        assert!(healed
            .fleet
            .failures
            .current("ContinuousBackup/db/pg-backup")
            .is_none());
    }

    #[tokio::test]
    async fn a_new_resource_gets_the_finalizer_first() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["metadata"]["finalizers"] = json!(null);
        api.insert(obj);
        let ctx = context(&api, daemon, time("2025-05-01T10:05:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let writes = api.writes();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert!(writes[0].content_type.contains("json-patch") && writes[0].path == CB_PATH);
        assert_eq!(
            api.get(CB_PATH).expect("cb")["metadata"]["finalizers"][0],
            CONTINUOUS_BACKUP_FINALIZER
        );
    }

    #[tokio::test]
    async fn deletion_removes_the_injection_and_never_deletes_anything() {
        let (api, daemon) = setup(json!({}), Some(primary_status()));
        let mut sts = statefulset();
        sts["metadata"]["managedFields"] =
            json!([{"manager": "walden-operator", "operation": "Apply", "apiVersion": "apps/v1"}]);
        api.insert(sts);
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["metadata"]["deletionTimestamp"] = json!("2025-05-01T11:00:00Z");
        api.insert(obj);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T11:00:01Z"));
        reconcile(stored_cb(&api), ctx).await.expect("cleanup");

        let writes = api.writes();
        let release = writes
            .iter()
            .find(|r| r.path == STS_PATH)
            .expect("release apply");
        assert!(release.content_type.contains("apply-patch"));
        assert!(
            release.body.get("spec").is_none(),
            "an identity-only apply: {}",
            release.body
        );
        assert!(release.query.contains("fieldManager=walden-operator"));
        assert!(writes.iter().all(|r| r.method != "DELETE"), "{writes:?}");
        assert!(
            writes
                .iter()
                .any(|r| r.path == CB_PATH && r.content_type.contains("json-patch")),
            "finalizer removed: {writes:?}"
        );
        assert!(api
            .event_reasons()
            .contains(&"InjectionRemoved".to_string()));
        // Backups live in storage the operator cannot reach; it does not even ask the daemon.
        assert!(daemon.calls().is_empty());
    }

    const PROOF_PATH: &str = "/api/v1/namespaces/db/pods/pg-backup-restore-test";
    const PROOF_REPORT: &str = r#"{"passed":true,"reason":"Passed","message":"restored backup 20250501T030000Z and recovered to 0/7000060","backup":"20250501T030000Z","reachedLsn":"0/7000060","reachedTime":"2025-05-01T04:59:00Z","replaySeconds":3.5,"amcheck":{"name":"pg_amcheck","passed":true},"checks":[{"name":"rows","passed":true}]}"#;

    fn proof_spec() -> Value {
        json!({"restoreTest": {"schedule": "0 5 * * *", "target": "Random",
            "checks": [{"name": "rows", "sql": "select count(*) > 0 from orders"}]}})
    }

    /// A first reconcile before any proof is due mirrors the archive's
    /// window; the second, at the slot, starts the proof.
    async fn started_proof(api: &FakeApi, daemon: &Arc<FakeDaemon>) {
        let early = context(api, daemon.clone(), time("2025-05-01T04:00:00Z"));
        reconcile(stored_cb(api), early).await.expect("reconcile");
        assert!(api.get(PROOF_PATH).is_none(), "nothing due before 05:00");
        let at = context(api, daemon.clone(), time("2025-05-01T05:00:05Z"));
        reconcile(stored_cb(api), at).await.expect("reconcile");
    }

    fn set_pod_status(api: &FakeApi, status: Value) {
        let mut pod = api.get(PROOF_PATH).expect("proof pod");
        pod["status"] = status;
        api.insert(pod);
    }

    fn pod_posts(api: &FakeApi) -> usize {
        api.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v1/namespaces/db/pods")
            .count()
    }

    #[tokio::test]
    async fn a_restore_proof_runs_on_schedule_and_is_recorded() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        let pod: Pod =
            serde_json::from_value(api.get(PROOF_PATH).expect("proof pod")).expect("pod");
        let spec = pod.spec.clone().expect("spec");
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.active_deadline_seconds, Some(3600));
        let proof = &spec.containers[0];
        assert_eq!(
            proof.image.as_deref(),
            Some("postgres:16"),
            "the protected container's image"
        );
        let env: Vec<(String, String)> = proof
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        assert!(
            env.contains(&("WALDEN_READ_ONLY".into(), "true".into())),
            "{env:?}"
        );
        assert!(env
            .iter()
            .any(|(k, v)| k == "WALDEN_RESTORE_TEST_CHECKS" && v.contains("from orders")));
        let restore = &spec.init_containers.as_ref().expect("init")[1];
        let args = restore.command.clone().unwrap_or_default().join(" ");
        assert!(args.contains("--target-lsn"), "Random target: {args}");
        assert_eq!(
            pod.metadata
                .owner_references
                .as_ref()
                .map(|o| o[0].uid.clone()),
            Some("cb-uid".to_string())
        );
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        let run = status
            .restore_test_in_progress
            .clone()
            .expect("in progress");
        assert_eq!(run.started_at, time("2025-05-01T05:00:05Z"));
        let lsn = run.target_lsn.clone().expect("a random LSN");
        assert_eq!(
            pod.annotations().get(specs::RESTORE_TEST_TARGET_ANNOTATION),
            Some(&lsn)
        );
        assert!(args.contains(&lsn), "{args}");
        assert_eq!(condition(&cb, "Recoverable").1, "NotYetProven");
        assert!(api
            .event_reasons()
            .contains(&"RestoreTestStarted".to_string()));
        assert_eq!(pod_posts(&api), 1);

        // Still restoring: nothing new is created, the proof is polled.
        set_pod_status(
            &api,
            json!({"phase": "Pending", "initContainerStatuses": [
            {"name": "walden-restore", "state": {"running": {}}}]}),
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:02:00Z"));
        let action = reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        assert_eq!(pod_posts(&api), 1, "never two proofs at once");

        set_pod_status(
            &api,
            json!({"phase": "Succeeded",
            "initContainerStatuses": [{"name": "walden-restore", "state": {"terminated": {"exitCode": 0,
                "message": "restored backup 20250501T030000Z to lsn", "startedAt": "2025-05-01T05:00:10Z", "finishedAt": "2025-05-01T05:01:10Z"}}}],
            "containerStatuses": [{"name": "restore-test", "state": {"terminated": {"exitCode": 0, "message": PROOF_REPORT}}}]}),
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:03:00Z"));
        reconcile(stored_cb(&api), ctx.clone())
            .await
            .expect("reconcile");
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        assert!(status.restore_test_in_progress.is_none());
        let last = status.last_restore_test.clone().expect("recorded");
        assert_eq!(last.result, crate::api::RestoreTestResult::Succeeded);
        assert_eq!(last.target, format!("lsn {lsn}"));
        assert_eq!(last.backup_used.as_deref(), Some("20250501T030000Z"));
        assert_eq!(last.restore_seconds, Some(60.0));
        assert_eq!(last.replay_seconds, Some(3.5));
        assert_eq!(
            last.reached.as_ref().and_then(|r| r.lsn.as_deref()),
            Some("0/7000060")
        );
        assert_eq!(last.checks.len(), 2);
        assert_eq!(
            status.last_successful_restore_test,
            Some(time("2025-05-01T05:03:00Z"))
        );
        assert_eq!(condition(&cb, "Recoverable").0, "True");
        assert!(api.get(PROOF_PATH).is_none(), "the proof pod is removed");
        assert!(api
            .event_reasons()
            .contains(&"RestoreTestSucceeded".to_string()));
        let metrics = ctx.metrics.encode().expect("metrics");
        assert!(
            metrics.contains(r#"walden_restore_test_result{namespace="db",name="pg-backup"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(
                r#"walden_restore_test_duration_seconds{namespace="db",name="pg-backup"} 175"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains("walden_restore_test_last_success_timestamp_seconds"),
            "{metrics}"
        );

        // Older than maxAgeSeconds (48 h) with no newer proof: not evidence any more.
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["spec"]["suspend"] = json!(true);
        api.insert(obj);
        api.clear_requests();
        let ctx = context(&api, daemon.clone(), time("2025-05-03T05:03:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        let (st, reason, _) = condition(&cb, "Recoverable");
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", "RestoreTestTooOld")
        );
        assert!(api
            .event_reasons()
            .contains(&"RestoreTestTooOld".to_string()));
        assert_eq!(pod_posts(&api), 0, "suspended: no proof started");
    }

    #[tokio::test]
    async fn a_failed_restore_makes_the_archive_not_recoverable() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        set_pod_status(
            &api,
            json!({"phase": "Failed", "initContainerStatuses": [
            {"name": "walden-restore", "state": {"terminated": {"exitCode": 1,
             "message": "restore: part-00001.tar.zst of backup 20250501T030000Z: checksum mismatch"}}}]}),
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:04:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        let last = cb
            .status
            .clone()
            .and_then(|s| s.last_restore_test)
            .expect("recorded");
        assert_eq!(last.result, crate::api::RestoreTestResult::Failed);
        assert_eq!(last.reason, "RestoreFailed");
        let (st, reason, msg) = condition(&cb, "Recoverable");
        assert_eq!(
            (st.as_str(), reason.as_str()),
            ("False", "RestoreTestFailed")
        );
        assert!(msg.contains("checksum mismatch"), "{msg}");
        assert!(api
            .event_notes("RestoreTestFailed")
            .iter()
            .any(|n| n.contains("checksum mismatch")));
        assert!(api.get(PROOF_PATH).is_none());
    }

    #[tokio::test]
    async fn a_proof_past_its_deadline_times_out_and_is_removed() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        set_pod_status(
            &api,
            json!({"phase": "Pending", "initContainerStatuses": [
            {"name": "walden-install", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}),
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:30:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert!(
            api.get(PROOF_PATH).is_some(),
            "inside the deadline it waits"
        );
        let ctx = context(&api, daemon.clone(), time("2025-05-01T06:01:06Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let cb = stored_cb(&api);
        let last = cb
            .status
            .clone()
            .and_then(|s| s.last_restore_test)
            .expect("recorded");
        assert_eq!(last.result, crate::api::RestoreTestResult::TimedOut);
        assert!(
            last.message.contains("ImagePullBackOff"),
            "{}",
            last.message
        );
        assert_eq!(condition(&cb, "Recoverable").1, "RestoreTestTimedOut");
        assert!(api.get(PROOF_PATH).is_none());
    }

    #[tokio::test]
    async fn a_vanished_proof_pod_is_a_failure_not_a_wait() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        // Evicted and garbage-collected, or deleted by hand.
        let pods: Api<Pod> = Api::namespaced(api.client(), NS);
        pods.delete("pg-backup-restore-test", &Default::default())
            .await
            .expect("delete");
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:10:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        let last = stored_cb(&api)
            .status
            .clone()
            .and_then(|s| s.last_restore_test)
            .expect("recorded");
        assert_eq!(last.reason, "PodLost");
    }

    #[tokio::test]
    async fn deleting_the_continuous_backup_cancels_a_proof_in_flight() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["metadata"]["deletionTimestamp"] = json!("2025-05-01T05:01:00Z");
        api.insert(obj);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:01:01Z"));
        reconcile(stored_cb(&api), ctx).await.expect("cleanup");
        assert!(api.get(PROOF_PATH).is_none(), "the proof pod is deleted");
        assert!(api
            .event_reasons()
            .contains(&"RestoreTestCancelled".to_string()));
    }

    #[tokio::test]
    async fn removing_restore_test_cancels_the_proof_in_flight() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        started_proof(&api, &daemon).await;
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["spec"]
            .as_object_mut()
            .expect("spec")
            .remove("restoreTest");
        api.insert(obj);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:02:00Z"));
        reconcile(stored_cb(&api), ctx).await.expect("reconcile");
        assert!(api.get(PROOF_PATH).is_none(), "the proof pod is deleted");
        let cb = stored_cb(&api);
        let status = cb.status.clone().expect("status");
        assert!(status.restore_test_in_progress.is_none());
        assert!(status.conditions.iter().all(|c| c.type_ != "Recoverable"));
        assert!(api
            .event_reasons()
            .contains(&"RestoreTestCancelled".to_string()));
    }

    #[tokio::test]
    async fn a_pod_of_that_name_not_made_by_walden_is_never_touched() {
        let (api, daemon) = setup(proof_spec(), Some(primary_status()));
        api.insert(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "pg-backup-restore-test", "namespace": NS, "labels": {"app": "mine"}}}));
        let early = context(&api, daemon.clone(), time("2025-05-01T04:00:00Z"));
        reconcile(stored_cb(&api), early).await.expect("reconcile");
        let at = context(&api, daemon.clone(), time("2025-05-01T05:00:05Z"));
        reconcile(stored_cb(&api), at).await.expect("reconcile");
        let cb = stored_cb(&api);
        assert_eq!(condition(&cb, "Recoverable").1, "PodNameTaken");
        assert_eq!(pod_posts(&api), 0);
        assert!(api.writes().iter().all(|r| r.method != "DELETE"));
        assert_eq!(
            api.get(PROOF_PATH).expect("kept")["metadata"]["labels"]["app"],
            json!("mine")
        );
        // Deletion leaves it alone too.
        let mut obj = api.get(CB_PATH).expect("cb");
        obj["metadata"]["deletionTimestamp"] = json!("2025-05-01T05:01:00Z");
        api.insert(obj);
        let ctx = context(&api, daemon.clone(), time("2025-05-01T05:01:01Z"));
        reconcile(stored_cb(&api), ctx).await.expect("cleanup");
        assert!(api.get(PROOF_PATH).is_some());
    }
}
