//! A restore proof (`walden restore-test`): PostgreSQL started on a data
//! directory `walden restore` has just written, recovery followed to its
//! end, then `pg_amcheck` and the user's SQL checks. What it found is one
//! JSON [`Report`], which the operator records in the ContinuousBackup's
//! status.
//!
//! It runs in a throwaway pod, so the server it starts is fenced: it
//! listens on a private unix socket only (its own `hba_file` trusts that
//! socket and nothing else), never archives (`archive_mode=off`: a proof
//! never writes to the archive it proves), logs to stderr where the proof
//! reads the reason of a failed recovery, and is stopped before the command
//! exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio_postgres::{Client, Config, NoTls, SimpleQueryMessage};

use super::marker::{self, Found};

pub use walden_contract::proof::{CheckResult, Reason, Report, MAX_DETAIL, MAX_REPORT};
use walden_contract::truncate as cut;

/// One SQL check: it must return one row whose last column is true.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub sql: String,
}

/// Parses the `--checks` JSON array (`[{"name": ..., "sql": ...}]`).
pub fn parse_checks(json: &str) -> Result<Vec<Check>, String> {
    let checks: Vec<Check> = serde_json::from_str(json).map_err(|e| {
        format!("--checks must be a JSON array of {{\"name\", \"sql\"}} objects: {e}")
    })?;
    if let Some(c) = checks.iter().find(|c| c.sql.trim().is_empty()) {
        return Err(format!("check {:?} has no SQL", c.name));
    }
    Ok(checks)
}

/// The report as one JSON line that fits a termination message: details
/// are shortened until it does.
pub fn to_line(report: &Report) -> String {
    let mut r = report.clone();
    let mut limit = MAX_DETAIL;
    loop {
        let line = serde_json::to_string(&r).unwrap_or_else(|e| {
            format!("{{\"passed\":false,\"reason\":\"ProofError\",\"message\":\"report: {e}\",\"replaySeconds\":0}}")
        });
        if line.len() <= MAX_REPORT || limit == 0 {
            return line;
        }
        limit /= 2;
        r = report.shortened(limit);
    }
}

/// Where and how a proof runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub pgdata: PathBuf,
    /// The private socket directory (also holds the proof's hba file).
    pub socket_dir: PathBuf,
    pub port: u16,
    pub user: String,
    pub database: String,
    pub checks: Vec<Check>,
    pub amcheck: bool,
    /// Directory of `postgres` and `pg_amcheck`; none: found on PATH.
    pub pg_bin: Option<PathBuf>,
    /// How long recovery may take.
    pub timeout: Duration,
}

impl Options {
    fn bin(&self, name: &str) -> PathBuf {
        match &self.pg_bin {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    fn config(&self) -> Config {
        let mut cfg = Config::new();
        cfg.host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name("walden restore-test")
            .connect_timeout(Duration::from_secs(10));
        cfg
    }
}

/// Runs a proof; every failure ends up in the report, never as an error.
pub async fn run(opts: &Options) -> Report {
    let mut report = Report::new();
    match marker::inspect(&opts.pgdata) {
        Ok(Found::Marker { marker, .. }) => {
            report.backup = marker.restored_backup.clone();
            report.target = Some(marker.identity.target.clone());
        }
        Ok(_) => {
            report.fail(
                Reason::ProofError,
                format!(
                    "{} holds no finished walden restore: run walden restore into it first",
                    opts.pgdata.display()
                ),
            );
            return report;
        }
        Err(e) => {
            report.fail(Reason::ProofError, e.to_string());
            return report;
        }
    }
    let log = opts.socket_dir.join("restore-test-postgres.log");
    let mut server = match start(opts, &log).await {
        Ok(s) => s,
        Err(e) => {
            report.fail(Reason::ProofError, e);
            return report;
        }
    };
    let started = Instant::now();
    let client = wait_recovered(opts, &mut server, &log, started, &mut report).await;
    report.replay_seconds = started.elapsed().as_secs_f64();
    if let Some(client) = client {
        examine(opts, &client, &mut report).await;
    }
    stop(&mut server).await;
    report
}

async fn start(opts: &Options, log: &Path) -> Result<Child, String> {
    let hba = opts.socket_dir.join("restore-test-hba.conf");
    std::fs::write(&hba, "local all all trust\n")
        .map_err(|e| format!("writing {}: {e}", hba.display()))?;
    let out = std::fs::File::create(log).map_err(|e| format!("creating {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("opening {}: {e}", log.display()))?;
    let settings = [
        "listen_addresses=".to_string(),
        format!("unix_socket_directories={}", opts.socket_dir.display()),
        format!("port={}", opts.port),
        format!("hba_file={}", hba.display()),
        "archive_mode=off".to_string(),
        // Connections wait for the end of recovery: no standby settings
        // (max_connections and the like) have to match the source's.
        "hot_standby=off".to_string(),
        "logging_collector=off".to_string(),
        "log_destination=stderr".to_string(),
        "ssl=off".to_string(),
    ];
    let mut cmd = Command::new(opts.bin("postgres"));
    cmd.arg("-D").arg(&opts.pgdata);
    for s in &settings {
        cmd.arg("-c").arg(s);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true);
    cmd.spawn().map_err(|e| {
        format!(
            "cannot start {}: {e} (the proof runs in a PostgreSQL image; set WALDEN_PG_BIN to its bin directory)",
            opts.bin("postgres").display()
        )
    })
}

/// Waits until the server accepts connections out of recovery; a server
/// that exits first failed its recovery, and its log says why.
async fn wait_recovered(
    opts: &Options,
    server: &mut Child,
    log: &Path,
    started: Instant,
    report: &mut Report,
) -> Option<Client> {
    let cfg = opts.config();
    let mut last_error: String;
    loop {
        match server.try_wait() {
            Ok(Some(status)) => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                report.fail(
                    Reason::RecoveryFailed,
                    format!(
                        "PostgreSQL stopped during recovery ({status}): {}",
                        recovery_failure(&text)
                    ),
                );
                return None;
            }
            Ok(None) => {}
            Err(e) => {
                report.fail(Reason::ProofError, format!("waiting for postgres: {e}"));
                return None;
            }
        }
        match cfg.connect(NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(conn);
                match client.simple_query("SELECT pg_is_in_recovery()").await {
                    Ok(rows) if first_value(&rows).as_deref() == Some("f") => return Some(client),
                    Ok(_) => last_error = "the server is still in recovery".into(),
                    Err(e) => last_error = e.to_string(),
                }
            }
            Err(e) => last_error = e.to_string(),
        }
        if started.elapsed() > opts.timeout {
            report.fail(
                Reason::TimedOut,
                format!(
                    "recovery did not end within {}s (last answer: {last_error})",
                    opts.timeout.as_secs()
                ),
            );
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The lines of a postgres log that say why recovery stopped: FATAL and
/// PANIC lines, and what `wal-fetch` said (a hole, a corrupt object).
pub fn recovery_failure(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("FATAL")
                || l.contains("PANIC")
                || l.contains("wal-fetch")
                || l.contains(" ERROR ")
        })
        .map(str::trim)
        .collect();
    if lines.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        return tail.into_iter().rev().collect::<Vec<_>>().join(" | ");
    }
    let mut out = lines.join(" | ");
    if out.len() > MAX_DETAIL {
        // The last lines are the ones that ended it.
        let mut start = out.len() - MAX_DETAIL;
        while !out.is_char_boundary(start) {
            start += 1;
        }
        out = format!("…{}", &out[start..]);
    }
    out
}

async fn examine(opts: &Options, client: &Client, report: &mut Report) {
    match client
        .query_one(
            "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()",
            &[],
        )
        .await
    {
        Ok(row) => {
            report.reached_lsn = row.get(0);
            report.reached_time = row.get(1);
        }
        Err(e) => {
            report.fail(
                Reason::ConnectFailed,
                format!("reading where recovery ended: {e}"),
            );
            return;
        }
    }
    if opts.amcheck {
        let r = amcheck(opts).await;
        let passed = r.passed;
        let detail = r.detail.clone();
        report.amcheck = Some(r);
        if !passed {
            report.fail(Reason::AmcheckFailed, format!("pg_amcheck: {detail}"));
            return;
        }
    }
    for c in &opts.checks {
        let r = check(client, c).await;
        report.checks.push(r);
    }
    if let Some(bad) = report.checks.iter().find(|c| !c.passed) {
        let msg = format!("check {:?} failed: {}", bad.name, bad.detail);
        report.fail(Reason::CheckFailed, msg);
        return;
    }
    report.passed = true;
    report.reason = Reason::Passed;
    report.message = format!(
        "restored{} and recovered to {}{}; {}{} check(s) passed",
        report
            .backup
            .as_ref()
            .map(|b| format!(" backup {b}"))
            .unwrap_or_default(),
        report.reached_lsn.as_deref().unwrap_or("an unknown LSN"),
        report
            .reached_time
            .map(|t| format!(" ({})", t.to_rfc3339()))
            .unwrap_or_default(),
        if opts.amcheck {
            "pg_amcheck clean, "
        } else {
            ""
        },
        report.checks.len()
    );
}

async fn amcheck(opts: &Options) -> CheckResult {
    let out = Command::new(opts.bin("pg_amcheck"))
        .arg("--host")
        .arg(&opts.socket_dir)
        .arg("--port")
        .arg(opts.port.to_string())
        .arg("--username")
        .arg(&opts.user)
        .arg("--maintenance-db")
        .arg(&opts.database)
        // Every database, heap and btree indexes; the extension is
        // installed where missing (this server is thrown away).
        .args(["--all", "--install-missing", "--no-password"])
        .stdin(Stdio::null())
        .output()
        .await;
    let name = "pg_amcheck".to_string();
    match out {
        Ok(o) if o.status.success() => CheckResult {
            name,
            passed: true,
            detail: String::new(),
        },
        Ok(o) => {
            let text = format!(
                "{} {}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            CheckResult {
                name,
                passed: false,
                detail: cut(
                    &format!("exited with {}: {}", o.status, text.trim()),
                    MAX_DETAIL,
                ),
            }
        }
        Err(e) => CheckResult {
            name,
            passed: false,
            detail: format!(
                "cannot run {}: {e} (PostgreSQL 14 and later ship it; restoreTest.amcheck: false skips it)",
                opts.bin("pg_amcheck").display()
            ),
        },
    }
}

async fn check(client: &Client, c: &Check) -> CheckResult {
    let verdict = match client.simple_query(&c.sql).await {
        Ok(rows) => judge(&rows),
        Err(e) => Err(e.to_string()),
    };
    CheckResult {
        name: c.name.clone(),
        passed: verdict.is_ok(),
        detail: verdict
            .err()
            .map(|d| cut(&d, MAX_DETAIL))
            .unwrap_or_default(),
    }
}

/// A check passes when its last statement returned exactly one row whose
/// last column is true.
fn judge(messages: &[SimpleQueryMessage]) -> Result<(), String> {
    let rows: Vec<_> = messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect();
    match rows.as_slice() {
        [row] => match row.get(row.len().saturating_sub(1)) {
            Some("t") => Ok(()),
            Some(v) => Err(format!("returned {v:?}, not true")),
            None => Err("returned NULL, not true".into()),
        },
        [] => Err("returned no row".into()),
        more => Err(format!("returned {} rows, not one", more.len())),
    }
}

fn first_value(messages: &[SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    })
}

/// Fast shutdown (SIGINT), then a kill if it does not stop in a minute.
async fn stop(server: &mut Child) {
    if let Some(pid) = server.id() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGINT);
        }
    }
    if tokio::time::timeout(Duration::from_secs(60), server.wait())
        .await
        .is_err()
    {
        let _ = server.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_parse_or_say_why() {
        assert_eq!(
            parse_checks(r#"[{"name":"rows","sql":"select true"}]"#).unwrap(),
            vec![Check {
                name: "rows".into(),
                sql: "select true".into()
            }]
        );
        assert_eq!(parse_checks("[]").unwrap(), vec![]);
        assert!(parse_checks("select 1").unwrap_err().contains("JSON array"));
        assert!(parse_checks(r#"[{"name":"x","sql":" "}]"#)
            .unwrap_err()
            .contains("\"x\" has no SQL"));
    }

    #[test]
    fn recovery_failure_quotes_the_fatal_lines() {
        let log = "LOG:  starting PostgreSQL 15\n\
                   LOG:  restored log file \"000000010000000000000003\" from archive\n\
                   2026-12-03T10:00:00Z ERROR wal-fetch: 000000010000000000000004 is a hole in the archive\n\
                   FATAL:  could not restore file \"000000010000000000000004\" from archive: child process exited with exit code 254\n\
                   LOG:  startup process (PID 7) exited with exit code 1\n";
        let r = recovery_failure(log);
        assert!(r.contains("is a hole"), "{r}");
        assert!(r.contains("exit code 254"), "{r}");
        assert!(!r.contains("restored log file"), "{r}");
        // Without such lines, the last ones.
        assert_eq!(recovery_failure("a\nb\nc\nd\n"), "b | c | d");
    }

    #[test]
    fn a_long_report_still_fits_a_termination_message() {
        let mut r = Report::new();
        r.fail(Reason::CheckFailed, "x".repeat(5000));
        r.checks = (0..50)
            .map(|i| CheckResult {
                name: format!("check-{i}-{}", "n".repeat(200)),
                passed: false,
                detail: "d".repeat(2000),
            })
            .collect();
        let line = to_line(&r);
        assert!(line.len() <= MAX_REPORT, "{}", line.len());
        let back: Report = serde_json::from_str(&line).unwrap();
        assert_eq!(back.reason, Reason::CheckFailed);
        assert!(!back.passed);
    }
}
