//! `walden daemon` as a test process: its socket, HTTP port, token and state
//! directory, a tiny HTTP client for its API, and a strict parser for its
//! Prometheus text.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::sys::{free_port, wait_for, walden_bin};

pub const TOKEN: &str = "s3cr3t-test-token-0123456789";

/// How to start a daemon beyond its environment.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Arguments after `walden daemon`: settings given as flags.
    pub args: Vec<String>,
    /// The daemon's limit on open file descriptors (soft and hard).
    pub nofile: Option<u64>,
}

pub struct Daemon {
    child: Option<Child>,
    opts: Options,
    pub name: String,
    pub socket: PathBuf,
    pub port: u16,
    pub state_dir: PathBuf,
    pub token_file: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// Starts `walden daemon` with `env` (storage settings, PG*, extras) and
    /// waits until its socket and HTTP API answer.
    pub fn start(work: &Path, name: &str, env: Vec<(String, String)>) -> Self {
        Self::start_with(work, name, env, Options::default())
    }

    /// [`Daemon::start`] with flags and limits.
    pub fn start_with(work: &Path, name: &str, env: Vec<(String, String)>, opts: Options) -> Self {
        let run = work.join(format!("run-{name}"));
        std::fs::create_dir_all(&run).expect("mkdir run");
        std::fs::set_permissions(&run, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod run");
        let token_file = work.join(format!("token-{name}"));
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
        let mut d = Self {
            child: None,
            opts,
            name: name.to_string(),
            socket: run.join("walden.sock"),
            port: free_port(),
            state_dir: work.join(format!("state-{name}")),
            token_file,
            log: work.join(format!("daemon-{name}.log")),
            env,
        };
        d.spawn();
        d
    }

    /// The command that starts this daemon (for tests that expect it to refuse).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(walden_bin());
        cmd.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(self.env.clone())
            .env("WALDEN_SOCKET", &self.socket)
            .env("WALDEN_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WALDEN_TOKEN_FILE", &self.token_file)
            .env("WALDEN_STATE_DIR", &self.state_dir)
            .arg("daemon")
            .args(&self.opts.args);
        cmd
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let mut cmd = Command::new(walden_bin());
        if let Some(n) = self.opts.nofile {
            // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    let limit = libc::rlimit {
                        rlim_cur: n as libc::rlim_t,
                        rlim_max: n as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .envs(self.env.clone())
            .env("WALDEN_SOCKET", &self.socket)
            .env("WALDEN_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("WALDEN_TOKEN_FILE", &self.token_file)
            .env("WALDEN_STATE_DIR", &self.state_dir)
            .env(
                "WALDEN_LOG",
                "info,walden=debug,aws_config=warn,aws_smithy_runtime=warn",
            )
            .arg("daemon")
            .args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start walden daemon");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            &format!("walden daemon {} to answer", self.name),
            Duration::from_secs(60),
            || {
                if let Some(status) = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("walden daemon exited with {status}:\n{}", self.log_text());
                }
                (self.socket.exists() && http(port, "GET", "/healthz", None).ok()?.0 == 200)
                    .then_some(())
            },
        );
    }

    /// Environment for PostgreSQL and other thin clients: only the socket (no storage settings).
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![(
            "WALDEN_SOCKET".to_string(),
            self.socket.display().to_string(),
        )]
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// (current, peak) resident memory of the daemon in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGKILL: the daemon dies with whatever it was doing.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the daemon to exit (panics after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        let ok = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(ok.success(), "kill -TERM failed");
        wait_for("the daemon to exit after SIGTERM", timeout, || {
            c.try_wait().expect("try_wait")
        })
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /v1/status`, read with the contract's types: a field the daemon
    /// no longer sends the way the operator reads it fails here.
    pub fn status(&self) -> walden_contract::api::DaemonStatus {
        let (code, body) = self.http("GET", "/v1/status", Some(TOKEN));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/status: {e}\n{body}"))
    }

    /// One HTTP request to the API; `(status, body)`.
    pub fn http(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        http(self.port, method, path, token)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\ndaemon log:\n{}", self.log_text()))
    }

    /// `http` with the right token, parsing a JSON body.
    pub fn api(&self, method: &str, path: &str) -> (u16, serde_json::Value) {
        let (status, body) = self.http(method, path, Some(TOKEN));
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {body:?}"));
        (status, v)
    }

    /// Starts a base backup with `POST /v1/backups` and waits until it
    /// succeeds (a failed one panics with the daemon's log); returns its id.
    pub fn backup(&self) -> String {
        let (code, started) = self.api("POST", "/v1/backups");
        assert_eq!(code, 202, "{started}");
        let id = started["id"].as_str().expect("id").to_string();
        wait_for(
            &format!("backup {id} to succeed"),
            crate::ledger::LONG,
            || {
                let (_, job) = self.api("GET", &format!("/v1/backups/{id}"));
                assert_ne!(job["state"], "failed", "{job}\n{}", self.log_text());
                (job["state"] == "succeeded").then_some(())
            },
        );
        id
    }

    /// `/metrics`, parsed strictly.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.http("GET", "/metrics", None);
        assert_eq!(status, 200, "/metrics: {body}");
        Metrics::parse(&body)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal HTTP/1.1 client (Connection: close), enough for the daemon's API.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n{auth}\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP header in {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Samples of a Prometheus/OpenMetrics text exposition, keyed by
/// `name{labels}` exactly as exposed.
#[derive(Debug, Clone)]
pub struct Metrics(pub BTreeMap<String, f64>);

impl Metrics {
    /// Parses the text, panicking on any line that is not a comment, a
    /// `# TYPE`/`# HELP`/`# UNIT` line, `# EOF`, or `name{labels} value`.
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        assert!(text.trim_end().ends_with("# EOF"), "no # EOF terminator");
        for line in text.lines() {
            if line.is_empty()
                || line == "# EOF"
                || line.starts_with("# HELP ")
                || line.starts_with("# UNIT ")
            {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
                assert!(
                    [
                        "counter",
                        "gauge",
                        "histogram",
                        "info",
                        "unknown",
                        "summary",
                        "stateset",
                        "gaugehistogram"
                    ]
                    .contains(&kind),
                    "unknown metric type in {line:?}"
                );
                types.insert(name.to_string(), kind.to_string());
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment {line:?}");
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("no value in {line:?}"));
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                    && !name.starts_with(|c: char| c.is_ascii_digit()),
                "bad metric name in {line:?}"
            );
            if name_end < series.len() {
                let labels = &series[name_end..];
                assert!(labels.ends_with('}'), "unterminated labels in {line:?}");
                for pair in labels[1..labels.len() - 1]
                    .split(',')
                    .filter(|p| !p.is_empty())
                {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name in {line:?}"
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
            }
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                "NaN" => f64::NAN,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let family_known = types
                .keys()
                .any(|t| name == t || name.starts_with(&format!("{t}_")));
            assert!(family_known, "sample {name} before its # TYPE line");
            samples.insert(series.to_string(), v);
        }
        Self(samples)
    }

    /// A sample's value (0 when absent: counters and label sets appear on first use).
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Sum over every sample of `name` whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}
