//! `retain`, `verify` and `install`: keeping the archive in shape.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use walden::config::Settings;
use walden::{retention, verify};
use walden_contract::pod::env as wenv;

use super::output::{default_parallelism, error_chain, fail, human, EXIT_PROBLEMS_FOUND};

#[derive(Debug, Args)]
pub struct RetainArgs {
    /// Keep the newest N full backups
    #[arg(long, env = wenv::RETENTION_FULL, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub full: Option<u64>,
    /// Keep every point of the last DURATION restorable (e.g. 7d, 36h, 1d12h, 90m)
    #[arg(long, env = wenv::RETENTION_WINDOW, value_name = "DURATION", value_parser = walden::retention::parse_duration)]
    pub window: Option<chrono::Duration>,
    /// Backup folders without backup.json are deleted only once nothing in them was stored
    /// for this long (a running backup renews its lease every 30 s)
    #[arg(long, env = "WALDEN_RETENTION_GRACE", value_name = "DURATION", default_value = retention::DEFAULT_GRACE,
          value_parser = walden::retention::parse_duration)]
    pub grace: chrono::Duration,
    /// Print what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Stable JSON output on stdout (the plan, plus "deleted": the number of objects deleted)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this backup and the WAL it needs
    #[arg(long, value_name = "ID")]
    pub backup: Option<String>,
    /// Only WAL: checksums of every WAL file and continuity (skip backup parts)
    #[arg(long)]
    pub wal: bool,
    /// Objects checked at once
    #[arg(long, default_value_t = default_parallelism(), value_name = "N")]
    pub parallelism: usize,
    /// Stable JSON output on stdout: {"ok":..,"problems":[..],..}
    #[arg(long)]
    pub json: bool,
}

pub async fn retain(settings: &Settings, args: RetainArgs) -> ExitCode {
    let RetainArgs {
        full,
        window,
        grace,
        dry_run,
        json,
    } = args;
    let policy = match (full, window) {
        (Some(n), Some(w)) => retention::Policy::Both {
            full: n as usize,
            window: w,
        },
        (Some(n), None) => retention::Policy::Full(n as usize),
        (None, Some(w)) => retention::Policy::Window(w),
        (None, None) => return fail("retain", anyhow::anyhow!("--full or --window is required")),
    };
    match plan_and_delete(settings, policy, grace, dry_run, json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail("retain", e),
    }
}

pub async fn verify(settings: &Settings, args: VerifyArgs) -> ExitCode {
    let VerifyArgs {
        backup,
        wal,
        parallelism,
        json,
    } = args;
    let opts = verify::VerifyOptions {
        backup,
        backups: !wal,
        wal_checksums: true,
        parallelism,
    };
    match run_verify(settings, &opts, json).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_PROBLEMS_FOUND),
        Err(e) => fail("verify", e),
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RetainJson<'a> {
    dry_run: bool,
    deleted: usize,
    #[serde(flatten)]
    plan: &'a retention::Plan,
}

async fn plan_and_delete(
    settings: &Settings,
    policy: retention::Policy,
    grace: chrono::Duration,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let storage = settings.open_storage().await?;
    let plan = retention::plan_for(storage.as_ref(), policy, chrono::Utc::now(), grace).await?;
    if !json {
        let verb = if dry_run { "would delete" } else { "deleting" };
        println!(
            "retention in {}: {}{}",
            storage.url(),
            plan.policy,
            if dry_run {
                " (dry run: nothing is deleted)"
            } else {
                ""
            }
        );
        for k in &plan.kept_backups {
            println!("  keep    backup {} ({})", k.id, k.reason);
        }
        for id in &plan.deleted_backups {
            println!("  {verb} backup {id}");
        }
        for id in &plan.abandoned_backups {
            println!("  {verb} abandoned backup folder {id} (no backup.json, nothing stored in it for {})", retention::format_duration(grace));
        }
        for id in &plan.damaged_backups {
            println!("  keep    damaged backup folder {id} (its backup.json cannot be read; left for a person to look at)");
        }
        for id in &plan.in_progress_backups {
            println!(
                "  keep    backup folder {id} (no backup.json yet, recently written: in progress)"
            );
        }
        for (tli, seg) in &plan.wal_kept_from {
            println!("  keep    WAL of timeline {tli} from {seg} on (and every later timeline)");
        }
        println!("  {verb} {} WAL object(s)", plan.deleted_wal_objects);
        for t in &plan.stale_temporaries {
            println!("  {verb} leftover of an interrupted write: {}", t.key);
        }
    }
    let deleted = if dry_run {
        0
    } else {
        retention::execute(storage.as_ref(), &plan, &settings.retry_policy()).await?
    };
    if json {
        let out = RetainJson {
            dry_run,
            deleted,
            plan: &plan,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if dry_run {
        println!(
            "would delete {} object(s), {}",
            plan.delete.len(),
            human(plan.deleted_bytes)
        );
    } else {
        println!("deleted {deleted} object(s), {}", human(plan.deleted_bytes));
    }
    Ok(())
}

/// Runs the checks and prints the report; `Ok(false)` when problems were found.
async fn run_verify(
    settings: &Settings,
    opts: &verify::VerifyOptions,
    json: bool,
) -> anyhow::Result<bool> {
    let storage = settings.open_storage().await?;
    let report = verify::verify(storage.as_ref(), opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &report.timelines {
            let from = match (t.parent, t.switchpoint) {
                (Some(p), Some(s)) => format!(", branched from timeline {p} at {s}"),
                _ => String::new(),
            };
            println!(
                "timeline {}: {} segment(s) {} .. {}{from}",
                t.timeline,
                t.segments,
                t.first_segment.as_deref().unwrap_or("-"),
                t.last_segment.as_deref().unwrap_or("-")
            );
        }
        for p in &report.problems {
            println!("PROBLEM {:?} {}: {}", p.kind, p.object, p.message);
        }
        println!(
            "{}: {} backup(s), {} part(s), {} WAL object(s), {} checked; {} problem(s)",
            if report.ok { "OK" } else { "FAILED" },
            report.backups_checked,
            report.parts_checked,
            report.wal_objects_checked,
            human(report.bytes_checked),
            report.problems.len()
        );
    }
    Ok(report.ok)
}

/// `walden install <dir>`: the pods' init container.
pub fn install(dir: &std::path::Path) -> ExitCode {
    match copy_binary(dir) {
        Ok(dest) => {
            tracing::info!("installed {}", dest.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("install into {}: {}", dir.display(), error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Copies the running binary to `<dir>/walden` atomically, executable by all.
fn copy_binary(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let me = std::env::current_exe().context("locating the running walden binary")?;
    let mut source =
        std::fs::File::open(&me).with_context(|| format!("opening {}", me.display()))?;
    let dest = dir.join("walden");
    walden::durable::replace_with(&dest, 0o755, |f| std::io::copy(&mut source, f).map(|_| ()))
        .with_context(|| format!("copying {} to {}", me.display(), dest.display()))?;
    Ok(dest)
}
