//! The real-cluster suite (`e2e/cluster/run.sh`), run from `cargo test` when a
//! cluster is given with `WALDEN_E2E_KUBECONFIG`; skipped with a message
//! otherwise (a plain KUBECONFIG is not enough, so that `cargo test` never
//! installs into a cluster by accident).

use std::path::Path;
use std::process::Command;

#[test]
fn real_cluster_suite() {
    let Some(kubeconfig) = std::env::var_os("WALDEN_E2E_KUBECONFIG") else {
        eprintln!(
            "SKIP real_cluster_suite: set WALDEN_E2E_KUBECONFIG to a cluster's kubeconfig \
             (e.g. kind) to run e2e/cluster/run.sh"
        );
        return;
    };
    // Cargo's runtime value: a shared build cache may hold a binary compiled in another clone.
    let script = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
        .join("cluster/run.sh");
    let status = Command::new("bash")
        .arg(&script)
        .env("WALDEN_E2E_KUBECONFIG", kubeconfig)
        .status()
        .expect("run e2e/cluster/run.sh");
    assert!(status.success(), "e2e/cluster/run.sh failed: {status}");
}
