//! The `walden` binary: parse the command line, set up logging and the
//! runtime, and hand over to [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, EXIT_FETCH_FAILED};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WALDEN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.with_target(false).init();
    }
}

/// True when the command line asks for `wal-fetch`, even if it fails to parse.
fn is_wal_fetch() -> bool {
    std::env::args().skip(1).any(|a| a == "wal-fetch")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let usage_error = e.use_stderr();
            // A misconfigured restore_command must not look like "file not found".
            return if usage_error && is_wal_fetch() {
                ExitCode::from(EXIT_FETCH_FAILED)
            } else {
                ExitCode::from(e.exit_code() as u8)
            };
        }
    };
    init_logging(&cli.log_format);
    if let Some(code) = cli::delegate(&cli.command) {
        return code;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("walden: cannot start the async runtime: {e}");
            return ExitCode::from(if is_wal_fetch() { EXIT_FETCH_FAILED } else { 1 });
        }
    };
    runtime.block_on(cli::run(cli))
}
