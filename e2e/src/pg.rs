//! A real PostgreSQL cluster, run as the `postgres` OS user on 127.0.0.1:
//! PostgreSQL 15 (Debian's package) unless a test asks for another major
//! version of the matrix (`e2e/install-pg-versions.sh` installs 14, 16, 17, 18).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::sys::{as_pg, chown_pg, free_port, pg_bin, run, wait_for, walden_bin};

/// One PostgreSQL installation: the server binaries a cluster runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    pub major: u32,
    pub bin: PathBuf,
}

/// The major versions Walden supports, each proven by the version matrix.
pub const MATRIX: [u32; 5] = [14, 15, 16, 17, 18];

impl Install {
    /// PostgreSQL 15, the version every scenario runs on.
    pub fn default_15() -> Self {
        let bin = pg_bin("postgres");
        Self {
            major: 15,
            bin: bin.parent().expect("bin dir").to_path_buf(),
        }
    }

    /// The server binaries of `major`: 15 is Debian's, the others come from
    /// `$WALDEN_PG_VERSIONS/<major>` (default `/var/tmp/walden-ci/pg`).
    pub fn version(major: u32) -> Self {
        if major == 15 {
            return Self::default_15();
        }
        let root =
            std::env::var("WALDEN_PG_VERSIONS").unwrap_or_else(|_| "/var/tmp/walden-ci/pg".into());
        let bin = Path::new(&root).join(major.to_string()).join("bin");
        assert!(
            bin.join("postgres").exists(),
            "PostgreSQL {major} is not installed in {}: run bash e2e/install-pg-versions.sh \
             (bash .ci/run does)",
            bin.display()
        );
        let install = Self { major, bin };
        let version = install.server_version();
        assert!(
            version.starts_with(&format!("{major}.")),
            "{} is PostgreSQL {version}, not {major}",
            install.bin.display()
        );
        install
    }

    /// A server program (`initdb`, `pg_ctl`, `postgres`, `pg_upgrade`).
    pub fn server(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A client program: this installation's own when it ships one, else
    /// PostgreSQL 15's (psql and pgbench of 15 drive newer servers; 15's
    /// pg_basebackup does not, so tests that clone with it need 15 or 18).
    pub fn client(&self, name: &str) -> PathBuf {
        let own = self.bin.join(name);
        if own.exists() {
            own
        } else {
            pg_bin(name)
        }
    }

    /// `postgres --version`'s number, e.g. `17.10`.
    pub fn server_version(&self) -> String {
        let out = run(Command::new(self.server("postgres")).arg("--version"));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .to_string()
    }
}

pub struct PgCluster {
    pub data: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub install: Install,
    env: Vec<(String, String)>,
    running: bool,
}

impl PgCluster {
    /// `initdb` a new PostgreSQL 15 cluster in `<work>/<name>` (trust auth, loopback only).
    pub fn init(work: &Path, name: &str) -> Self {
        Self::init_with(work, name, &Install::default_15())
    }

    /// `initdb` a new cluster of `install` in `<work>/<name>`.
    pub fn init_with(work: &Path, name: &str, install: &Install) -> Self {
        Self::init_with_flags(work, name, install, &[])
    }

    /// [`PgCluster::init_with`] with more `initdb` flags.
    pub fn init_with_flags(work: &Path, name: &str, install: &Install, flags: &[&str]) -> Self {
        let data = work.join(name);
        std::fs::create_dir_all(&data).expect("mkdir data");
        chown_pg(&data);
        run(as_pg(install.server("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync"])
            .args(flags));
        Self::adopt_with(work, data, install)
    }

    /// Wraps an existing PostgreSQL 15 data directory (a base backup or a restore) with its own port.
    pub fn adopt(work: &Path, data: PathBuf) -> Self {
        Self::adopt_with(work, data, &Install::default_15())
    }

    /// Wraps an existing data directory of `install` with its own port.
    pub fn adopt_with(work: &Path, data: PathBuf, install: &Install) -> Self {
        chown_pg(&data);
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .expect("chmod data");
        let name = data
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let c = Self {
            log: work.join(format!("{name}.log")),
            data,
            port: free_port(),
            install: install.clone(),
            env: Vec::new(),
            running: false,
        };
        c.set(&[
            ("listen_addresses", "'127.0.0.1'".to_string()),
            ("port", c.port.to_string()),
            ("unix_socket_directories", "''".to_string()),
            ("fsync", "off".to_string()),
            ("max_wal_size", "'256MB'".to_string()),
        ]);
        c
    }

    /// Appends settings to postgresql.conf (later lines win).
    pub fn set(&self, settings: &[(&str, String)]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))
            .expect("open conf");
        for (k, v) in settings {
            writeln!(f, "{k} = {v}").expect("write conf");
        }
    }

    /// PostgreSQL itself archives through the walden binary under test
    /// (`archive_mode = on`, `archive_command = 'walden wal-push %p'`).
    pub fn archive_through_walden(&self) {
        self.set(&[
            ("archive_mode", "on".into()),
            (
                "archive_command",
                format!("'{} wal-push %p'", walden_bin().display()),
            ),
        ]);
    }

    /// Environment for the server and so for archive_command / restore_command.
    pub fn with_env(&mut self, env: Vec<(String, String)>) -> &mut Self {
        self.env = env;
        self
    }

    /// libpq settings (`PG*`) that reach this server, and its `PGDATA`, as a sidecar gets them.
    pub fn libpq_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGDATABASE".into(), "postgres".into()),
            ("PGDATA".into(), self.data.display().to_string()),
        ]
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = as_pg(self.install.server("pg_ctl"));
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(self.env.clone());
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(args);
        cmd
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) {
        let _ = std::fs::File::create(&self.log);
        chown_pg(&self.log);
        let out = self.try_start(Duration::from_secs(180));
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        self.running = true;
    }

    /// `pg_ctl start -w`: the caller inspects the outcome (a server may refuse to come up).
    pub fn try_start(&mut self, timeout: Duration) -> Output {
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log);
        chown_pg(&self.log);
        let out = self
            .pg_ctl(&["-w", "-t", &timeout.as_secs().to_string(), "start"])
            .output()
            .expect("pg_ctl");
        self.running = out.status.success();
        out
    }

    pub fn stop(&mut self) {
        let _ = self.pg_ctl(&["-w", "-m", "fast", "stop"]).output();
        self.running = false;
    }

    /// Whether a postmaster is running on the data directory.
    pub fn is_running(&self) -> bool {
        self.pg_ctl(&["status"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs SQL and returns the unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.try_sql(sql).unwrap_or_else(|e| {
            panic!(
                "SQL {sql:?} failed: {e}\nlog tail:\n{}",
                tail(&self.log_text())
            )
        });
        out
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.install.client("psql"))
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-p", &self.port.to_string(), "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn pgbench(&self, args: &[&str]) {
        run(Command::new(self.install.client("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
            ])
            .args(args)
            .arg("postgres"));
    }

    /// Switches to a new WAL segment and returns the name of the one just completed.
    pub fn switch_wal(&self) -> String {
        self.sql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// Waits until `segment` (and so every earlier one) has been archived.
    pub fn wait_archived(&self, segment: &str, timeout: Duration) {
        wait_for(&format!("{segment} to be archived"), timeout, || {
            // last_archived_wal may also be a history or .backup file: compare its segment part.
            let last = self.sql("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver");
            let seg = last
                .get(..24)
                .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()));
            seg.is_some_and(|s| s >= segment).then_some(())
        });
    }

    /// Waits until the server has finished recovery and accepts writes.
    pub fn wait_promoted(&self, timeout: Duration) {
        wait_for("recovery to finish", timeout, || {
            (self.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
        });
    }

    /// pg_stat_archiver's (archived_count, failed_count).
    pub fn archiver_counts(&self) -> (u64, u64) {
        let row = self.sql("SELECT archived_count || ',' || failed_count FROM pg_stat_archiver");
        let (a, f) = row.split_once(',').expect("two columns");
        (a.parse().expect("count"), f.parse().expect("count"))
    }

    /// Names of segments waiting in archive_status with the given suffix (`ready` or `done`).
    pub fn archive_status(&self, suffix: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.data.join("pg_wal/archive_status"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|n| n.strip_suffix(&format!(".{suffix}")).map(str::to_string))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// `pg_basebackup` into `<work>/<name>` without WAL: recovery must take it from the archive.
    pub fn base_backup(&self, work: &Path, name: &str) -> PathBuf {
        let dest = work.join(name);
        std::fs::create_dir_all(&dest).expect("mkdir backup");
        chown_pg(&dest);
        run(as_pg(self.install.client("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
                "-X",
                "none",
                "-c",
                "fast",
                "-D",
            ])
            .arg(&dest));
        dest
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running || self.is_running() {
            let _ = self.pg_ctl(&["-w", "-m", "immediate", "stop"]).output();
        }
    }
}
