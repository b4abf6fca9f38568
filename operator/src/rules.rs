//! The CRDs' CEL rules (`x-kubernetes-validations`), checked by the operator
//! as well.
//!
//! Clusters before Kubernetes 1.25 get the legacy CRDs, which carry no CEL
//! rules (`crdgen --legacy`). Validation is never silently lost there: every
//! controller checks these rules first and reports a violation as
//! `Ready=False`, reason `Invalid`, creating nothing. On newer clusters the
//! apiserver rejects such objects before the operator sees them, so the
//! check never fires. The messages are the CEL rules' own (`api` uses these
//! constants), and a table test holds both to the same verdicts.

use crate::api::{ContinuousBackupSpec, FollowerSpec, ForkSpec, RecoveryTarget, SourceSpec};
use crate::api::{RetentionSpec, S3Spec};

pub const S3_AUTH: &str = "set exactly one of credentials or workloadIdentity";
pub const RETENTION_SET: &str = "set fullBackups, recoveryWindow or both";
pub const ONE_SOURCE: &str = "set exactly one of continuousBackup or storage";
pub const ONE_TARGET: &str = "set at most one recovery target: time, lsn or name";
pub const EXCLUSIVE_TARGET: &str = "exclusive applies to a time or lsn target";

/// Reason of the condition a violation sets.
pub const REASON: &str = "Invalid";

/// One broken rule: where, and the rule's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub message: &'static str,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// The violations as one condition message.
pub fn describe(violations: &[Violation]) -> String {
    let list: Vec<String> = violations.iter().map(Violation::to_string).collect();
    format!(
        "{} (the cluster's CRDs do not enforce these rules; nothing was changed)",
        list.join("; ")
    )
}

fn s3(field: &'static str, s3: &S3Spec, out: &mut Vec<Violation>) {
    let identity = s3.workload_identity.unwrap_or(false);
    if s3.credentials.is_some() == identity {
        out.push(Violation {
            field,
            message: S3_AUTH,
        });
    }
}

fn retention(r: &RetentionSpec, out: &mut Vec<Violation>) {
    if r.full_backups.is_none() && r.recovery_window.is_none() {
        out.push(Violation {
            field: "spec.retention",
            message: RETENTION_SET,
        });
    }
}

fn source(src: &SourceSpec, out: &mut Vec<Violation>) {
    if src.continuous_backup.is_some() == src.storage.is_some() {
        out.push(Violation {
            field: "spec.source",
            message: ONE_SOURCE,
        });
    }
    if let Some(storage) = &src.storage {
        s3("spec.source.storage.s3", &storage.s3, out);
    }
}

fn target(t: &RecoveryTarget, out: &mut Vec<Violation>) {
    let set = [t.time.is_some(), t.lsn.is_some(), t.name.is_some()];
    if set.iter().filter(|x| **x).count() > 1 {
        out.push(Violation {
            field: "spec.target",
            message: ONE_TARGET,
        });
    }
    if t.exclusive == Some(true) && t.time.is_none() && t.lsn.is_none() {
        out.push(Violation {
            field: "spec.target",
            message: EXCLUSIVE_TARGET,
        });
    }
}

/// Rule violations of a ContinuousBackup spec.
pub fn continuous_backup(spec: &ContinuousBackupSpec) -> Vec<Violation> {
    let mut out = Vec::new();
    s3("spec.storage.s3", &spec.storage.s3, &mut out);
    if let Some(r) = &spec.retention {
        retention(r, &mut out);
    }
    out
}

/// Rule violations of a Fork spec.
pub fn fork(spec: &ForkSpec) -> Vec<Violation> {
    let mut out = Vec::new();
    source(&spec.source, &mut out);
    if let Some(t) = &spec.target {
        target(t, &mut out);
    }
    out
}

/// Rule violations of a Follower spec.
pub fn follower(spec: &FollowerSpec) -> Vec<Violation> {
    let mut out = Vec::new();
    source(&spec.source, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContinuousBackup, Follower, Fork};
    use kube::core::cel::validate_cel;
    use serde_json::{json, Value};

    fn merged(mut base: Value, extra: Value) -> Value {
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        base
    }

    /// The operator's verdict equals the CEL rules' verdict on every case,
    /// with the same messages.
    #[test]
    fn rules_agree_with_the_cel_rules() {
        let wi = json!({"s3": {"bucket": "bkt", "workloadIdentity": true}});
        let fork_cases = [
            ("no target", json!({}), vec![]),
            (
                "time target",
                json!({"target": {"time": "2025-01-01T00:00:00Z"}}),
                vec![],
            ),
            (
                "backup and time",
                json!({"target": {"backupId": "20250101T000000Z", "time": "2025-01-01T00:00:00Z"}}),
                vec![],
            ),
            (
                "time and lsn",
                json!({"target": {"time": "2025-01-01T00:00:00Z", "lsn": "0/1"}}),
                vec![ONE_TARGET],
            ),
            (
                "all three",
                json!({"target": {"time": "2025-01-01T00:00:00Z", "lsn": "0/1", "name": "x"}}),
                vec![ONE_TARGET],
            ),
            (
                "exclusive with name",
                json!({"target": {"name": "x", "exclusive": true}}),
                vec![EXCLUSIVE_TARGET],
            ),
            (
                "exclusive false with name",
                json!({"target": {"name": "x", "exclusive": false}}),
                vec![],
            ),
            (
                "exclusive with lsn",
                json!({"target": {"lsn": "0/1", "exclusive": true}}),
                vec![],
            ),
            (
                "two sources",
                json!({"source": {"continuousBackup": "pg", "storage": wi}}),
                vec![ONE_SOURCE],
            ),
            ("no source", json!({"source": {}}), vec![ONE_SOURCE]),
            ("storage source", json!({"source": {"storage": wi}}), vec![]),
            (
                "storage without auth",
                json!({"source": {"storage": {"s3": {"bucket": "bkt"}}}}),
                vec![S3_AUTH],
            ),
            (
                "workloadIdentity false, no credentials",
                json!({"source": {"storage": {"s3": {"bucket": "bkt", "workloadIdentity": false}}}}),
                vec![S3_AUTH],
            ),
            (
                "storage with both auths",
                json!({"source": {"storage": {"s3": {"bucket": "bkt", "workloadIdentity": true, "credentials": {"secret": "s"}}}}}),
                vec![S3_AUTH],
            ),
        ];
        let base = json!({
            "source": {"continuousBackup": "pg"},
            "instance": {"image": "postgres:16", "storageSize": "1Gi"}
        });
        for (name, extra, want) in fork_cases {
            let spec = merged(base.clone(), extra);
            let f = Fork::new(
                "f",
                serde_json::from_value(spec.clone()).expect("fork spec"),
            );
            let got: Vec<&str> = fork(&f.spec).iter().map(|v| v.message).collect();
            assert_eq!(got, want, "fork {name}");
            assert_cel_agrees(validate_cel(&f), &want, &format!("fork {name}"));
            // Followers share the source rules.
            if spec.get("target").is_none() {
                let fl = Follower::new("fl", serde_json::from_value(spec).expect("follower spec"));
                let got: Vec<&str> = follower(&fl.spec).iter().map(|v| v.message).collect();
                assert_eq!(got, want, "follower {name}");
                assert_cel_agrees(validate_cel(&fl), &want, &format!("follower {name}"));
            }
        }

        let cb_base = json!({
            "target": {"statefulSet": "pg", "credentialsSecret": "c"},
            "storage": {"s3": {"bucket": "bkt", "credentials": {"secret": "s3"}}}
        });
        let cb_cases = [
            ("valid", json!({}), vec![]),
            (
                "retention with a window",
                json!({"retention": {"recoveryWindow": "7d"}}),
                vec![],
            ),
            (
                "empty retention",
                json!({"retention": {}}),
                vec![RETENTION_SET],
            ),
            (
                "storage without auth",
                json!({"storage": {"s3": {"bucket": "bkt"}}, "retention": {}}),
                vec![S3_AUTH, RETENTION_SET],
            ),
        ];
        for (name, extra, want) in cb_cases {
            let cb = ContinuousBackup::new(
                "cb",
                serde_json::from_value(merged(cb_base.clone(), extra)).expect("cb spec"),
            );
            let got: Vec<&str> = continuous_backup(&cb.spec)
                .iter()
                .map(|v| v.message)
                .collect();
            assert_eq!(got, want, "cb {name}");
            assert_cel_agrees(validate_cel(&cb), &want, &format!("cb {name}"));
        }
    }

    fn assert_cel_agrees<E: std::fmt::Debug>(cel: Result<(), E>, want: &[&str], case: &str) {
        match cel {
            Ok(()) => assert!(want.is_empty(), "{case}: CEL accepts, rules say {want:?}"),
            Err(e) => {
                let text = format!("{e:?}");
                assert!(
                    !want.is_empty(),
                    "{case}: CEL rejects ({text}), rules accept"
                );
                for m in want {
                    assert!(text.contains(m), "{case}: CEL said {text}, not {m}");
                }
            }
        }
    }

    #[test]
    fn describe_names_every_field() {
        let msg = describe(&[
            Violation {
                field: "spec.source",
                message: ONE_SOURCE,
            },
            Violation {
                field: "spec.target",
                message: ONE_TARGET,
            },
        ]);
        assert!(msg.starts_with("spec.source: set exactly one"), "{msg}");
        assert!(msg.contains("; spec.target: set at most one"), "{msg}");
    }
}
