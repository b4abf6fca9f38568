//! One controller per kind, plus what they share: the context, errors,
//! conditions, change-only server-side apply, and Events.
//!
//! Every controller writes only when something changed: objects are compared
//! with the desired apply body before a PATCH, and status is patched only when
//! it differs. Expected problems (a missing target, a bad recovery target, an
//! unreachable daemon) become a status condition and an Event; API failures
//! are returned as errors, which also land in a condition and an Event.

pub mod continuous_backup;
pub mod follower;
pub mod fork;
mod instance;
pub mod restore_test;

use crate::api::{
    ContinuousBackup, ContinuousBackupStatus, FollowerStatus, ForkStatus, SourceSpec, StorageSpec,
};
use crate::daemon_client::{ApiToken, DaemonApi, DaemonError, TokenMemory};
use crate::events::{Event, EventType, Recorder};
use crate::metrics::Metrics;
use crate::specs::{self, OperatorConfig, SpecError, FIELD_MANAGER};
use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::finalizer::Error as FinalizerError;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::fmt::Debug;
use std::sync::Arc;

/// Source of "now", injectable so schedules can be tested.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub daemon: Arc<dyn DaemonApi>,
    pub recorder: Recorder,
    pub config: OperatorConfig,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    /// Token Secrets as last read, so a rotation's old token stays known.
    pub tokens: Arc<TokenMemory>,
    pub fleet: Arc<crate::fleet::Fleet>,
}

impl Context {
    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }
}

/// Failures of a reconcile (each also reported as a condition and an Event).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0} has no namespace")]
    NoNamespace(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("token generation failed: {0}")]
    Random(String),
    #[error("serializing {what}: {source}")]
    Serialize {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

impl Error {
    /// Reason used in conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => "KubernetesApiError",
            Error::NoNamespace(_) => "NoNamespace",
            Error::Spec(e) => e.reason(),
            Error::Daemon(_) => "DaemonError",
            Error::Random(_) => "TokenGenerationFailed",
            Error::Serialize { .. } => "InternalError",
            Error::Finalizer(e) => match e.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => {
                    inner.reason()
                }
                _ => "FinalizerFailed",
            },
        }
    }
}

impl Error {
    /// A passing failure of the Kubernetes client (throttling, a failed
    /// connection, an apiserver restart): retried quietly until it persists.
    pub fn transient(&self) -> bool {
        match self {
            Error::Kube { source, .. } => crate::fleet::transient_kube(source),
            Error::Finalizer(e) => match e.as_ref() {
                FinalizerError::ApplyFailed(inner) | FinalizerError::CleanupFailed(inner) => {
                    inner.transient()
                }
                FinalizerError::AddFinalizer(k) | FinalizerError::RemoveFinalizer(k) => {
                    crate::fleet::transient_kube(k)
                }
                _ => false,
            },
            _ => false,
        }
    }
}

/// Attaches what was being done to a kube error.
pub(crate) fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

pub(crate) fn namespace_of<K: Resource>(obj: &K) -> Result<String, Error> {
    obj.meta()
        .namespace
        .clone()
        .ok_or_else(|| Error::NoNamespace(obj.meta().name.clone().unwrap_or_default()))
}

/// Whether every field of `desired` is already present in `current`.
///
/// Objects compare key by key; lists of objects compare element-wise (each
/// desired element contained in some current element, as server-side apply
/// merges keyed lists); other values compare by equality.
pub fn contains(current: &Value, desired: &Value) -> bool {
    match (current, desired) {
        (Value::Object(c), Value::Object(d)) => d
            .iter()
            .all(|(k, dv)| c.get(k).is_some_and(|cv| contains(cv, dv))),
        (Value::Array(c), Value::Array(d)) if d.iter().all(Value::is_object) => {
            d.iter().all(|dv| c.iter().any(|cv| contains(cv, dv)))
        }
        (c, d) => c == d,
    }
}

/// Annotation on every object the operator applies: `<inputs>.<body>`, short
/// hashes of what the body was built from and of the body itself.
///
/// Server-side apply only releases a field when a body without it is sent.
/// Comparing the live object with the desired body cannot tell "nothing to
/// do" from "a field must go" (the live object still contains the smaller
/// body), so the operator compares its record of what it last applied.
pub const APPLIED_ANNOTATION: &str = "walden.dev/applied";

/// What `decide_apply` concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyDecision {
    /// Send the full desired body (new object, new inputs, or drift).
    Apply,
    /// The live object is what the operator last applied and still holds it.
    Unchanged,
    /// Same inputs, but the operator now builds a different body: an
    /// operator upgrade changed its output. Callers that must not restart
    /// pods for that alone (protected primaries) keep the live object.
    HoldBack,
}

/// A desired apply body with its stamp (the [`APPLIED_ANNOTATION`] value)
/// written into its metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub body: Value,
    pub stamp: String,
}

fn short_hash(value: &Value) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(value.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

impl Desired {
    /// `inputs`: what the body is derived from that the user controls (the
    /// resource's spec, chosen images, fields read from the user's objects).
    pub fn new(mut body: Value, inputs: &Value) -> Desired {
        let stamp = format!("{}.{}", short_hash(inputs), short_hash(&body));
        if let Some(meta) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(a) = annotations.as_object_mut() {
                a.insert(APPLIED_ANNOTATION.to_string(), Value::String(stamp.clone()));
            }
        }
        Desired { body, stamp }
    }

    /// A body derived from nothing but the owner resource (forks, followers,
    /// Services): its own hash is its inputs, so it never holds back.
    pub fn derived(body: Value) -> Desired {
        let inputs = body.clone();
        Desired::new(body, &inputs)
    }
}

/// Whether and how to apply `desired` over the live object (pure).
pub fn decide_apply(live: Option<&Value>, desired: &Desired) -> ApplyDecision {
    let Some(live) = live else {
        return ApplyDecision::Apply;
    };
    let Some(applied) = live["metadata"]["annotations"][APPLIED_ANNOTATION].as_str() else {
        return ApplyDecision::Apply;
    };
    let split = |s: &str| {
        s.split_once('.')
            .map(|(i, b)| (i.to_string(), b.to_string()))
    };
    let (Some((live_inputs, live_body)), Some((inputs, body))) =
        (split(applied), split(&desired.stamp))
    else {
        return ApplyDecision::Apply;
    };
    if live_inputs != inputs {
        return ApplyDecision::Apply;
    }
    if live_body != body {
        return ApplyDecision::HoldBack;
    }
    if contains(live, &desired.body) {
        ApplyDecision::Unchanged
    } else {
        // Someone else changed or removed fields the operator owns.
        ApplyDecision::Apply
    }
}

/// Applies `desired` as [`decide_apply`] says. With `hold_back` false a
/// `HoldBack` is applied too (objects whose change restarts nothing
/// precious). Returns the decision taken: only `Apply` wrote.
pub async fn apply_if_changed<K>(
    api: &Api<K>,
    name: &str,
    current: Option<&K>,
    desired: &Desired,
    force: bool,
    hold_back: bool,
) -> Result<ApplyDecision, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    let live = current
        .map(serde_json::to_value)
        .transpose()
        .map_err(kube::Error::SerdeError)?;
    let decision = match decide_apply(live.as_ref(), desired) {
        ApplyDecision::HoldBack if !hold_back => ApplyDecision::Apply,
        d => d,
    };
    if decision == ApplyDecision::Apply {
        let mut params = PatchParams::apply(FIELD_MANAGER);
        if force {
            params = params.force();
        }
        api.patch(name, &params, &Patch::Apply(&desired.body))
            .await?;
    }
    Ok(decision)
}

/// Reports broken CRD rules (see [`crate::rules`]) as `Ready=False Invalid`
/// and a Warning Event on the first report. Returns whether the spec is
/// invalid, in which case the caller changes nothing.
pub(crate) fn report_invalid(
    conditions: &mut Vec<Condition>,
    violations: &[crate::rules::Violation],
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) -> bool {
    if violations.is_empty() {
        return false;
    }
    let msg = crate::rules::describe(violations);
    if set_condition(
        conditions,
        ConditionType::Ready,
        Status::False,
        crate::rules::REASON,
        &msg,
        generation,
        now,
    ) {
        events.push(PendingEvent::warning(crate::rules::REASON, "Validate", msg));
    }
    true
}

/// A status with conditions, so a failed reconcile can be reported the same
/// way for every kind.
pub trait WithConditions {
    fn conditions_mut(&mut self) -> &mut Vec<Condition>;
}

impl WithConditions for ContinuousBackupStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

impl WithConditions for ForkStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

impl WithConditions for FollowerStatus {
    fn conditions_mut(&mut self) -> &mut Vec<Condition> {
        &mut self.conditions
    }
}

/// Puts a failed reconcile into the `Ready` condition and a Warning event.
pub async fn report_error<K, S>(ctx: &Context, obj: &K, current: Option<&S>, err: &Error)
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
    S: WithConditions + Default + Clone + Serialize + PartialEq,
{
    let mut status = current.cloned().unwrap_or_default();
    set_condition(
        status.conditions_mut(),
        ConditionType::Ready,
        Status::False,
        err.reason(),
        err.to_string(),
        obj.meta().generation,
        ctx.now(),
    );
    if let Ok(ns) = namespace_of(obj) {
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
        if let Err(e) = apply_status(&api, obj, current, &status).await {
            tracing::warn!(error = %e, "could not record the error in status");
        }
    }
    publish(
        ctx,
        obj,
        &[PendingEvent::warning(
            err.reason(),
            "Reconcile",
            err.to_string(),
        )],
    )
    .await;
}

/// The key of an object's failure streak.
fn streak_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// Ends a reconcile: a success forgets the object's failure streak; a
/// failure extends it and goes into status and Events when it is real, or
/// when a transient one has persisted (so a restart's connection storm or a
/// burst of 429s writes nothing to thousands of objects).
pub async fn conclude<K, S>(
    ctx: &Context,
    controller: &'static str,
    obj: &K,
    current: Option<&S>,
    result: &Result<kube::runtime::controller::Action, Error>,
    started: std::time::Instant,
) where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
    S: WithConditions + Default + Clone + Serialize + PartialEq,
{
    let key = streak_key(obj);
    match result {
        Ok(_) => ctx.fleet.failures.succeeded(&key),
        Err(err) => {
            let streak = ctx.fleet.failures.failed(&key, ctx.now());
            if streak.report(err.transient(), ctx.now()) {
                report_error(ctx, obj, current, err).await;
            } else {
                tracing::info!(error = %err, failures = streak.count, "transient failure; retrying");
                ctx.metrics.transient_errors.inc();
            }
        }
    }
    let error = result.as_ref().err().map(Error::reason);
    ctx.metrics.reconciled(controller, error, started.elapsed());
}

/// Every controller's error policy: retry with exponential backoff and
/// jitter along the object's failure streak.
pub fn backoff<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    _err: &Error,
    ctx: Arc<Context>,
) -> kube::runtime::controller::Action {
    let streak = ctx.fleet.failures.current(&streak_key(obj.as_ref()));
    let wait = streak.map_or(crate::fleet::BACKOFF_FIRST, |s| s.backoff());
    ctx.fleet.requeue(wait)
}

/// The controllers' shared runtime settings: how many reconciles run at
/// once per controller (bounded, so a restart with thousands of objects
/// does not open thousands of connections).
pub fn controller_config(ctx: &Context) -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(ctx.fleet.concurrency)
}

/// Patches the status subresource when it differs from the current one.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    desired: &S,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(desired) {
        return Ok(false);
    }
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": desired,
    });
    let name = obj.name_any();
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(kube_err(format!(
        "updating status of {} {name}",
        K::kind(&())
    )))?;
    Ok(true)
}

/// Condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// The condition types the controllers write, spelled once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Every kind: the resource does what it declares.
    Ready,
    /// ContinuousBackup: WAL reaches the archive.
    Archiving,
    /// ContinuousBackup: the last base backup succeeded.
    BackupSucceeded,
    /// ContinuousBackup: a recent restore proof succeeded.
    Recoverable,
    /// ContinuousBackup: the protected pods run the sidecar this operator injects.
    SidecarCurrent,
    /// ContinuousBackup: the daemons of the protected pods answer.
    DaemonsReachable,
    /// Fork: the ContinuousBackup it was restored from still exists.
    SourceAvailable,
    /// Follower: it streams from its primary.
    Streaming,
    /// Follower: it was promoted.
    Promoted,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ConditionType::Ready => "Ready",
            ConditionType::Archiving => "Archiving",
            ConditionType::BackupSucceeded => "BackupSucceeded",
            ConditionType::Recoverable => "Recoverable",
            ConditionType::SidecarCurrent => "SidecarCurrent",
            ConditionType::DaemonsReachable => "DaemonsReachable",
            ConditionType::SourceAvailable => "SourceAvailable",
            ConditionType::Streaming => "Streaming",
            ConditionType::Promoted => "Promoted",
        }
    }
}

/// Sets a condition, keeping its transition time when the status is unchanged.
/// Returns whether the status changed (a transition worth an Event).
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: ConditionType,
    status: Status,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: DateTime<Utc>,
) -> bool {
    let message = message.into();
    let ts = Time(k8s_openapi::jiff::Timestamp::from_second(now.timestamp()).unwrap_or_default());
    let type_ = type_.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let transition = c.status != status.as_str();
            let changed = transition || c.reason != reason;
            if transition {
                c.last_transition_time = ts;
            }
            c.status = status.as_str().to_string();
            c.reason = reason.to_string();
            c.message = message;
            c.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.as_str().to_string(),
                reason: reason.to_string(),
                message,
                observed_generation: generation,
                last_transition_time: ts,
            });
            true
        }
    }
}

/// An Event to publish once the status is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
    pub action: String,
}

impl PendingEvent {
    pub fn normal(reason: &str, action: &str, note: impl Into<String>) -> Self {
        PendingEvent {
            warning: false,
            reason: reason.into(),
            note: note.into(),
            action: action.into(),
        }
    }
    pub fn warning(reason: &str, action: &str, note: impl Into<String>) -> Self {
        PendingEvent {
            warning: true,
            reason: reason.into(),
            note: note.into(),
            action: action.into(),
        }
    }
}

/// Publishes Events; a failure to publish is logged, not fatal, so that it
/// cannot mask the problem being reported.
pub async fn publish<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    events: &[PendingEvent],
) {
    let reference = obj.object_ref(&());
    for e in events {
        let ev = Event {
            type_: if e.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: e.reason.clone(),
            note: Some(truncate(&e.note, 1000)),
            action: e.action.clone(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&ev, &reference).await {
            tracing::warn!(error = %err, reason = %e.reason, "could not publish event");
        }
    }
}

pub(crate) use walden_contract::truncate;

/// A fresh random API token (hex, 256 bits).
pub fn generate_token() -> Result<String, Error> {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).map_err(|e| Error::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Returns the daemon API token of `owner`, creating its Secret if needed,
/// with the token it held before a rotation this process saw.
/// An existing token is never rotated here: pods already mount it.
pub async fn ensure_token<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
) -> Result<ApiToken, Error> {
    let ns = namespace_of(owner)?;
    let name = specs::token_secret_name(&owner.meta().name.clone().unwrap_or_default());
    let token = secret_token(ctx, owner, &ns, &name).await?;
    Ok(ctx.tokens.remember(&format!("{ns}/{name}"), &token))
}

async fn secret_token<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    owner: &K,
    ns: &str,
    name: &str,
) -> Result<String, Error> {
    let name = name.to_string();
    let ns = ns.to_string();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(token) = read_token(&api, &name).await? {
        return Ok(token);
    }
    let token = generate_token()?;
    let owner_ref = owner_reference(owner)?;
    let secret = specs::token_secret(&name, &ns, owner_ref, &token);
    // Create, not apply: a concurrent creator's token must win, never be replaced.
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..Default::default()
    };
    match api.create(&params, &secret).await {
        Ok(_) => Ok(token),
        // Created concurrently: use whatever won.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            read_token(&api, &name).await?.ok_or_else(|| Error::Kube {
                action: format!("reading Secret {name}"),
                source: kube::Error::Api(s),
            })
        }
        Err(e) => Err(kube_err(format!("creating Secret {name}"))(e)),
    }
}

async fn read_token(api: &Api<Secret>, name: &str) -> Result<Option<String>, Error> {
    let secret = api
        .get_opt(name)
        .await
        .map_err(kube_err(format!("reading Secret {name}")))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|d| d.get(specs::TOKEN_KEY).cloned())
        .and_then(|b| String::from_utf8(b.0).ok())
        .filter(|t| !t.is_empty()))
}

/// When an object was created (whole seconds, as the API server keeps it).
pub fn created_at<K: Resource>(obj: &K) -> Option<DateTime<Utc>> {
    obj.meta()
        .creation_timestamp
        .as_ref()
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.0.as_second(), 0))
}

/// Controller owner reference to `owner`.
pub fn owner_reference<K: Resource<DynamicType = ()>>(owner: &K) -> Result<OwnerReference, Error> {
    owner
        .controller_owner_ref(&())
        .ok_or_else(|| Error::NoNamespace(owner.meta().name.clone().unwrap_or_default()))
}

/// Storage and defaults a fork or follower inherits from its source.
#[derive(Clone, Debug)]
pub struct ResolvedSource {
    pub storage: StorageSpec,
    pub credentials_secret: Option<String>,
    pub compression_level: i32,
    pub first_recoverability_point: Option<DateTime<Utc>>,
}

/// Resolves `spec.source`; `Ok(Err(message))` when the named
/// ContinuousBackup does not exist (yet).
pub async fn resolve_source(
    ctx: &Context,
    namespace: &str,
    source: &SourceSpec,
    credentials_override: Option<&str>,
    target_time: Option<DateTime<Utc>>,
) -> Result<Result<ResolvedSource, String>, Error> {
    if let Some(name) = &source.continuous_backup {
        let api: Api<ContinuousBackup> = Api::namespaced(ctx.client.clone(), namespace);
        let Some(cb) = api
            .get_opt(name)
            .await
            .map_err(kube_err(format!("reading ContinuousBackup {name}")))?
        else {
            return Ok(Err(format!(
                "ContinuousBackup {name} not found in namespace {namespace}"
            )));
        };
        // After pg_upgrade, earlier times live in an earlier archive.
        let chosen = crate::archives::for_target(&cb.spec.storage, cb.status.as_ref(), target_time);
        return Ok(Ok(ResolvedSource {
            storage: chosen.storage,
            credentials_secret: Some(
                credentials_override
                    .map(str::to_string)
                    .unwrap_or_else(|| cb.spec.target.credentials_secret.clone()),
            ),
            compression_level: cb.spec.compression_level(),
            first_recoverability_point: chosen.first_recoverability_point,
        }));
    }
    match &source.storage {
        Some(storage) => Ok(Ok(ResolvedSource {
            storage: storage.clone(),
            credentials_secret: credentials_override.map(str::to_string),
            compression_level: walden_contract::pod::DEFAULT_COMPRESSION_LEVEL,
            first_recoverability_point: None,
        })),
        None => Ok(Err(
            "spec.source needs continuousBackup or storage".to_string()
        )),
    }
}

/// Runs the three controllers until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let signal = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    futures::join!(
        continuous_backup::run(ctx.clone(), signal(rx.clone())),
        fork::run(ctx.clone(), signal(rx.clone())),
        follower::run(ctx.clone(), signal(rx)),
    );
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_table() {
        let cases = [
            ("equal scalars", json!(1), json!(1), true),
            ("different scalars", json!(1), json!(2), false),
            (
                "extra keys in current",
                json!({"a":1,"b":2}),
                json!({"a":1}),
                true,
            ),
            ("missing key", json!({"a":1}), json!({"b":1}), false),
            (
                "keyed list subset",
                json!({"c":[{"name":"pg","image":"x"},{"name":"walden","args":["a"]}]}),
                json!({"c":[{"name":"walden","args":["a"]}]}),
                true,
            ),
            (
                "keyed list element differs",
                json!({"c":[{"name":"walden","args":["a"]}]}),
                json!({"c":[{"name":"walden","args":["b"]}]}),
                false,
            ),
            (
                "scalar list must be equal",
                json!(["a", "b"]),
                json!(["a"]),
                false,
            ),
            (
                "scalar list equal",
                json!(["a", "b"]),
                json!(["a", "b"]),
                true,
            ),
        ];
        for (name, cur, des, want) in cases {
            assert_eq!(contains(&cur, &des), want, "{name}");
        }
    }

    fn sts(env: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
               "metadata": {"name": "pg", "namespace": "db"},
               "spec": {"template": {"spec": {"containers": [{"name": "walden", "env": env}]}}}})
    }

    /// The live object after applying `d` (what the apiserver would hold),
    /// plus fields of other managers.
    fn live_after(d: &Desired) -> Value {
        let mut live = d.body.clone();
        live["metadata"]["resourceVersion"] = json!("7");
        live["spec"]["replicas"] = json!(1);
        live
    }

    #[test]
    fn decide_apply_table() {
        let full_env =
            json!([{"name": "A", "value": "1"}, {"name": "WALDEN_RETENTION_FULL", "value": "3"}]);
        let small_env = json!([{"name": "A", "value": "1"}]);
        let with_retention = Desired::new(sts(full_env.clone()), &json!({"retention": 3}));
        let without_retention = Desired::new(sts(small_env.clone()), &json!({}));
        let same_inputs_new_body = Desired::new(sts(small_env.clone()), &json!({"retention": 3}));
        let mut drifted = live_after(&with_retention);
        drifted["spec"]["template"]["spec"]["containers"][0]["env"] = small_env.clone();
        let mut unstamped = live_after(&with_retention);
        unstamped["metadata"]
            .as_object_mut()
            .expect("metadata")
            .remove("annotations");
        let mut garbled = live_after(&with_retention);
        garbled["metadata"]["annotations"][APPLIED_ANNOTATION] = json!("nodot");
        let cases = [
            (
                "no live object",
                None,
                &with_retention,
                ApplyDecision::Apply,
            ),
            (
                "what was applied, untouched",
                Some(live_after(&with_retention)),
                &with_retention,
                ApplyDecision::Unchanged,
            ),
            (
                // The bug of issue 12.6: the live object contains the
                // smaller body, yet the retention env must be released.
                "inputs shrank: the smaller body is sent",
                Some(live_after(&with_retention)),
                &without_retention,
                ApplyDecision::Apply,
            ),
            (
                "same inputs, operator builds another body",
                Some(live_after(&with_retention)),
                &same_inputs_new_body,
                ApplyDecision::HoldBack,
            ),
            (
                "someone removed an owned field",
                Some(drifted),
                &with_retention,
                ApplyDecision::Apply,
            ),
            (
                "no stamp yet (applied by an older operator)",
                Some(unstamped),
                &with_retention,
                ApplyDecision::Apply,
            ),
            (
                "unreadable stamp",
                Some(garbled),
                &with_retention,
                ApplyDecision::Apply,
            ),
        ];
        for (name, live, desired, want) in cases {
            assert_eq!(decide_apply(live.as_ref(), desired), want, "{name}");
        }
    }

    #[test]
    fn the_stamp_is_in_the_body_and_stable() {
        let a = Desired::new(sts(json!([])), &json!({"x": 1}));
        let b = Desired::new(sts(json!([])), &json!({"x": 1}));
        assert_eq!(a, b);
        assert_eq!(
            a.body["metadata"]["annotations"][APPLIED_ANNOTATION],
            json!(a.stamp)
        );
        let (inputs, body) = a.stamp.split_once('.').expect("two hashes");
        assert_eq!((inputs.len(), body.len()), (16, 16));
        assert_ne!(
            Desired::new(sts(json!([])), &json!({"x": 2})).stamp,
            a.stamp
        );
    }

    #[test]
    fn set_condition_keeps_transition_time_until_status_changes() {
        let t0 = DateTime::parse_from_rfc3339("2025-01-01T00:00:00Z")
            .expect("t0")
            .with_timezone(&Utc);
        let t1 = t0 + chrono::Duration::minutes(5);
        let mut conds = Vec::new();
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            Status::False,
            "A",
            "m",
            Some(1),
            t0
        ));
        assert!(!set_condition(
            &mut conds,
            ConditionType::Ready,
            Status::False,
            "A",
            "m2",
            Some(1),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0.as_second(), t0.timestamp());
        assert_eq!(conds[0].message, "m2");
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            Status::False,
            "B",
            "m",
            Some(1),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0.as_second(), t0.timestamp());
        assert!(set_condition(
            &mut conds,
            ConditionType::Ready,
            Status::True,
            "B",
            "m",
            Some(2),
            t1
        ));
        assert_eq!(conds[0].last_transition_time.0.as_second(), t1.timestamp());
        assert_eq!(conds.len(), 1);
    }

    #[test]
    fn tokens_are_random_hex() {
        let a = generate_token().expect("token");
        let b = generate_token().expect("token");
        assert_eq!(a.len(), 64);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
