//! The exactness check shared by tests that restore: a `ledger` table gets
//! batches of rows, one transaction per batch, with PostgreSQL's own commit
//! timestamps; a restored server must hold exactly the batches committed at
//! or before the target.

use std::collections::BTreeSet;
use std::process::Output;
use std::time::Duration;

use crate::pg::Install;
use crate::{walden_bin, Archive, PgCluster, Workdir};

pub const LONG: Duration = Duration::from_secs(240);
pub const ROWS: u32 = 50;

pub fn ok(o: Output, what: &str) -> Output {
    assert!(
        o.status.success(),
        "{what} failed ({}):\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub struct Batch {
    /// PostgreSQL's commit timestamp of the batch's transaction, as text.
    pub commit_time: String,
    /// The WAL insert position right after the commit.
    pub lsn_after: String,
}

/// A primary archiving into an archive, with its ledger.
pub struct Primary {
    pub pg: PgCluster,
    pub batches: Vec<Batch>,
}

impl Primary {
    pub fn start(work: &Workdir, archive: &Archive, name: &str) -> Self {
        Self::start_with(work, archive, name, &Install::default_15())
    }

    /// A primary of `install` (a major version of the matrix).
    pub fn start_with(work: &Workdir, archive: &Archive, name: &str, install: &Install) -> Self {
        let mut pg = PgCluster::init_with(work.path(), name, install);
        pg.set(&[
            ("archive_mode", "on".into()),
            (
                "archive_command",
                format!("'{} wal-push %p'", walden_bin().display()),
            ),
            ("track_commit_timestamp", "on".into()),
        ]);
        pg.with_env(archive.env()).start();
        pg.sql("CREATE TABLE ledger (id serial PRIMARY KEY, batch int NOT NULL, note text)");
        Self {
            pg,
            batches: Vec::new(),
        }
    }

    /// Commits batch number `batch` (rows carry `note`) in one transaction.
    pub fn commit_batch(&mut self, batch: u32, note: &str) {
        self.pg.sql(&format!(
            "INSERT INTO ledger (batch, note) SELECT {batch}, '{note} ' || g FROM generate_series(1, {ROWS}) g"
        ));
        let row = self.pg.sql(&format!(
            "SELECT pg_xact_commit_timestamp(xmin)::text || '|' || pg_current_wal_insert_lsn() \
             FROM ledger WHERE batch = {batch} LIMIT 1"
        ));
        let (t, l) = row.split_once('|').expect("two columns");
        self.batches.push(Batch {
            commit_time: t.to_string(),
            lsn_after: l.to_string(),
        });
        self.pg.sql("SELECT pg_sleep(0.02)");
    }

    pub fn archive_everything(&self) {
        let last = self.pg.switch_wal();
        self.pg.wait_archived(&last, LONG);
    }

    /// `backup-push --json` with `extra` arguments; returns the manifest.
    pub fn backup(&self, archive: &Archive, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["backup-push", "--json"];
        args.extend_from_slice(extra);
        let out = ok(
            archive
                .walden_pg(&self.pg, &args)
                .output()
                .expect("backup-push"),
            "backup-push",
        );
        serde_json::from_slice(&out.stdout).expect("manifest JSON")
    }
}

/// A time as RFC 3339 in UTC, computed by PostgreSQL from a timestamptz expression.
pub fn rfc3339(pg: &PgCluster, expr: &str) -> String {
    pg.sql(&format!(
        "SELECT to_char(({expr}) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
    ))
}

/// Restores with `args` into a fresh directory, starts it with archiving off,
/// and waits for the end of recovery.
pub fn restore_and_start(
    work: &Workdir,
    archive: &Archive,
    source: &PgCluster,
    name: &str,
    args: &[&str],
) -> PgCluster {
    restore_into(work, archive, source, name, args, false)
}

/// Like [`restore_and_start`]; with `keep_archiving` the restored server keeps
/// the source's archive settings (and so archives its new timeline there).
pub fn restore_into(
    work: &Workdir,
    archive: &Archive,
    source: &PgCluster,
    name: &str,
    args: &[&str],
    keep_archiving: bool,
) -> PgCluster {
    let dest = work.pg_dir(name);
    let mut full = vec!["restore", dest.to_str().expect("utf-8")];
    full.extend_from_slice(args);
    ok(
        archive
            .walden_pg(source, &full)
            .output()
            .expect("run restore"),
        &format!("restore {args:?}"),
    );
    let mut pg = PgCluster::adopt_with(work.path(), dest, &source.install);
    if !keep_archiving {
        pg.set(&[("archive_mode", "off".into())]);
    }
    pg.with_env(archive.env()).start();
    pg.wait_promoted(LONG);
    pg
}

/// Restores from `from` with `args` and starts the result archiving into
/// `protect_into`: a fork that is then protected in a prefix of its own.
/// Returns the running, promoted server and the restore's stderr.
pub fn restore_fork(
    work: &Workdir,
    from: &Archive,
    source: &PgCluster,
    name: &str,
    args: &[&str],
    protect_into: &Archive,
) -> (PgCluster, String) {
    let dest = work.pg_dir(name);
    let mut full = vec!["restore", dest.to_str().expect("utf-8")];
    full.extend_from_slice(args);
    let out = ok(
        from.walden_pg(source, &full).output().expect("run restore"),
        &format!("restore {args:?}"),
    );
    let mut pg = PgCluster::adopt_with(work.path(), dest, &source.install);
    pg.with_env(protect_into.env()).start();
    pg.wait_promoted(LONG);
    (pg, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The batches a server holds; panics on a partially restored batch.
pub fn batches_in(pg: &PgCluster) -> BTreeSet<u32> {
    let rows = pg.sql("SELECT batch || ':' || count(*) FROM ledger GROUP BY batch ORDER BY batch");
    rows.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (b, n) = l.split_once(':').expect("batch:count");
            assert_eq!(
                n,
                ROWS.to_string(),
                "batch {b} restored partially: {n} rows"
            );
            b.parse().expect("batch")
        })
        .collect()
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
