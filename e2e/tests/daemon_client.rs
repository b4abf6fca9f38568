//! The thin client (`wal-push`/`wal-fetch` with WALDEN_SOCKET) fails safely:
//! with no daemon, or a daemon that dies mid-request, `wal-push` exits
//! non-zero (PostgreSQL keeps the segment) and `wal-fetch` exits 254 (recovery
//! stops instead of ending early) — never 1, which only a daemon saying
//! "definitively absent" may cause. Also: SIGTERM lets a running upload
//! finish, or abandons it without reporting it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use walden_e2e::ledger::block_on;
use walden_e2e::sys::wait_for;
use walden_e2e::{walden_bin, Archive, Daemon, PgCluster, StorageKind, Workdir};

/// `walden <args>` as a thin client: only the socket, no storage settings at all.
fn thin(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(walden_bin());
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("WALDEN_SOCKET", socket)
        .env("WALDEN_SOCKET_WAIT_MS", "300")
        .args(args);
    cmd
}

fn out(mut cmd: Command) -> Output {
    cmd.output().expect("run walden")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `n` real, completed WAL segments of one fresh cluster, copied out.
fn real_segments(work: &Workdir, n: usize) -> Vec<PathBuf> {
    let mut pg = PgCluster::init(work.path(), "segsrc");
    pg.start();
    pg.sql("CREATE TABLE t (v text)");
    // The daemon archives only files of a pg_wal directory.
    let out = work.path().join("segments").join("pg_wal");
    std::fs::create_dir_all(&out).expect("mkdir");
    let mut paths = Vec::new();
    for i in 0..n {
        pg.sql(&format!(
            "INSERT INTO t SELECT md5(g::text) FROM generate_series(1, {}) g",
            2000 * (i + 1)
        ));
        let name = pg.switch_wal();
        let dest = out.join(&name);
        std::fs::copy(pg.data.join("pg_wal").join(&name), &dest).expect("copy segment");
        paths.push(dest);
    }
    pg.stop();
    paths
}

fn assert_push_failed(o: &Output, what: &str) {
    assert!(!o.status.success(), "{what}: wal-push succeeded");
    assert_ne!(code(o), 0, "{what}");
}

fn assert_fetch_failed(o: &Output, dest: &Path, what: &str) {
    assert_eq!(
        code(o),
        254,
        "{what}: wal-fetch must exit 254: {}",
        stderr(o)
    );
    assert!(!dest.exists(), "{what}: {} was written", dest.display());
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().expect("parent"))
        .expect("read_dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("walden-tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{what}: temporary files left: {leftovers:?}"
    );
}

#[test]
fn thin_client_without_a_daemon_fails_safely() {
    let work = Workdir::new("thin-absent");
    let seg = work.path().join("000000010000000000000001");
    std::fs::write(&seg, vec![0u8; 8192]).expect("write");
    let dest = work.path().join("dest").join("RECOVERYXLOG");
    std::fs::create_dir_all(dest.parent().expect("parent")).expect("mkdir");

    // No socket file at all.
    let missing = work.path().join("nowhere").join("walden.sock");
    let o = out(thin(&missing, &["wal-push", s(&seg)]));
    assert_push_failed(&o, "no socket");
    assert!(
        stderr(&o).contains("cannot reach the walden daemon"),
        "{}",
        stderr(&o)
    );
    let o = out(thin(
        &missing,
        &["wal-fetch", "000000010000000000000001", s(&dest)],
    ));
    assert_fetch_failed(&o, &dest, "no socket");

    // A stale socket file nobody listens on (the daemon crashed).
    let stale = work.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    let o = out(thin(&stale, &["wal-push", s(&seg)]));
    assert_push_failed(&o, "stale socket");
    let o = out(thin(
        &stale,
        &["wal-fetch", "000000010000000000000001", s(&dest)],
    ));
    assert_fetch_failed(&o, &dest, "stale socket");
}

/// A fake daemon: answers each of `answers` connections with the given bytes
/// (after reading the request line), then closes.
fn fake_daemon(socket: &Path, answers: Vec<Vec<u8>>) -> std::thread::JoinHandle<Vec<String>> {
    let listener = UnixListener::bind(socket).expect("bind fake daemon");
    std::thread::spawn(move || {
        let mut requests = Vec::new();
        for answer in answers {
            let (conn, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(conn.try_clone().expect("clone"));
            let mut line = String::new();
            reader.read_line(&mut line).expect("read request");
            requests.push(line);
            let mut conn = conn;
            let _ = conn.write_all(&answer);
        }
        requests
    })
}

#[test]
fn thin_client_fails_safely_when_the_daemon_dies_mid_request() {
    let work = Workdir::new("thin-dies");
    let seg = work.path().join("000000010000000000000001");
    std::fs::write(&seg, vec![0u8; 8192]).expect("write");
    let dest_dir = work.path().join("dest");
    std::fs::create_dir_all(&dest_dir).expect("mkdir");
    let dest = dest_dir.join("RECOVERYXLOG");
    let name = "000000010000000000000001";
    let socket = work.path().join("fake.sock");
    let full = b"0123456789".repeat(100);
    let mut ok_answer = br#"{"status":"ok","len":1000}"#.to_vec();
    ok_answer.push(b'\n');
    ok_answer.extend_from_slice(&full);
    let server = fake_daemon(
        &socket,
        vec![
            Vec::new(),                                               // push: closes without answering
            Vec::new(), // fetch: closes without answering
            b"{\"status\":\"ok\",\"len\":1000}\n0123456789".to_vec(), // fetch: dies mid-body
            b"{\"status\":\"ok\"\n".to_vec(), // fetch: garbage
            b"{\"status\":\"error\",\"message\":\"storage down\"}\n".to_vec(), // fetch: error
            b"{\"status\":\"not-found\",\"message\":\"absent\"}\n".to_vec(), // fetch: definitive absence
            ok_answer,                                                       // fetch: complete
            b"{\"status\":\"ok\"}\n".to_vec(),                               // push: archived
        ],
    );
    let o = out(thin(&socket, &["wal-push", s(&seg)]));
    assert_push_failed(&o, "daemon closed before answering a push");
    assert!(
        stderr(&o).contains("closed the connection"),
        "{}",
        stderr(&o)
    );
    for what in [
        "closed before answering",
        "died mid-body",
        "garbage answer",
        "error answer",
    ] {
        let o = out(thin(&socket, &["wal-fetch", name, s(&dest)]));
        assert_fetch_failed(&o, &dest, what);
    }
    // Controls: only a definitive "absent" gives 1; a complete answer gives 0 and the bytes.
    let o = out(thin(&socket, &["wal-fetch", name, s(&dest)]));
    assert_eq!(code(&o), 1, "not-found answer: {}", stderr(&o));
    assert!(!dest.exists());
    let o = out(thin(&socket, &["wal-fetch", name, s(&dest)]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&dest).expect("dest"), full);
    // Relative %p is resolved against the client's working directory.
    let mut relative = thin(&socket, &["wal-push", "000000010000000000000001"]);
    relative.current_dir(work.path());
    let o = out(relative);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let requests = server.join().expect("fake daemon");
    assert_eq!(requests.len(), 8);
    assert!(
        requests[7].contains(&format!("\"path\":\"{}\"", seg.display())),
        "relative path not made absolute: {}",
        requests[7]
    );
}

/// Waits until the daemon's storage traffic counter passes `bytes`.
fn wait_traffic(daemon: &Daemon, metric: &str, bytes: f64) {
    wait_for(
        &format!("{metric} > {bytes}"),
        Duration::from_secs(120),
        || (daemon.metrics().get(metric) > bytes).then_some(()),
    );
}

fn key_of(seg: &Path) -> String {
    let name = seg.file_name().and_then(|n| n.to_str()).expect("name");
    format!("wal/{}/{name}.zst", &name[..16])
}

#[test]
fn real_daemon_killed_mid_request_and_graceful_shutdown() {
    let work = Workdir::new("thin-kill");
    let segs = real_segments(&work, 4);
    let archive = Archive::new(StorageKind::S3, work.path(), "db");
    let mut daemon = Daemon::start(work.path(), "d", archive.env());
    let proxy = archive.proxy();

    // kill -9 while a push uploads: the client fails; nothing is stored.
    proxy.throttle(16 << 10);
    let mut child = thin(&daemon.socket, &["wal-push", s(&segs[0])])
        .spawn()
        .expect("spawn wal-push");
    wait_traffic(&daemon, "walden_storage_uploaded_bytes_total", 2048.0);
    daemon.kill9();
    let status = child.wait().expect("wait wal-push");
    assert!(
        !status.success(),
        "wal-push succeeded although the daemon died mid-upload"
    );
    proxy.pass();
    let keys = block_on(archive.keys());
    assert!(
        !keys.contains(&key_of(&segs[0])),
        "a push killed mid-upload left {keys:?}"
    );

    // After a restart the same push succeeds.
    daemon.restart();
    let o = out(thin(&daemon.socket, &["wal-push", s(&segs[0])]));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(block_on(archive.keys()).contains(&key_of(&segs[0])));

    // kill -9 while a fetch downloads: 254 and no destination file.
    let dest_dir = work.path().join("restore");
    std::fs::create_dir_all(&dest_dir).expect("mkdir");
    let dest = dest_dir.join("RECOVERYXLOG");
    daemon.restart();
    proxy.throttle(16 << 10);
    let before = daemon
        .metrics()
        .get("walden_storage_downloaded_bytes_total");
    let name = segs[0].file_name().and_then(|n| n.to_str()).expect("name");
    let child = thin(&daemon.socket, &["wal-fetch", name, s(&dest)])
        .spawn()
        .expect("spawn wal-fetch");
    wait_traffic(
        &daemon,
        "walden_storage_downloaded_bytes_total",
        before + 4096.0,
    );
    daemon.kill9();
    let o = child.wait_with_output().expect("wait wal-fetch");
    assert_fetch_failed(&o, &dest, "daemon killed mid-fetch");
    proxy.pass();

    // SIGTERM during an upload, with time to finish: the client hears "archived".
    let mut env = archive.env();
    env.push(("WALDEN_SHUTDOWN_TIMEOUT".into(), "120".into()));
    let mut daemon = Daemon::start(work.path(), "graceful", env);
    proxy.throttle(256 << 10);
    let child = thin(&daemon.socket, &["wal-push", s(&segs[1])])
        .spawn()
        .expect("spawn wal-push");
    wait_traffic(&daemon, "walden_storage_uploaded_bytes_total", 1024.0);
    let status = daemon.terminate(Duration::from_secs(180));
    assert!(
        status.success(),
        "daemon exit after SIGTERM: {status}\n{}",
        daemon.log_text()
    );
    let o = child.wait_with_output().expect("wait");
    assert_eq!(
        code(&o),
        0,
        "upload in flight at SIGTERM was not let finish: {}",
        stderr(&o)
    );
    assert!(block_on(archive.keys()).contains(&key_of(&segs[1])));
    assert!(!daemon.socket.exists(), "socket left behind after shutdown");

    // SIGTERM with no time to finish: abandoned, not reported, not remembered.
    let mut env = archive.env();
    env.push(("WALDEN_SHUTDOWN_TIMEOUT".into(), "1".into()));
    let mut daemon = Daemon::start(work.path(), "hasty", env);
    proxy.throttle(8 << 10);
    let child = thin(&daemon.socket, &["wal-push", s(&segs[2])])
        .spawn()
        .expect("spawn wal-push");
    wait_traffic(&daemon, "walden_storage_uploaded_bytes_total", 1024.0);
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(status.success(), "daemon exit after SIGTERM: {status}");
    let o = child.wait_with_output().expect("wait");
    assert_ne!(code(&o), 0, "an abandoned upload was reported archived");
    proxy.pass();
    assert!(!block_on(archive.keys()).contains(&key_of(&segs[2])));
    let log = std::fs::read_to_string(daemon.state_dir.join("archived.jsonl")).unwrap_or_default();
    assert!(
        !log.contains(segs[2].file_name().and_then(|n| n.to_str()).expect("name")),
        "abandoned upload remembered as archived: {log}"
    );
}
