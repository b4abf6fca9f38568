//! The protected PostgreSQL server, reached the way libpq reaches it:
//! `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGCONNECT_TIMEOUT`,
//! or a connection string.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::{Client, Config, NoTls};

/// The system identifier at the start of `global/pg_control` (the same
/// offset in every supported version).
pub fn control_system_identifier(pgdata: &Path) -> std::io::Result<u64> {
    let bytes = std::fs::read(pgdata.join("global/pg_control"))?;
    let head: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| std::io::Error::other("pg_control is too short"))?;
    Ok(u64::from_le_bytes(head))
}

/// The major version a data directory's `PG_VERSION` file names.
pub fn data_dir_version(pgdata: &Path) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(pgdata.join("PG_VERSION"))?;
    text.trim().parse().map_err(|_| {
        std::io::Error::other(format!(
            "PG_VERSION holds {:?}, not a major version",
            text.trim()
        ))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("invalid PostgreSQL connection settings: {0}")]
    Config(String),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL {what} failed: {source}")]
    Query {
        what: &'static str,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL returned something unexpected for {what}: {detail}")]
    Unexpected { what: &'static str, detail: String },
    #[error("{0}")]
    Unsupported(String),
}

/// The PostgreSQL major versions this walden supports: each one runs the
/// version matrix in CI (`e2e/tests/pg_versions.rs`).
pub const SUPPORTED_MAJORS: std::ops::RangeInclusive<u32> = 14..=18;

/// Refuses a server version (`server_version_num`, e.g. 170004) outside
/// [`SUPPORTED_MAJORS`], naming it and the supported range.
pub fn check_supported(version_num: u32) -> Result<(), String> {
    let major = version_num / 10000;
    if SUPPORTED_MAJORS.contains(&major) {
        return Ok(());
    }
    Err(format!(
        "PostgreSQL {major} (server_version_num {version_num}) is not supported by walden {}: \
         it supports PostgreSQL {} to {}",
        env!("CARGO_PKG_VERSION"),
        SUPPORTED_MAJORS.start(),
        SUPPORTED_MAJORS.end()
    ))
}

/// Builds a connection config from a connection string, or else from the
/// libpq environment variables with libpq's defaults.
pub fn config(conninfo: Option<&str>) -> Result<Config, PgError> {
    let mut cfg =
        match conninfo.filter(|c| !c.trim().is_empty()) {
            Some(c) => Config::from_str(c).map_err(|e| PgError::Config(e.to_string()))?,
            None => {
                let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
                let mut cfg = Config::new();
                let host = var("PGHOST").unwrap_or_else(|| {
                    if Path::new("/var/run/postgresql").is_dir() {
                        "/var/run/postgresql".into()
                    } else {
                        "localhost".into()
                    }
                });
                for h in host.split(',') {
                    if h.starts_with('/') {
                        cfg.host_path(h);
                    } else {
                        cfg.host(h);
                    }
                }
                let port = var("PGPORT").unwrap_or_else(|| "5432".into());
                cfg.port(port.parse().map_err(|_| {
                    PgError::Config(format!("PGPORT={port:?} is not a port number"))
                })?);
                let user = var("PGUSER")
                    .or_else(|| var("USER"))
                    .unwrap_or_else(|| "postgres".into());
                cfg.dbname(var("PGDATABASE").unwrap_or_else(|| user.clone()));
                cfg.user(&user);
                if let Some(pw) = var("PGPASSWORD") {
                    cfg.password(pw);
                }
                if let Some(t) = var("PGCONNECT_TIMEOUT") {
                    let secs: u64 = t.parse().map_err(|_| {
                        PgError::Config(format!("PGCONNECT_TIMEOUT={t:?} is not a number"))
                    })?;
                    cfg.connect_timeout(Duration::from_secs(secs));
                }
                cfg
            }
        };
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(30));
    }
    cfg.application_name("walden");
    Ok(cfg)
}

fn describe(cfg: &Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{} port {port} as {}",
        hosts.join(","),
        cfg.get_user().unwrap_or("?")
    )
}

/// Connects, driving the connection on a background task.
pub async fn connect(cfg: &Config) -> Result<Client, PgError> {
    let (client, conn) = cfg
        .connect(NoTls)
        .await
        .map_err(|source| PgError::Connect {
            target: describe(cfg),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// What a backup needs to know about the server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub system_identifier: u64,
    pub version_num: u32,
    pub segment_size: u32,
    pub data_directory: String,
    pub in_recovery: bool,
}

pub async fn server_info(client: &Client) -> Result<ServerInfo, PgError> {
    let q = |what| move |source| PgError::Query { what, source };
    let row = client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), \
                    current_setting('server_version_num'), \
                    current_setting('wal_segment_size'), \
                    current_setting('data_directory'), \
                    pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(q("reading the server's identity"))?;
    let sysid: String = row.get(0);
    let version: String = row.get(1);
    let seg: String = row.get(2);
    let unexpected = |detail: String| PgError::Unexpected {
        what: "server identity",
        detail,
    };
    let version_num = version
        .parse()
        .map_err(|_| unexpected(format!("server_version_num {version:?}")))?;
    check_supported(version_num).map_err(PgError::Unsupported)?;
    Ok(ServerInfo {
        system_identifier: sysid
            .parse()
            .map_err(|_| unexpected(format!("system identifier {sysid:?}")))?,
        version_num,
        segment_size: parse_size(&seg)
            .ok_or_else(|| unexpected(format!("wal_segment_size {seg:?}")))?,
        data_directory: row.get(3),
        in_recovery: row.get(4),
    })
}

/// Parses PostgreSQL's size display (`16MB`, `1GB`, `16777216`).
pub fn parse_size(s: &str) -> Option<u32> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    u32::try_from(n * mult).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_data_directorys_identity() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("global")).unwrap();
        let mut control = 7_300_000_000_000_000_001u64.to_le_bytes().to_vec();
        control.extend([0u8; 100]);
        std::fs::write(dir.path().join("global/pg_control"), &control).unwrap();
        std::fs::write(dir.path().join("PG_VERSION"), "18\n").unwrap();
        assert_eq!(
            control_system_identifier(dir.path()).unwrap(),
            7_300_000_000_000_000_001
        );
        assert_eq!(data_dir_version(dir.path()).unwrap(), 18);
        std::fs::write(dir.path().join("PG_VERSION"), "eighteen").unwrap();
        let err = data_dir_version(dir.path()).unwrap_err().to_string();
        assert!(err.contains("eighteen"), "{err}");
        std::fs::write(dir.path().join("global/pg_control"), [1u8; 4]).unwrap();
        assert!(control_system_identifier(dir.path()).is_err());
    }

    #[test]
    fn parses_postgres_sizes() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("16777216"), Some(16 << 20));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn supported_versions_table() {
        for (version_num, supported) in [
            (130015, false),
            (140000, true),
            (140023, true),
            (150018, true),
            (160014, true),
            (170010, true),
            (180006, true),
            (190000, false),
            (90624, false),
        ] {
            let got = check_supported(version_num);
            assert_eq!(got.is_ok(), supported, "{version_num}: {got:?}");
            if let Err(e) = got {
                let major = version_num / 10000;
                assert!(e.contains(&format!("PostgreSQL {major} ")), "{e}");
                assert!(e.contains("supports PostgreSQL 14 to 18"), "{e}");
            }
        }
    }

    #[test]
    fn conninfo_strings_are_accepted_and_bad_ones_explained() {
        let cfg = config(Some("host=127.0.0.1 port=5433 user=alice dbname=x")).unwrap();
        assert_eq!(cfg.get_ports(), &[5433]);
        assert_eq!(cfg.get_user(), Some("alice"));
        let err = config(Some("host=127.0.0.1 port=notaport"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("invalid PostgreSQL connection settings"),
            "{err}"
        );
    }
}
