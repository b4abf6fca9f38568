//! The pods the operator builds, as the walden binary inside them sees them:
//! the daemon's port, the shared paths, and the names of the environment
//! variables the operator sets and walden reads (through clap's `env`).

/// Port of the daemon's HTTP API in every pod the operator configures.
pub const DAEMON_PORT: u16 = 8008;

/// The directory shared by PostgreSQL and the sidecar (socket, temp files).
pub const RUN_DIR: &str = "/walden/run";
/// The daemon's unix socket: `archive_command` and `restore_command` reach it here.
pub const SOCKET: &str = "/walden/run/walden.sock";
/// Where the API token Secret is mounted, and its key.
pub const TOKEN_DIR: &str = "/walden/token";
pub const TOKEN_KEY: &str = "token";
/// Where the kubelet reads a container's termination message.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// The zstd level used when none is set, by the CLI and by the operator
/// alike: level 1 keeps archiving ahead of WAL generation on one core (the
/// level every test and benchmark runs at).
pub const DEFAULT_COMPRESSION_LEVEL: i32 = 1;

/// Environment variable names.
pub mod env {
    pub const STORAGE: &str = "WALDEN_STORAGE";
    pub const S3_ENDPOINT: &str = "WALDEN_S3_ENDPOINT";
    pub const S3_PATH_STYLE: &str = "WALDEN_S3_PATH_STYLE";
    pub const SOCKET: &str = "WALDEN_SOCKET";
    pub const LISTEN: &str = "WALDEN_LISTEN";
    pub const TOKEN_FILE: &str = "WALDEN_TOKEN_FILE";
    pub const READ_ONLY: &str = "WALDEN_READ_ONLY";
    pub const COMPRESSION_LEVEL: &str = "WALDEN_COMPRESSION_LEVEL";
    pub const ENCRYPTION_KEY_FILE: &str = "WALDEN_ENCRYPTION_KEY_FILE";
    pub const RETENTION_FULL: &str = "WALDEN_RETENTION_FULL";
    pub const RETENTION_WINDOW: &str = "WALDEN_RETENTION_WINDOW";
    pub const TERMINATION_LOG: &str = "WALDEN_TERMINATION_LOG";
    pub const RESTORE_IF_RESTORED: &str = "WALDEN_RESTORE_IF_RESTORED";
    /// A Follower's connection to its primary, used by its restore container's command line.
    pub const PRIMARY_CONNINFO: &str = "WALDEN_PRIMARY_CONNINFO";
    pub const RESTORE_TEST_AMCHECK: &str = "WALDEN_RESTORE_TEST_AMCHECK";
    pub const RESTORE_TEST_CHECKS: &str = "WALDEN_RESTORE_TEST_CHECKS";
    pub const RESTORE_TEST_DATABASE: &str = "WALDEN_RESTORE_TEST_DATABASE";
    pub const RESTORE_TEST_SOCKET_DIR: &str = "WALDEN_RESTORE_TEST_SOCKET_DIR";
    pub const RESTORE_TEST_TIMEOUT: &str = "WALDEN_RESTORE_TEST_TIMEOUT";
    pub const RESTORE_TEST_USER: &str = "WALDEN_RESTORE_TEST_USER";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_lives_in_the_shared_run_dir() {
        assert_eq!(
            std::path::Path::new(SOCKET).parent(),
            Some(std::path::Path::new(RUN_DIR))
        );
    }
}
