//! What the Fork and Follower controllers share: both run PostgreSQL
//! instances restored from a ContinuousBackup's archive, as a StatefulSet
//! and a Service built from one [`InstancePlan`].

use super::{apply_if_changed, kube_err, set_condition, ApplyDecision, ConditionType, Desired};
use super::{Error, PendingEvent, Status};
use crate::specs::{self, InstancePlan};
use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::Api;

/// Applies the instance's Service and StatefulSet (each only when it
/// differs from what is there). Returns the Service's name and whether
/// anything was applied.
pub(crate) async fn apply(
    svc_api: &Api<Service>,
    sts_api: &Api<StatefulSet>,
    plan: &InstancePlan<'_>,
    current_sts: Option<&StatefulSet>,
) -> Result<(String, bool), Error> {
    let name = plan.name;
    let svc_name = specs::instance_service_name(plan.kind, name);
    let current_svc = svc_api
        .get_opt(&svc_name)
        .await
        .map_err(kube_err(format!("reading Service {svc_name}")))?;
    let svc = Desired::derived(apply_body(&specs::instance_service(plan))?);
    let mut changed =
        apply_if_changed(svc_api, &svc_name, current_svc.as_ref(), &svc, false, false)
            .await
            .map_err(kube_err(format!("applying Service {svc_name}")))?
            == ApplyDecision::Apply;
    let sts = Desired::derived(apply_body(&specs::instance_statefulset(plan))?);
    changed |= apply_if_changed(sts_api, name, current_sts, &sts, false, false)
        .await
        .map_err(kube_err(format!("applying StatefulSet {name}")))?
        == ApplyDecision::Apply;
    Ok((svc_name, changed))
}

/// An object as a server-side-apply body (which needs its apiVersion and kind).
pub(crate) fn apply_body<K>(obj: &K) -> Result<serde_json::Value, Error>
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize,
{
    let mut v = serde_json::to_value(obj).map_err(|source| Error::Serialize {
        what: K::kind(&()).to_string(),
        source,
    })?;
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), K::api_version(&()).into());
        map.insert("kind".into(), K::kind(&()).into());
    }
    Ok(v)
}

/// `SourceAvailable=False` for an independent Fork or promoted Follower
/// whose source is gone: worth knowing, not a failure.
pub(crate) fn source_gone(
    conditions: &mut Vec<Condition>,
    msg: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
    events: &mut Vec<PendingEvent>,
) {
    let msg = format!("{msg}; not needed any more (recovery finished), so nothing changes");
    if set_condition(
        conditions,
        ConditionType::SourceAvailable,
        Status::False,
        "SourceGone",
        &msg,
        generation,
        now,
    ) {
        events.push(PendingEvent::normal("SourceGone", "Resolve", msg));
    }
}
