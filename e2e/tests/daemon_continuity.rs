//! `/v1/status` tells the truth about the archive's continuity: with real
//! PostgreSQL archiving through the daemon into S3 (s3s-fs), a healthy
//! archive reports `continuity.firstHole: null` and a window ending at the
//! last archived segment; after one segment object is deleted from the
//! middle, the status names exactly that segment as the first hole and the
//! recovery window ends at the segment before it.

use std::time::Duration;

use serde_json::Value;
use walden::wal::{SegmentName, WalFile};
use walden_e2e::sys::wait_for;
use walden_e2e::{Archive, Daemon, PgCluster, StorageKind, Workdir};

const LONG: Duration = Duration::from_secs(180);
const SEGMENT_SIZE: u32 = 16 << 20;

fn status(daemon: &Daemon) -> Value {
    let (code, status) = daemon.api("GET", "/v1/status");
    assert_eq!(code, 200, "{status}");
    status
}

/// One row and a switch: returns the segment just completed.
fn write_segment(pg: &PgCluster, n: u32) -> String {
    pg.sql(&format!("INSERT INTO t VALUES ({n})"));
    pg.switch_wal()
}

#[test]
fn status_names_the_first_hole_and_ends_the_window_before_it() {
    let work = Workdir::new("daemon-continuity");
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut pg = PgCluster::init(work.path(), "primary");
    pg.archive_through_walden();
    let mut env = archive.env();
    env.extend(pg.libpq_env());
    // Every refresh re-checks from the start, so a deletion behind the mark is seen at once.
    env.push(("WALDEN_CONTINUITY_RECHECK".into(), "1".into()));
    let daemon = Daemon::start(work.path(), "continuity", env);
    pg.with_env(daemon.client_env()).start();
    pg.sql("CREATE TABLE t (x int)");

    // No base backup yet: nothing to be continuous from.
    assert!(status(&daemon)["continuity"].is_null());

    let id = daemon.backup();

    let segments: Vec<String> = (1..=5).map(|n| write_segment(&pg, n)).collect();
    let last = segments.last().expect("segments").clone();
    pg.wait_archived(&last, LONG);

    // Healthy: checked through the last segment, no hole, the window ends there.
    let healthy = wait_for("continuity to reach the last segment", LONG, || {
        let s = status(&daemon);
        (s["continuity"]["checkedThrough"] == last.as_str()).then_some(s)
    });
    assert!(
        healthy["continuity"]["firstHole"].is_null(),
        "{healthy}\n{}",
        daemon.log_text()
    );
    assert_eq!(healthy["recoveryWindow"]["lastArchivedWal"], last.as_str());
    // The job's id is the stored backup's (the daemon passes it to backup-push).
    assert_eq!(healthy["lastBackup"]["id"], id.as_str());

    // Delete the third segment's object from the middle of the archive.
    let gone = SegmentName::parse(&segments[2]).expect("segment");
    let before = SegmentName::parse(&segments[1]).expect("segment");
    assert_eq!(before.next(SEGMENT_SIZE), gone, "consecutive segments");
    assert!(
        !pg.archive_status("ready").contains(&segments[2]),
        "{} is still waiting to be archived",
        segments[2]
    );
    let object = archive.object_path(&WalFile::Segment(gone).object_key());
    std::fs::remove_file(&object).unwrap_or_else(|e| panic!("removing {}: {e}", object.display()));

    // More WAL is archived after it: the hole stays the first one, named exactly.
    let newer = write_segment(&pg, 6);
    pg.wait_archived(&newer, LONG);
    let holed = wait_for("the status to report the hole", LONG, || {
        let s = status(&daemon);
        (!s["continuity"]["firstHole"].is_null()).then_some(s)
    });
    let gone = gone.to_string();
    let before = before.to_string();
    assert_eq!(
        holed["continuity"]["firstHole"]["missing"],
        gone.as_str(),
        "{holed}"
    );
    assert_eq!(
        holed["continuity"]["firstHole"]["after"],
        before.as_str(),
        "{holed}"
    );
    assert_eq!(holed["continuity"]["checkedThrough"], before.as_str());
    assert_eq!(
        holed["recoveryWindow"]["lastArchivedWal"],
        before.as_str(),
        "the window ends before the hole: {holed}"
    );
    // What the daemon uploaded is not what storage holds: archiving itself went on.
    assert_eq!(holed["archiving"]["lastArchivedWal"], newer.as_str());
    assert!(
        daemon.log_text().contains("the archive has a hole"),
        "{}",
        daemon.log_text()
    );
}
