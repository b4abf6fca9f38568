//! The Walden operator: kube-rs controllers for `ContinuousBackup`, `Fork`
//! and `Follower` (design §1, §2, §7).

pub mod api;
pub mod archives;
pub mod controllers;
pub mod daemon_client;
pub mod events;
pub mod fleet;
pub mod leader;
pub mod metrics;
pub mod restore_test;
pub mod rules;
pub mod schedule;
pub mod server;
pub mod specs;

/// Selects rustls's crypto provider for the Kubernetes client. The workspace
/// also links the AWS SDK, whose rustls features differ; with more than one
/// provider compiled in, rustls cannot choose by itself.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
