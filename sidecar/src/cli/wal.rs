//! `wal-push` and `wal-fetch` when they talk to storage themselves (without
//! `WALDEN_SOCKET`; with it, [`super::delegate`] hands them to the daemon).

use std::path::Path;
use std::process::ExitCode;

use walden::config::Settings;
use walden::wal::{self, PushOptions};

use super::output::{error_chain, short, EXIT_FETCH_FAILED, EXIT_NOT_FOUND};

pub async fn push(settings: &Settings, path: &Path) -> ExitCode {
    let result = async {
        let storage = settings.open_storage().await?;
        let opts = PushOptions {
            seal: settings.seal_options(),
            retry: settings.retry_policy(),
        };
        wal::push(storage.as_ref(), path, &opts)
            .await
            .map_err(anyhow::Error::from)
    }
    .await;
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("wal-push {}: {}", path.display(), error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

pub async fn fetch(settings: &Settings, name: &str, dest: &Path) -> ExitCode {
    let shown = short(name);
    let storage = match settings.open_storage().await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("wal-fetch {shown}: {e}");
            return ExitCode::from(EXIT_FETCH_FAILED);
        }
    };
    let opts = settings.fetch_options();
    match wal::fetch(storage.as_ref(), name, dest, &opts).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) if e.is_not_found() => {
            tracing::info!("wal-fetch {shown}: {e}");
            ExitCode::from(EXIT_NOT_FOUND)
        }
        Err(e) => {
            tracing::error!(
                "wal-fetch {shown}: {e}; stopping recovery rather than ending it early"
            );
            ExitCode::from(EXIT_FETCH_FAILED)
        }
    }
}
