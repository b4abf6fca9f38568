//! Processes, users, ports and paths.

use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "waldentest";
pub const SECRET_KEY: &str = "waldentestsecret";
pub const BUCKET: &str = "walden-e2e";

/// Environment every Walden process in the tests gets: loopback-only, explicit
/// test credentials, no instance-metadata probing, no user AWS config files.
pub fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Puts the test credentials into this process too, for storage opened in-process.
pub fn init_process_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        for (k, v) in aws_env() {
            std::env::set_var(k, v);
        }
    });
}

/// The `walden` binary built next to this test executable.
pub fn walden_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WALDEN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("walden");
    assert!(
        bin.exists(),
        "walden binary not found at {}: run `cargo build -p walden` first",
        bin.display()
    );
    bin
}

/// A PostgreSQL 15 program (initdb, pg_ctl, ...).
pub fn pg_bin(name: &str) -> PathBuf {
    let dir =
        std::env::var("WALDEN_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let p = Path::new(&dir).join(name);
    assert!(
        p.exists(),
        "{} not found: install postgresql-15 (bash .ci/run does)",
        p.display()
    );
    p
}

fn euid() -> u32 {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

/// The uid/gid to run PostgreSQL as: `postgres` when we are root (postgres refuses root).
pub fn pg_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        if euid() != 0 {
            return None;
        }
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .expect("id");
            assert!(
                out.status.success(),
                "running as root needs a `postgres` OS user (install postgresql-15)"
            );
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        Some((id("-u"), id("-g")))
    })
}

/// A command that runs as the PostgreSQL OS user.
pub fn as_pg(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some((uid, gid)) = pg_user() {
        cmd.uid(uid).gid(gid);
        cmd.env("HOME", "/tmp");
    }
    cmd
}

/// Gives a path to the PostgreSQL OS user (no-op when not root).
pub fn chown_pg(path: &Path) {
    if let Some((uid, gid)) = pg_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).expect("chown");
    }
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `check` until it returns Some, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait_for_port(port: u16, timeout: Duration) {
    wait_for(
        &format!("127.0.0.1:{port} to accept connections"),
        timeout,
        || TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()),
    );
}

/// A temporary directory the PostgreSQL user can enter; removed on drop
/// (kept, for a post-mortem, when `WALDEN_E2E_KEEP` is set).
pub struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    pub fn new(name: &str) -> Self {
        init_process_env();
        let dir = tempfile::Builder::new()
            .prefix(&format!("walden-e2e-{name}-"))
            .disable_cleanup(std::env::var_os("WALDEN_E2E_KEEP").is_some())
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A subdirectory owned by the PostgreSQL user.
    pub fn pg_dir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mkdir");
        chown_pg(&p);
        p
    }
}

/// Runs a command to completion and returns its output and peak resident
/// memory in KiB (from the kernel's accounting of the reaped child).
// The child is reaped with wait4 (to read its rusage), which clippy cannot see.
#[allow(clippy::zombie_processes)]
pub fn run_measured(cmd: &mut Command) -> (Output, u64) {
    use std::process::Stdio;
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut stdout = child.stdout.expect("stdout");
    let mut stderr = child.stderr.expect("stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut v);
        v
    });
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data filled in by the kernel; pid is our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed");
    let status = std::os::unix::process::ExitStatusExt::from_raw(status);
    let out = Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    };
    (out, usage.ru_maxrss as u64)
}
