//! Leader election with a coordination.k8s.io/v1 Lease, so that only one
//! operator replica reconciles at a time. kube-rs has no elector of its own.

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;
use std::time::Duration;

/// What to do with a Lease as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAction {
    /// We hold it: refresh renewTime.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it.
    Acquire,
    /// Someone else holds it.
    Wait,
}

fn micro(t: DateTime<Utc>) -> MicroTime {
    MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(t.timestamp_micros()).unwrap_or_default(),
    )
}

fn to_chrono(t: &MicroTime) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_micros(t.0.as_microsecond())
}

/// Pure decision on a Lease's spec.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: DateTime<Utc>) -> LeaseAction {
    let Some(spec) = spec else {
        return LeaseAction::Acquire;
    };
    match spec.holder_identity.as_deref() {
        None | Some("") => LeaseAction::Acquire,
        Some(holder) if holder == me => LeaseAction::Renew,
        Some(_) => {
            let ttl = chrono::Duration::seconds(spec.lease_duration_seconds.unwrap_or(15).into());
            match spec.renew_time.as_ref().and_then(to_chrono) {
                Some(renewed) if renewed + ttl > now => LeaseAction::Wait,
                _ => LeaseAction::Acquire,
            }
        }
    }
}

/// The Lease as a graceful stop leaves it: without a holder, so another
/// replica takes over at once instead of waiting out the lease duration.
/// `None` when we do not hold it (someone else's Lease is not ours to touch).
pub fn released(spec: Option<&LeaseSpec>, me: &str, now: DateTime<Utc>) -> Option<LeaseSpec> {
    let spec = spec?;
    if spec.holder_identity.as_deref() != Some(me) {
        return None;
    }
    Some(LeaseSpec {
        holder_identity: None,
        // As client-go's elector leaves a released Lease, for other tools.
        lease_duration_seconds: Some(1),
        renew_time: Some(micro(now)),
        ..spec.clone()
    })
}

fn write_params() -> PostParams {
    PostParams {
        field_manager: Some(crate::specs::FIELD_MANAGER.to_string()),
        ..Default::default()
    }
}

/// Holds or competes for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    ttl: Duration,
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, ttl: Duration) -> Self {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            ttl,
        }
    }

    /// How often to renew: well inside the TTL.
    pub fn renew_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// Tries once to acquire or renew. `Ok(true)` while we lead. Conflicting
    /// writes (another replica won the race) are `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Utc::now();
        let ttl_secs = i32::try_from(self.ttl.as_secs()).unwrap_or(15);
        let existing = self.api.get_opt(&self.name).await?;
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(ttl_secs),
                    acquire_time: Some(micro(now)),
                    renew_time: Some(micro(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&write_params(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let action = decide(lease.spec.as_ref(), &self.identity, now);
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        match action {
            LeaseAction::Wait => return Ok(false),
            LeaseAction::Renew => {
                spec.renew_time = Some(micro(now));
                spec.lease_duration_seconds = Some(ttl_secs);
            }
            LeaseAction::Acquire => {
                spec.holder_identity = Some(self.identity.clone());
                spec.acquire_time = Some(micro(now));
                spec.renew_time = Some(micro(now));
                spec.lease_duration_seconds = Some(ttl_secs);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        // replace carries resourceVersion: a concurrent writer makes it 409.
        match self.api.replace(&self.name, &write_params(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Competes until this replica leads (errors are logged and retried).
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.renew_interval()).await;
        }
    }

    /// Renews while leading; returns when leadership is lost: another
    /// replica holds the Lease, or no renewal succeeded for a whole TTL.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_interval()).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("leadership lost to another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the Lease");
                    if last_ok.elapsed() > self.ttl {
                        tracing::error!("could not renew the Lease in time");
                        return;
                    }
                }
            }
        }
    }

    /// Frees the Lease on a graceful stop, so that another replica leads at
    /// once instead of after the TTL; bounded, and only logged.
    pub async fn step_down(&self) {
        match tokio::time::timeout(Duration::from_secs(5), self.release()).await {
            Ok(Ok(true)) => tracing::info!("Lease released"),
            Ok(Ok(false)) => tracing::info!("Lease not ours any more; nothing to release"),
            Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease"),
            Err(_) => tracing::warn!("releasing the Lease timed out"),
        }
    }

    /// Gives the Lease up on a graceful stop. `Ok(true)` when it was ours
    /// and is now free; `Ok(false)` when someone else holds it (or took it
    /// concurrently).
    pub async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let Some(spec) = released(lease.spec.as_ref(), &self.identity, Utc::now()) else {
            return Ok(false);
        };
        lease.spec = Some(spec);
        match self.api.replace(&self.name, &write_params(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        let now = DateTime::parse_from_rfc3339("2025-01-01T00:01:00Z")
            .expect("now")
            .with_timezone(&Utc);
        let spec = |holder: Option<&str>, renewed_secs_ago: i64| LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(micro(now - chrono::Duration::seconds(renewed_secs_ago))),
            ..Default::default()
        };
        let cases = [
            ("no lease spec", None, LeaseAction::Acquire),
            ("no holder", Some(spec(None, 1)), LeaseAction::Acquire),
            ("we hold it", Some(spec(Some("me"), 1)), LeaseAction::Renew),
            (
                "we hold it, even expired",
                Some(spec(Some("me"), 60)),
                LeaseAction::Renew,
            ),
            (
                "other holder, fresh",
                Some(spec(Some("other"), 5)),
                LeaseAction::Wait,
            ),
            (
                "other holder, expired",
                Some(spec(Some("other"), 16)),
                LeaseAction::Acquire,
            ),
        ];
        for (name, s, want) in cases {
            assert_eq!(decide(s.as_ref(), "me", now), want, "{name}");
        }
    }

    #[test]
    fn release_frees_only_our_own_lease_for_an_immediate_takeover() {
        let now = DateTime::parse_from_rfc3339("2025-01-01T00:01:00Z")
            .expect("now")
            .with_timezone(&Utc);
        let held = |holder: &str| LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(micro(now)),
            lease_transitions: Some(3),
            ..Default::default()
        };
        let cases = [
            ("no lease spec", None, false),
            ("someone else's", Some(held("other")), false),
            ("ours", Some(held("me")), true),
        ];
        for (name, spec, frees) in cases {
            let got = released(spec.as_ref(), "me", now);
            assert_eq!(got.is_some(), frees, "{name}");
            if let Some(r) = got {
                assert_eq!(r.holder_identity, None, "{name}");
                assert_eq!(r.lease_transitions, Some(3), "{name}: history kept");
                assert_eq!(
                    decide(Some(&r), "other", now),
                    LeaseAction::Acquire,
                    "{name}: another replica takes it at once"
                );
            }
        }
    }
}
