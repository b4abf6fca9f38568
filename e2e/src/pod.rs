//! Runs the containers of a pod spec built by the operator as local
//! processes, so the process-level tests execute exactly the commands, args
//! and environment the operator puts into pods.
//!
//! The mapping from the pod's world to this machine is deliberately small,
//! and it is all here:
//! - **volumes**: each volume of the pod (emptyDir, Secret, the data claim)
//!   is a directory under the pod's work directory; a pod path is mapped
//!   through the mounts *of the container that uses it* (longest mount path
//!   wins), so a path a container cannot see in the pod has no mapping here
//!   either ([`Pod::map_path`] returns `None`);
//! - **images**: the walden image's `/usr/local/bin/walden` is a copy of the
//!   built binary in a per-pod image root; the postgres image is the local
//!   PostgreSQL 15, whose entrypoint (`postgres` on `$PGDATA` with the
//!   container's `-c` args) is run with `pg_ctl`, and whose `PATH` holds
//!   that server's bin directory (as the image's does);
//! - **network**: every container port of the pod maps to a free port on
//!   127.0.0.1 (`0.0.0.0:P` and `PGPORT=P` are rewritten);
//! - **users**: the pod's `runAsUser` is the local `postgres` user;
//! - **Kubernetes semantics**: `valueFrom.secretKeyRef` reads the test's
//!   Secrets, `$(VAR)` in commands expands from the container's env, and
//!   `/dev/termination-log` (the default terminationMessagePath) is a file
//!   per container that [`Pod::termination_message`] reads back;
//! - **test safety**: `PATH`, `AWS_EC2_METADATA_DISABLED=true` and empty
//!   AWS config files are added to every process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use k8s_openapi::api::core::v1::{Container, PodSpec, Secret};

use crate::sys::{as_pg, chown_pg, free_port, pg_bin, walden_bin};

/// Kubernetes' default terminationMessagePath.
pub const TERMINATION_LOG: &str = "/dev/termination-log";

/// The binary inside the walden image (the operator's `IMAGE_BINARY`).
pub const IMAGE_BINARY: &str = "/usr/local/bin/walden";

/// Secrets of the pod's namespace: `(name, key) -> value`.
#[derive(Default, Clone)]
pub struct Secrets(pub BTreeMap<(String, String), String>);

impl Secrets {
    pub fn insert(&mut self, name: &str, key: &str, value: &str) {
        self.0
            .insert((name.to_string(), key.to_string()), value.to_string());
    }

    /// Adds every key of a Secret object (e.g. one an operator builder made).
    pub fn add(&mut self, secret: &Secret) {
        let name = secret.metadata.name.clone().unwrap_or_default();
        for (k, v) in secret.data.iter().flatten() {
            self.insert(&name, k, &String::from_utf8_lossy(&v.0));
        }
        for (k, v) in secret.string_data.iter().flatten() {
            self.insert(&name, k, v);
        }
    }

    fn get(&self, name: &str, key: &str) -> Option<&String> {
        self.0.get(&(name.to_string(), key.to_string()))
    }
}

pub struct Pod {
    pub name: String,
    pub spec: PodSpec,
    pub root: PathBuf,
    /// Volume name -> local directory.
    pub volumes: BTreeMap<String, PathBuf>,
    /// Pod port -> local port.
    pub ports: BTreeMap<u16, u16>,
    pub walden_image: String,
    /// The walden image's binary, as a file of this pod's image root.
    pub image_binary: PathBuf,
    secrets: Secrets,
    children: Vec<Child>,
}

impl Pod {
    /// Prepares the pod's volumes (Secret volumes filled from `secrets`) and
    /// its port map. `pod_ports` are extra ports of the pod (e.g. 5432 of a
    /// postgres container that declares none).
    pub fn new(
        work: &Path,
        name: &str,
        spec: PodSpec,
        walden_image: &str,
        secrets: Secrets,
        pod_ports: &[u16],
    ) -> Self {
        let root = work.join(format!("pod-{name}"));
        let mut volumes = BTreeMap::new();
        let mut names: Vec<String> = spec
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.clone())
            .collect();
        // Volumes from claim templates are named by the mounts that use them.
        for c in spec
            .init_containers
            .iter()
            .flatten()
            .chain(spec.containers.iter())
        {
            for m in c.volume_mounts.iter().flatten() {
                if !names.contains(&m.name) {
                    names.push(m.name.clone());
                }
            }
        }
        for v in names {
            let dir = root.join("volumes").join(&v);
            std::fs::create_dir_all(&dir).expect("volume dir");
            chown_pg(&dir);
            volumes.insert(v, dir);
        }
        for v in spec.volumes.iter().flatten() {
            if let Some(s) = &v.secret {
                let secret = s.secret_name.clone().unwrap_or_default();
                let dir = &volumes[&v.name];
                let keys: Vec<_> = secrets
                    .0
                    .iter()
                    .filter(|((n, _), _)| *n == secret)
                    .collect();
                assert!(
                    !keys.is_empty(),
                    "pod {name}: volume {} needs Secret {secret}, which the test does not have",
                    v.name
                );
                for ((_, k), value) in keys {
                    let f = dir.join(k);
                    std::fs::write(&f, value).expect("secret file");
                    chown_pg(&f);
                }
            }
        }
        let image_dir = root.join("image-walden/usr/local/bin");
        std::fs::create_dir_all(&image_dir).expect("image root");
        let image_binary = image_dir.join("walden");
        std::fs::copy(walden_bin(), &image_binary).expect("copy walden into the image root");
        let mut ports = BTreeMap::new();
        let declared = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| p.container_port as u16);
        for p in declared.chain(pod_ports.iter().copied()) {
            ports.entry(p).or_insert_with(free_port);
        }
        Self {
            name: name.to_string(),
            spec,
            root,
            volumes,
            ports,
            walden_image: walden_image.to_string(),
            image_binary,
            secrets,
            children: Vec::new(),
        }
    }

    pub fn init_container(&self, name: &str) -> &Container {
        self.spec
            .init_containers
            .iter()
            .flatten()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {}: no init container {name}", self.name))
    }

    pub fn container(&self, name: &str) -> &Container {
        self.spec
            .containers
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {}: no container {name}", self.name))
    }

    /// Where `pod_path` is on this machine, as container `c` sees it; `None`
    /// when `c` cannot see that path in the pod.
    pub fn map_path(&self, c: &Container, pod_path: &str) -> Option<PathBuf> {
        if c.image.as_deref() == Some(self.walden_image.as_str()) && pod_path == IMAGE_BINARY {
            return Some(self.image_binary.clone());
        }
        let m = c
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| {
                let base = m.mount_path.trim_end_matches('/');
                pod_path == base || pod_path.starts_with(&format!("{base}/"))
            })
            .max_by_key(|m| m.mount_path.len())?;
        let rest = pod_path[m.mount_path.trim_end_matches('/').len()..].trim_start_matches('/');
        let dir = &self.volumes[&m.name];
        Some(if rest.is_empty() {
            dir.clone()
        } else {
            dir.join(rest)
        })
    }

    /// The reverse of [`Pod::map_path`]: a local path as container `c` sees it.
    pub fn unmap_path(&self, c: &Container, local: &str) -> Option<String> {
        if c.image.as_deref() == Some(self.walden_image.as_str())
            && local == self.image_binary.to_string_lossy()
        {
            return Some(IMAGE_BINARY.to_string());
        }
        c.volume_mounts.iter().flatten().find_map(|m| {
            let dir = self.volumes[&m.name].to_string_lossy().into_owned();
            let rest = local.strip_prefix(&dir)?;
            (rest.is_empty() || rest.starts_with('/'))
                .then(|| format!("{}{rest}", m.mount_path.trim_end_matches('/')))
        })
    }

    /// Rewrites every pod path in `value` that `c` can see (by its mounts,
    /// longest first) and the walden image's binary.
    pub fn map_value(&self, c: &Container, value: &str) -> String {
        let mut mounts: Vec<_> = c.volume_mounts.iter().flatten().collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_path.len()));
        let mut out = String::new();
        let mut rest = value;
        'scan: while !rest.is_empty() {
            if c.image.as_deref() == Some(self.walden_image.as_str())
                && rest.starts_with(IMAGE_BINARY)
            {
                out.push_str(&self.image_binary.to_string_lossy());
                rest = &rest[IMAGE_BINARY.len()..];
                continue;
            }
            for m in &mounts {
                let base = m.mount_path.trim_end_matches('/');
                if let Some(after) = rest.strip_prefix(base) {
                    if after.is_empty() || after.starts_with('/') || after.starts_with(' ') {
                        out.push_str(&self.volumes[&m.name].to_string_lossy());
                        rest = after;
                        continue 'scan;
                    }
                }
            }
            let mut chars = rest.chars();
            if let Some(ch) = chars.next() {
                out.push(ch);
            }
            rest = chars.as_str();
        }
        out
    }

    fn map_network(&self, name: &str, value: &str) -> String {
        for prefix in ["0.0.0.0:", "127.0.0.1:"] {
            if let Some(p) = value
                .strip_prefix(prefix)
                .and_then(|p| p.parse::<u16>().ok())
            {
                if let Some(local) = self.ports.get(&p) {
                    return format!("127.0.0.1:{local}");
                }
            }
        }
        if name == "PGPORT" {
            if let Some(local) = value.parse::<u16>().ok().and_then(|p| self.ports.get(&p)) {
                return local.to_string();
            }
        }
        value.to_string()
    }

    /// The container's environment, resolved and mapped.
    pub fn env(&self, c: &Container) -> Vec<(String, String)> {
        let path = if c.image.as_deref() == Some(self.walden_image.as_str()) {
            "/usr/bin:/bin".to_string()
        } else {
            format!("{}:/usr/bin:/bin", pg_bin("").display())
        };
        let mut out: Vec<(String, String)> = vec![
            ("PATH".into(), path),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
            ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ];
        for e in c.env.iter().flatten() {
            let value = if e.value.as_deref() == Some(TERMINATION_LOG) {
                self.termination_log(&c.name).to_string_lossy().into_owned()
            } else if let Some(v) = &e.value {
                self.map_network(&e.name, &self.map_value(c, v))
            } else if let Some(sel) = e
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            {
                self.secrets
                    .get(&sel.name, &sel.key)
                    .unwrap_or_else(|| {
                        panic!(
                            "container {}: env {} needs Secret {}/{}, which the test does not have",
                            c.name, e.name, sel.name, sel.key
                        )
                    })
                    .clone()
            } else {
                panic!(
                    "container {}: env {} has a source the test cannot resolve",
                    c.name, e.name
                )
            };
            out.retain(|(k, _)| *k != e.name);
            out.push((e.name.clone(), value));
        }
        // The walden binary's own default for its state, a pod path under
        // the shared run volume, mapped like any other pod path.
        if c.image.as_deref() == Some(self.walden_image.as_str())
            && !out.iter().any(|(k, _)| k == "WALDEN_STATE_DIR")
        {
            if let Some(dir) = self.map_path(c, "/walden/run/state") {
                out.push((
                    "WALDEN_STATE_DIR".into(),
                    dir.to_string_lossy().into_owned(),
                ));
            }
        }
        out
    }

    /// `command` + `args` with `$(VAR)` expanded from `env` (as the kubelet
    /// does) and pod paths mapped.
    pub fn argv(&self, c: &Container, env: &[(String, String)]) -> Vec<String> {
        c.command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .map(|a| self.map_value(c, &expand(a, env)))
            .collect()
    }

    /// The container's process, ready to spawn: its argv, env, as the pod's user.
    pub fn command(&self, c: &Container) -> Command {
        let env = self.env(c);
        let argv = self.argv(c, &env);
        let (program, args) = argv
            .split_first()
            .unwrap_or_else(|| panic!("container {} has no command", c.name));
        let mut cmd = as_pg(program);
        cmd.env_clear().envs(env).args(args).current_dir("/");
        cmd
    }

    /// Runs an init container to completion; panics with its output on failure.
    pub fn run_init(&self, name: &str) -> std::process::Output {
        let c = self.init_container(name);
        let out = retry_busy(|| self.command(c).output())
            .unwrap_or_else(|e| panic!("init container {name}: {e}"));
        assert!(
            out.status.success(),
            "init container {name} failed with {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs a container (init or not) to its end, whatever its exit status.
    pub fn run_to_end(&self, name: &str) -> std::process::Output {
        let c = self
            .spec
            .init_containers
            .iter()
            .flatten()
            .chain(self.spec.containers.iter())
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("pod {}: no container {name}", self.name));
        retry_busy(|| self.command(c).output()).unwrap_or_else(|e| panic!("container {name}: {e}"))
    }

    /// Starts a long-running container; its stderr goes to `<root>/<name>.log`.
    pub fn start(&mut self, name: &str) -> PathBuf {
        let c = self.container(name).clone();
        let log = self.root.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("container log");
        let child = retry_busy(|| {
            self.command(&c)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(f.try_clone()?)
                .spawn()
        })
        .unwrap_or_else(|e| panic!("container {name}: {e}"));
        self.children.push(child);
        log
    }

    /// `(setting, value)` pairs of the container's `-c name=value` args, mapped.
    pub fn postgres_settings(&self, c: &Container) -> Vec<(String, String)> {
        let env = self.env(c);
        let args = self.argv(c, &env);
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "-c" {
                if let Some((k, v)) = it.next().and_then(|kv| kv.split_once('=')) {
                    out.push((k.to_string(), v.to_string()));
                }
            }
        }
        out
    }

    /// The file a container's termination log is (made writable for the
    /// pod's user, as the kubelet makes it).
    fn termination_log(&self, container: &str) -> PathBuf {
        let f = self.root.join(format!("{container}.termination-log"));
        if !f.exists() && std::fs::write(&f, "").is_ok() {
            chown_pg(&f);
        }
        f
    }

    /// What a container wrote to its termination log, as the kubelet would
    /// put it into the pod status.
    pub fn termination_message(&self, container: &str) -> Option<String> {
        std::fs::read_to_string(self.termination_log(container)).ok()
    }

    pub fn local_port(&self, pod_port: u16) -> u16 {
        self.ports[&pod_port]
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kubernetes' `$(VAR)` expansion in commands; `$$` escapes.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str(&rest[i..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Runs `start` again while it fails with ETXTBSY: a binary this process has
/// just copied can be briefly held open for writing by a child that another
/// test thread forked at that moment (until that child execs).
fn retry_busy<T>(mut start: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut attempts = 0;
    loop {
        match start() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 50 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn kubelet_expansion() {
        let env = vec![("A".to_string(), "x y".to_string())];
        assert_eq!(expand("--c=$(A)", &env), "--c=x y");
        assert_eq!(expand("$$(A) $(B) $", &env), "$(A) $(B) $");
    }
}
