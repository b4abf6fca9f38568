//! The operator binary's text logs, as `kubectl logs` shows them (a pipe).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed expectation is the report

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A kubeconfig whose server refuses connections: the operator starts, logs
/// "waiting for leadership" and keeps failing to reach the Lease.
const KUBECONFIG: &str = "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:1
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: t
contexts:
- name: c
  context:
    cluster: c
    user: u
current-context: c
";

#[test]
fn text_logs_to_a_pipe_carry_no_ansi_colours() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, KUBECONFIG).expect("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_walden-operator"))
        .args([
            "run",
            "--log-format",
            "text",
            "--walden-image",
            "walden:test",
            "--probe-addr",
            "127.0.0.1:0",
            "--identity",
            "logs-test",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("NO_COLOR")
        .env_remove("RUST_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start walden-operator");
    let (tx, rx) = mpsc::channel();
    for out in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().expect("stderr")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                if tx.send(std::mem::take(&mut line)).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let done = String::from_utf8_lossy(&line).contains("waiting for leadership");
                seen.push(line);
                if done {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let text: Vec<String> = seen
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    assert!(found, "no 'waiting for leadership' line; output: {text:?}");
    for line in &seen {
        assert!(
            !line.contains(&0x1b),
            "ANSI escape in a piped log line: {:?}",
            String::from_utf8_lossy(line)
        );
    }
}
