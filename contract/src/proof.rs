//! The report `walden restore-test` writes to stdout and as its pod's
//! termination message, and the operator reads back into the
//! ContinuousBackup's status.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::truncate;

/// Longest text quoted from a log or a failed check, in bytes.
pub const MAX_DETAIL: usize = 600;
/// Kubernetes keeps at most this much of a termination message.
pub const MAX_REPORT: usize = 4096;

/// The outcome of one check (pg_amcheck is reported the same way).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Why a proof failed, or `Passed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    Passed,
    /// PostgreSQL stopped during recovery (a hole, a corrupt segment, a
    /// target that is not in the archive): the restore does not start.
    RecoveryFailed,
    /// Recovery did not end within the timeout.
    TimedOut,
    /// The recovered server could not be queried.
    ConnectFailed,
    AmcheckFailed,
    CheckFailed,
    /// The proof itself could not run (no postgres binary, bad arguments).
    ProofError,
    /// A reason this build does not know (a report from a newer walden).
    #[serde(other)]
    Other,
}

/// What a proof found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub passed: bool,
    pub reason: Reason,
    pub message: String,
    /// The backup `walden restore` used (from its marker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// The target the restore was asked for, as its marker records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Where recovery ended, as the server reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached_time: Option<DateTime<Utc>>,
    /// From the server's start to the end of recovery.
    pub replay_seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amcheck: Option<CheckResult>,
    #[serde(default)]
    pub checks: Vec<CheckResult>,
}

impl Report {
    pub fn new() -> Self {
        Report {
            passed: false,
            reason: Reason::ProofError,
            message: String::new(),
            backup: None,
            target: None,
            reached_lsn: None,
            reached_time: None,
            replay_seconds: 0.0,
            amcheck: None,
            checks: Vec::new(),
        }
    }

    pub fn fail(&mut self, reason: Reason, message: impl Into<String>) {
        self.passed = false;
        self.reason = reason;
        self.message = truncate(&message.into(), MAX_DETAIL);
    }

    /// A copy with its texts cut to about `limit` bytes (check details to
    /// half, names to 64) and, below 16, at most 8 checks: for a report
    /// that must fit [`MAX_REPORT`].
    pub fn shortened(&self, limit: usize) -> Self {
        let mut r = self.clone();
        r.message = truncate(&r.message, limit);
        for c in r.checks.iter_mut().chain(r.amcheck.iter_mut()) {
            c.detail = truncate(&c.detail, limit / 2);
            c.name = truncate(&c.name, 64);
        }
        if limit < 16 {
            r.checks.truncate(8);
        }
        r
    }
}

impl Default for Report {
    fn default() -> Self {
        Self::new()
    }
}

impl Reason {
    /// The name written in the report and in the operator's status.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Passed => "Passed",
            Reason::RecoveryFailed => "RecoveryFailed",
            Reason::TimedOut => "TimedOut",
            Reason::ConnectFailed => "ConnectFailed",
            Reason::AmcheckFailed => "AmcheckFailed",
            Reason::CheckFailed => "CheckFailed",
            Reason::ProofError => "ProofError",
            Reason::Other => "Other",
        }
    }
}
