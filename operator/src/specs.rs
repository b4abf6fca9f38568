//! Pure builders from a custom resource to the Kubernetes objects it implies
//! (design §2). No I/O: every function here is tested as data.
//!
//! PostgreSQL settings reach the server as `-c name=value` container args:
//! the official image's entrypoint passes args starting with `-` to
//! `postgres`, so no config file in PGDATA has to be edited.

use crate::api::{
    ContinuousBackup, InstanceSpec, RecoveryTarget, RestoreTestSpec, RetentionSpec, SidecarSpec,
    SidecarUpdatePolicy, StorageSpec, StreamingSpec,
};
use walden_contract::pod::env as wenv;
pub use walden_contract::pod::{RUN_DIR, SOCKET, TERMINATION_LOG, TOKEN_DIR, TOKEN_KEY};

/// The daemon's API port, as Kubernetes' port fields spell it.
const DAEMON_PORT: i32 = walden_contract::pod::DAEMON_PORT as i32;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction,
    HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "walden-operator";
/// Where the `walden` binary is copied for the postgres container.
pub const BIN_DIR: &str = "/walden/bin";
/// The binary inside the walden image.
pub const IMAGE_BINARY: &str = "/usr/local/bin/walden";
pub const INSTALL_CONTAINER: &str = "walden-install";
pub const RESTORE_CONTAINER: &str = "walden-restore";
pub const SIDECAR_CONTAINER: &str = "walden";
pub const POSTGRES_CONTAINER: &str = "postgres";
pub const BIN_VOLUME: &str = "walden-bin";
pub const RUN_VOLUME: &str = "walden-run";
pub const TOKEN_VOLUME: &str = "walden-token";
/// Where Kubernetes mounts a pod's ServiceAccount token into each container.
pub const SA_TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// An empty directory mounted over [`SA_TOKEN_DIR`] in the containers walden
/// injects into a user's pod: they need no Kubernetes API access, and the
/// user's own containers keep the pod's automount setting untouched.
pub const NO_SA_TOKEN_VOLUME: &str = "walden-no-sa-token";
/// The archive's encryption key Secret, mounted read-only where `walden` runs.
pub const ENCRYPTION_VOLUME: &str = "walden-encryption";
pub const ENCRYPTION_DIR: &str = "/walden/encryption";
/// Data volume (claim template) of fork and follower pods.
pub const DATA_VOLUME: &str = "data";
pub const DATA_MOUNT: &str = "/var/lib/postgresql/data";
pub const INSTANCE_PGDATA: &str = "/var/lib/postgresql/data/pgdata";
pub const POSTGRES_PORT: i32 = 5432;
/// Label carrying the owning resource's name on fork and follower pods.
pub const INSTANCE_LABEL: &str = "walden.dev/instance";
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// The container of a restore proof pod that runs `walden restore-test`.
pub const RESTORE_TEST_CONTAINER: &str = "restore-test";
/// Component label of restore proof pods.
pub const RESTORE_TEST_COMPONENT: &str = "restore-test";
/// Annotation on a proof pod: the WAL position it restores to (absent: the
/// end of the archive), so a proof adopted after an operator restart is
/// reported with what it was asked.
pub const RESTORE_TEST_TARGET_ANNOTATION: &str = "walden.dev/restore-test-target-lsn";
/// Env var the follower's restore reads the conninfo from (kept out of the pod spec).
pub const CONNINFO_ENV: &str = wenv::PRIMARY_CONNINFO;

/// Settings of the walden image that are operator-wide.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    pub walden_image: String,
}

/// Why a builder could not produce its objects; shown in a condition.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "StatefulSet {stateful_set} has no container named {container:?} (spec.target.container)"
    )]
    ContainerNotFound {
        stateful_set: String,
        container: String,
    },
    #[error("no volume of container {container:?} is mounted at or above PGDATA {pgdata} (spec.target.pgdata)")]
    PgdataNotOnAVolume { container: String, pgdata: String },
}

impl SpecError {
    /// Machine-readable reason for conditions and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            SpecError::ContainerNotFound { .. } => "ContainerNotFound",
            SpecError::PgdataNotOnAVolume { .. } => "PgdataNotOnAVolume",
        }
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_string(),
                key: key.to_string(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn empty_dir(name: &str) -> Volume {
    Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Default::default()
    }
}

/// Pod security of fork, follower and proof pods: everything runs as the
/// PostgreSQL user, who also owns the volumes.
fn pod_security_context(uid: i64) -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        fs_group: Some(uid),
        ..Default::default()
    }
}

/// Restricted-profile container security: non-root, no privilege
/// escalation, no capabilities, RuntimeDefault seccomp.
pub fn restricted_security_context(uid: i64, read_only_root: bool) -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(uid),
        run_as_group: Some(uid),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        read_only_root_filesystem: Some(read_only_root),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_string()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_string(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// `s3://bucket/prefix`, the storage URL of design §3.
pub fn storage_url(storage: &StorageSpec) -> String {
    s3_url(&storage.s3.bucket, storage.s3.prefix.as_deref())
}

/// The storage URL of a bucket and an optional key prefix (slashes trimmed).
pub fn s3_url(bucket: &str, prefix: Option<&str>) -> String {
    let prefix = prefix.unwrap_or_default().trim_matches('/');
    if prefix.is_empty() {
        format!("s3://{bucket}")
    } else {
        format!("s3://{bucket}/{prefix}")
    }
}

/// Storage settings shared by the daemon and `walden restore`.
pub fn storage_env(storage: &StorageSpec, compression_level: i32, read_only: bool) -> Vec<EnvVar> {
    let s3 = &storage.s3;
    let mut out = vec![env(wenv::STORAGE, storage_url(storage))];
    if let Some(endpoint) = &s3.endpoint {
        out.push(env(wenv::S3_ENDPOINT, endpoint.clone()));
    }
    out.push(env(wenv::S3_PATH_STYLE, s3.path_style.to_string()));
    out.push(env("AWS_REGION", s3.region.clone()));
    if let Some(creds) = &s3.credentials {
        out.push(env_from_secret(
            "AWS_ACCESS_KEY_ID",
            &creds.secret,
            &creds.access_key_id_key,
        ));
        out.push(env_from_secret(
            "AWS_SECRET_ACCESS_KEY",
            &creds.secret,
            &creds.secret_access_key_key,
        ));
    }
    out.push(env(wenv::COMPRESSION_LEVEL, compression_level.to_string()));
    if read_only {
        // Invariant 6: the engine refuses every storage write.
        out.push(env(wenv::READ_ONLY, "true"));
    }
    if let Some(e) = &storage.encryption {
        out.push(env(
            wenv::ENCRYPTION_KEY_FILE,
            format!("{ENCRYPTION_DIR}/{}", e.key),
        ));
    }
    out
}

/// The encryption key Secret as a volume, when the archive is encrypted.
fn encryption_volume(storage: &StorageSpec) -> Option<Volume> {
    storage.encryption.as_ref().map(|e| Volume {
        name: ENCRYPTION_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(e.secret.clone()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Mounts the encryption key into a container that runs `walden` with storage settings.
fn with_encryption_key(mut c: Container, storage: &StorageSpec) -> Container {
    if storage.encryption.is_some() {
        c.volume_mounts.get_or_insert_with(Vec::new).push(mount(
            ENCRYPTION_VOLUME,
            ENCRYPTION_DIR,
            true,
        ));
    }
    c
}

/// The daemon's configuration: everything `walden daemon` reads (design §5).
pub struct DaemonConfig<'a> {
    pub storage: &'a StorageSpec,
    pub compression_level: i32,
    pub read_only: bool,
    pub pgdata: &'a str,
    pub pg_port: i32,
    pub credentials_secret: Option<&'a str>,
    /// Retention the daemon applies after each base backup (primary only).
    pub retention: Option<&'a RetentionSpec>,
}

pub fn daemon_env(cfg: &DaemonConfig<'_>) -> Vec<EnvVar> {
    let mut out = storage_env(cfg.storage, cfg.compression_level, cfg.read_only);
    out.extend([
        env(wenv::SOCKET, SOCKET),
        env(wenv::LISTEN, format!("0.0.0.0:{DAEMON_PORT}")),
        env(wenv::TOKEN_FILE, format!("{TOKEN_DIR}/{TOKEN_KEY}")),
        env("PGDATA", cfg.pgdata),
        env("PGHOST", "127.0.0.1"),
        env("PGPORT", cfg.pg_port.to_string()),
        // The daemon keeps prefetched WAL and scratch files here; the root
        // filesystem is read-only.
        env("TMPDIR", RUN_DIR),
    ]);
    if let Some(r) = cfg.retention {
        if let Some(n) = r.full_backups {
            out.push(env(wenv::RETENTION_FULL, n.to_string()));
        }
        if let Some(w) = &r.recovery_window {
            out.push(env(wenv::RETENTION_WINDOW, w.clone()));
        }
    }
    if let Some(secret) = cfg.credentials_secret {
        out.push(env_from_secret("PGUSER", secret, "username"));
        out.push(env_from_secret("PGPASSWORD", secret, "password"));
    }
    out
}

fn install_container(image: &str, uid: i64) -> Container {
    Container {
        name: INSTALL_CONTAINER.to_string(),
        image: Some(image.to_string()),
        command: Some(vec![
            IMAGE_BINARY.to_string(),
            "install".to_string(),
            BIN_DIR.to_string(),
        ]),
        volume_mounts: Some(vec![mount(BIN_VOLUME, BIN_DIR, false)]),
        security_context: Some(restricted_security_context(uid, true)),
        ..Default::default()
    }
}

fn sidecar_container(
    image: &str,
    uid: i64,
    env: Vec<EnvVar>,
    data_mount: VolumeMount,
    resources: Option<ResourceRequirements>,
) -> Container {
    let probe = Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz".to_string()),
            port: IntOrString::Int(DAEMON_PORT),
            ..Default::default()
        }),
        period_seconds: Some(10),
        ..Default::default()
    };
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(image.to_string()),
        command: Some(vec![IMAGE_BINARY.to_string(), "daemon".to_string()]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("walden-api".to_string()),
            container_port: DAEMON_PORT,
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        volume_mounts: Some(vec![
            data_mount,
            mount(RUN_VOLUME, RUN_DIR, false),
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
        ]),
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(Probe {
            failure_threshold: Some(6),
            ..probe
        }),
        resources,
        security_context: Some(restricted_security_context(uid, true)),
        ..Default::default()
    }
}

/// Shadows the ServiceAccount token path in an injected container of the
/// user's pod: Kubernetes mounts no token where a mount already exists, so
/// the container gets none while the pod's own setting stays the user's.
fn without_sa_token(mut c: Container) -> Container {
    c.volume_mounts.get_or_insert_with(Vec::new).push(mount(
        NO_SA_TOKEN_VOLUME,
        SA_TOKEN_DIR,
        true,
    ));
    c
}

fn token_volume(token_secret: &str) -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(token_secret.to_string()),
            default_mode: Some(0o444),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Name of the Secret holding a resource's daemon API token.
pub fn token_secret_name(owner_name: &str) -> String {
    format!("{owner_name}-walden-token")
}

/// The daemon API token Secret, owned by the resource.
pub fn token_secret(name: &str, namespace: &str, owner: OwnerReference, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            owner_references: Some(vec![owner]),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_string(),
            ByteString(token.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

fn managed_labels() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        FIELD_MANAGER.to_string(),
    )])
}

/// The archive settings of a protected primary, as `(name, value)`.
/// `wal_level` stays `logical` when the user already asked for it.
pub fn archive_settings(
    archive_timeout: &str,
    current_wal_level: Option<&str>,
) -> Vec<(String, String)> {
    let wal_level = match current_wal_level {
        Some("logical") => "logical",
        _ => "replica",
    };
    vec![
        ("archive_mode".into(), "always".into()),
        ("wal_level".into(), wal_level.into()),
        (
            "archive_command".into(),
            format!("{BIN_DIR}/walden wal-push %p"),
        ),
        ("archive_timeout".into(), archive_timeout.into()),
    ]
}

/// Splits `-c name=value` pairs out of container args.
fn parse_settings(args: &[String]) -> (Vec<String>, Vec<(String, String)>) {
    let mut other = Vec::new();
    let mut settings = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "-c" && i + 1 < args.len() {
            if let Some((k, v)) = args[i + 1].split_once('=') {
                settings.push((k.to_string(), v.to_string()));
                i += 2;
                continue;
            }
        }
        other.push(args[i].clone());
        i += 1;
    }
    (other, settings)
}

/// The postgres args with the archive settings: the user's own settings are
/// kept, ours replace any earlier value and come last (last `-c` wins).
pub fn postgres_args(current: &[String], archive_timeout: &str) -> Vec<String> {
    let (mut out, settings) = parse_settings(current);
    let wal_level = settings
        .iter()
        .rev()
        .find(|(k, _)| k == "wal_level")
        .map(|(_, v)| v.as_str());
    let ours = archive_settings(archive_timeout, wal_level);
    for (k, v) in settings
        .iter()
        .filter(|(k, _)| !ours.iter().any(|(o, _)| o == k))
    {
        out.push("-c".into());
        out.push(format!("{k}={v}"));
    }
    for (k, v) in ours {
        out.push("-c".into());
        out.push(format!("{k}={v}"));
    }
    out
}

/// The volume mount of `container` that holds `pgdata` (deepest match).
fn pgdata_mount(container: &Container, pgdata: &str) -> Option<VolumeMount> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| {
            let base = m.mount_path.trim_end_matches('/');
            pgdata == base || pgdata.starts_with(&format!("{base}/"))
        })
        .max_by_key(|m| m.mount_path.len())
        .cloned()
}

/// The server-side-apply patch that protects the target StatefulSet: the
/// init container installing `walden`, the sidecar, the volumes, and the
/// archive settings on the postgres container. Applying it again with the
/// same input changes nothing.
pub fn primary_patch(
    cb: &ContinuousBackup,
    sts: &StatefulSet,
    image: &str,
) -> Result<Value, SpecError> {
    let target = &cb.spec.target;
    let sts_name = sts.metadata.name.clone().unwrap_or_default();
    let pod = sts.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    let pg = pod
        .and_then(|p| p.containers.iter().find(|c| c.name == target.container))
        .ok_or_else(|| SpecError::ContainerNotFound {
            stateful_set: sts_name.clone(),
            container: target.container.clone(),
        })?;
    let data = pgdata_mount(pg, &target.pgdata).ok_or_else(|| SpecError::PgdataNotOnAVolume {
        container: target.container.clone(),
        pgdata: target.pgdata.clone(),
    })?;
    let data_ro = VolumeMount {
        name: data.name.clone(),
        mount_path: data.mount_path.clone(),
        sub_path: data.sub_path.clone(),
        read_only: Some(true),
        ..Default::default()
    };
    let args = postgres_args(
        pg.args.as_deref().unwrap_or_default(),
        &cb.spec.archive_timeout,
    );
    let postgres = Container {
        name: target.container.clone(),
        args: Some(args),
        env: Some(vec![env(wenv::SOCKET, SOCKET)]),
        volume_mounts: Some(vec![
            mount(BIN_VOLUME, BIN_DIR, true),
            mount(RUN_VOLUME, RUN_DIR, false),
        ]),
        ..Default::default()
    };
    // After pg_upgrade the operator may have moved archiving below spec's prefix.
    let storage = crate::archives::current(&cb.spec.storage, cb.status.as_ref());
    let daemon = DaemonConfig {
        storage: &storage,
        compression_level: cb.spec.compression_level(),
        read_only: false,
        pgdata: &target.pgdata,
        pg_port: target.port,
        credentials_secret: Some(&target.credentials_secret),
        retention: cb.spec.retention.as_ref(),
    };
    let sidecar = without_sa_token(with_encryption_key(
        sidecar_container(
            image,
            target.run_as_user,
            daemon_env(&daemon),
            data_ro,
            cb.spec.sidecar.as_ref().and_then(|s| s.resources.clone()),
        ),
        &storage,
    ));
    let install = without_sa_token(install_container(image, target.run_as_user));
    let token = token_secret_name(&cb.metadata.name.clone().unwrap_or_default());
    let mut volumes = vec![
        empty_dir(BIN_VOLUME),
        empty_dir(RUN_VOLUME),
        token_volume(&token),
    ];
    volumes.extend(encryption_volume(&storage));
    volumes.push(empty_dir(NO_SA_TOKEN_VOLUME));
    Ok(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {
            "name": sts_name,
            "namespace": sts.metadata.namespace,
        },
        "spec": {
            "template": {
                "spec": {
                    "initContainers": [install],
                    "containers": [postgres, sidecar],
                    "volumes": volumes,
                }
            }
        }
    }))
}

/// What the primary patch is built from besides the operator's own code: the
/// spec, the sidecar image, and what it reads from the user's StatefulSet
/// (the postgres container's arguments as the patch sets them, the PGDATA
/// mount). A change of these re-applies the injection; a change of the
/// operator alone does not (see `controllers::decide_apply`).
pub fn primary_inputs(cb: &ContinuousBackup, sts: &StatefulSet, image: &str) -> Value {
    let target = &cb.spec.target;
    let pg = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == target.container));
    let args = pg.map(|c| {
        postgres_args(
            c.args.as_deref().unwrap_or_default(),
            &cb.spec.archive_timeout,
        )
    });
    let data = pg.and_then(|c| pgdata_mount(c, &target.pgdata));
    // Only the spec fields the injection is built from: asking for a backup,
    // a schedule, suspending or a restore proof must not count as a change
    // that applies an upgrade held back (and so restarts the database).
    let spec = &cb.spec;
    let shaping = json!({
        "target": spec.target,
        "storage": crate::archives::current(&spec.storage, cb.status.as_ref()),
        "compression": spec.compression,
        "archiveTimeout": spec.archive_timeout,
        "retention": spec.retention,
        "sidecar": spec.sidecar,
    });
    json!({"spec": shaping, "image": image, "postgresArgs": args, "dataMount": data})
}

/// Which walden image a protected primary's injection runs, and whether it
/// is the operator's own (the `SidecarCurrent` condition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SidecarChoice {
    pub image: String,
    pub current: bool,
    pub reason: &'static str,
    pub message: String,
}

/// Chooses the sidecar image (pure): an explicit `spec.sidecar.image`;
/// with `updatePolicy: Automatic` the operator's; otherwise the image the
/// live injection already runs, so that an operator upgrade does not restart
/// every protected database (the operator's image only for a new injection).
pub fn choose_sidecar_image(
    spec: Option<&SidecarSpec>,
    live: Option<&str>,
    operator_image: &str,
) -> SidecarChoice {
    let current = |image: &str| SidecarChoice {
        image: image.to_string(),
        current: true,
        reason: "Current",
        message: format!("the sidecar runs {image}, the operator's walden image"),
    };
    if let Some(image) = spec.and_then(|s| s.image.as_deref()) {
        if image == operator_image {
            return current(image);
        }
        return SidecarChoice {
            image: image.to_string(),
            current: false,
            reason: "Pinned",
            message: format!(
                "spec.sidecar.image pins {image}; this operator ships {operator_image}"
            ),
        };
    }
    let automatic = spec.is_some_and(|s| s.update_policy == SidecarUpdatePolicy::Automatic);
    match live {
        Some(image) if !automatic && image != operator_image => SidecarChoice {
            image: image.to_string(),
            current: false,
            reason: "UpdateAvailable",
            message: format!(
                "the sidecar runs {image}; this operator ships {operator_image}. Nothing restarts by itself: set spec.sidecar.updatePolicy: Automatic (or spec.sidecar.image) when the database's pods may restart"
            ),
        },
        _ => current(operator_image),
    }
}

/// The walden image the injected sidecar of `sts` runs, if injected.
pub fn live_sidecar_image(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.iter().find(|c| c.name == SIDECAR_CONTAINER))
        .and_then(|c| c.image.clone())
}

/// Applying this releases every field the operator owns on the StatefulSet,
/// which removes the injection (fields also set by another manager stay).
pub fn release_patch(name: &str, namespace: &str) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": { "name": name, "namespace": namespace },
    })
}

/// The `restore_command` of forks and followers (design §2).
pub fn restore_command() -> String {
    format!("{BIN_DIR}/walden wal-fetch %f %p")
}

/// `walden restore` arguments (the CLI contract) for a target.
pub fn restore_args(
    target: Option<&RecoveryTarget>,
    standby: bool,
    conninfo_from_env: bool,
) -> Vec<String> {
    let mut out = vec![
        IMAGE_BINARY.to_string(),
        "restore".to_string(),
        INSTANCE_PGDATA.to_string(),
        // PostgreSQL runs restore_command in the postgres container: the
        // binary there is the installed copy, and WALDEN_SOCKET sends the
        // fetch to the sidecar (which holds the storage credentials). The
        // default would name this container's own /usr/local/bin/walden.
        "--restore-command".to_string(),
        restore_command(),
    ];
    if let Some(t) = target {
        if let Some(id) = &t.backup_id {
            out.extend(["--backup".to_string(), id.clone()]);
        }
        if let Some(time) = &t.time {
            out.extend([
                "--target-time".to_string(),
                time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ]);
        } else if let Some(lsn) = &t.lsn {
            out.extend(["--target-lsn".to_string(), lsn.clone()]);
        } else if let Some(name) = &t.name {
            out.extend(["--target-name".to_string(), name.clone()]);
        }
        if t.exclusive == Some(true) {
            out.push("--target-exclusive".to_string());
        }
    }
    if standby {
        out.push("--standby".to_string());
    }
    if conninfo_from_env {
        // Kubernetes expands $(VAR) in commands, so the conninfo (and any
        // password in it) stays in the Secret, not in the pod spec.
        out.extend([
            "--primary-conninfo".to_string(),
            format!("$({CONNINFO_ENV})"),
        ]);
    }
    out
}

/// Fork or follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceKind {
    Fork,
    Follower,
}

impl InstanceKind {
    pub fn component(self) -> &'static str {
        match self {
            InstanceKind::Fork => "fork",
            InstanceKind::Follower => "follower",
        }
    }
}

/// Everything a fork or follower StatefulSet is built from.
pub struct InstancePlan<'a> {
    pub kind: InstanceKind,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub replicas: i32,
    pub instance: &'a InstanceSpec,
    pub storage: &'a StorageSpec,
    pub compression_level: i32,
    pub credentials_secret: Option<&'a str>,
    pub target: Option<&'a RecoveryTarget>,
    pub streaming: Option<&'a StreamingSpec>,
    pub walden_image: &'a str,
}

/// Pod labels (and selector) of an instance.
pub fn instance_labels(kind: InstanceKind, name: &str) -> BTreeMap<String, String> {
    let mut labels = managed_labels();
    labels.insert(INSTANCE_LABEL.to_string(), name.to_string());
    labels.insert(COMPONENT_LABEL.to_string(), kind.component().to_string());
    labels
}

/// Name of the Service clients connect to.
pub fn instance_service_name(kind: InstanceKind, name: &str) -> String {
    match kind {
        InstanceKind::Fork => name.to_string(),
        InstanceKind::Follower => format!("{name}-ro"),
    }
}

fn meta(name: &str, plan: &InstancePlan<'_>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(plan.namespace.to_string()),
        labels: Some(instance_labels(plan.kind, plan.name)),
        owner_references: Some(vec![plan.owner.clone()]),
        ..Default::default()
    }
}

/// The StatefulSet of a fork (1 replica) or follower (N): restore init
/// container, postgres, and a read-only sidecar.
pub fn instance_statefulset(plan: &InstancePlan<'_>) -> StatefulSet {
    let uid = plan.instance.run_as_user;
    let labels = instance_labels(plan.kind, plan.name);
    let standby = plan.kind == InstanceKind::Follower;
    let storage_env = storage_env(plan.storage, plan.compression_level, true);
    let mut restore_env = storage_env.clone();
    // The init container runs again whenever the pod is recreated on the
    // kept volume: it must recognise its own finished restore and step
    // aside (a half-finished one is redone, another target refused).
    restore_env.push(env(wenv::RESTORE_IF_RESTORED, "skip"));
    restore_env.push(env(wenv::TERMINATION_LOG, TERMINATION_LOG));
    if let Some(s) = plan.streaming {
        restore_env.push(env_from_secret(
            CONNINFO_ENV,
            &s.primary_conninfo_secret,
            &s.key,
        ));
    }
    let restore = with_encryption_key(
        Container {
            name: RESTORE_CONTAINER.to_string(),
            image: Some(plan.walden_image.to_string()),
            command: Some(restore_args(plan.target, standby, plan.streaming.is_some())),
            env: Some(restore_env),
            volume_mounts: Some(vec![mount(DATA_VOLUME, DATA_MOUNT, false)]),
            // A failed restore explains itself in the pod status.
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            resources: plan.instance.sidecar_resources.clone(),
            security_context: Some(restricted_security_context(uid, true)),
            ..Default::default()
        },
        plan.storage,
    );
    let postgres = Container {
        name: POSTGRES_CONTAINER.to_string(),
        image: Some(plan.instance.image.clone()),
        env: Some(vec![
            env("PGDATA", INSTANCE_PGDATA),
            env(wenv::SOCKET, SOCKET),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("postgres".to_string()),
            container_port: POSTGRES_PORT,
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        volume_mounts: Some(vec![
            mount(DATA_VOLUME, DATA_MOUNT, false),
            mount(BIN_VOLUME, BIN_DIR, true),
            mount(RUN_VOLUME, RUN_DIR, false),
        ]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "pg_isready".to_string(),
                    "-h".to_string(),
                    "127.0.0.1".to_string(),
                    "-p".to_string(),
                    POSTGRES_PORT.to_string(),
                ]),
            }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        resources: plan.instance.resources.clone(),
        // PostgreSQL's last log lines ("recovery ended before configured
        // recovery target was reached") become the termination message the
        // Fork controller reads.
        termination_message_policy: Some("FallbackToLogsOnError".to_string()),
        // PostgreSQL writes its socket and pid under /var/run/postgresql.
        security_context: Some(restricted_security_context(uid, false)),
        ..Default::default()
    };
    let daemon = DaemonConfig {
        storage: plan.storage,
        compression_level: plan.compression_level,
        read_only: true,
        pgdata: INSTANCE_PGDATA,
        pg_port: POSTGRES_PORT,
        credentials_secret: plan.credentials_secret,
        // Read-only: a fork or follower never prunes its source's archive.
        retention: None,
    };
    let sidecar = with_encryption_key(
        sidecar_container(
            plan.walden_image,
            uid,
            daemon_env(&daemon),
            mount(DATA_VOLUME, DATA_MOUNT, true),
            plan.instance.sidecar_resources.clone(),
        ),
        plan.storage,
    );
    let mut volumes = vec![
        empty_dir(BIN_VOLUME),
        empty_dir(RUN_VOLUME),
        token_volume(&token_secret_name(plan.name)),
    ];
    volumes.extend(encryption_volume(plan.storage));
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_string()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: plan.instance.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(plan.instance.storage_size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StatefulSet {
        metadata: meta(plan.name, plan),
        spec: Some(StatefulSetSpec {
            replicas: Some(plan.replicas),
            service_name: Some(instance_service_name(plan.kind, plan.name)),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    init_containers: Some(vec![install_container(plan.walden_image, uid), restore]),
                    containers: vec![postgres, sidecar],
                    volumes: Some(volumes),
                    security_context: Some(pod_security_context(uid)),
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            },
            volume_claim_templates: Some(vec![claim]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Name of the restore proof pod of a ContinuousBackup: one name, so two
/// proofs of one ContinuousBackup can never run at once.
pub fn restore_test_pod_name(cb_name: &str) -> String {
    format!("{cb_name}-restore-test")
}

/// Everything a restore proof pod is built from.
pub struct RestoreTestPlan<'a> {
    pub cb_name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
    pub spec: &'a RestoreTestSpec,
    pub storage: &'a StorageSpec,
    pub compression_level: i32,
    /// The PostgreSQL image (the spec's, or the protected container's).
    pub postgres_image: &'a str,
    pub walden_image: &'a str,
    pub run_as_user: i64,
    /// None: the end of the archive.
    pub target_lsn: Option<&'a str>,
}

/// The restore proof pod: the Fork's restore (read-only to the archive,
/// into a scratch emptyDir), then `walden restore-test` in the PostgreSQL
/// image, which fetches WAL itself (there is no sidecar: the pod must end).
/// Its report is the container's termination message.
pub fn restore_test_pod(plan: &RestoreTestPlan<'_>) -> Pod {
    let uid = plan.run_as_user;
    let mut labels = managed_labels();
    labels.insert(INSTANCE_LABEL.to_string(), plan.cb_name.to_string());
    labels.insert(
        COMPONENT_LABEL.to_string(),
        RESTORE_TEST_COMPONENT.to_string(),
    );
    let storage_env = storage_env(plan.storage, plan.compression_level, true);
    let target = plan.target_lsn.map(|lsn| RecoveryTarget {
        time: None,
        lsn: Some(lsn.to_string()),
        name: None,
        backup_id: None,
        exclusive: None,
    });
    let mut restore_env = storage_env.clone();
    restore_env.push(env(wenv::TERMINATION_LOG, TERMINATION_LOG));
    let restore = with_encryption_key(
        Container {
            name: RESTORE_CONTAINER.to_string(),
            image: Some(plan.walden_image.to_string()),
            command: Some(restore_args(target.as_ref(), false, false)),
            env: Some(restore_env),
            volume_mounts: Some(vec![mount(DATA_VOLUME, DATA_MOUNT, false)]),
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            resources: plan.spec.resources.clone(),
            security_context: Some(restricted_security_context(uid, true)),
            ..Default::default()
        },
        plan.storage,
    );
    let checks: Vec<Value> = plan
        .spec
        .checks
        .iter()
        .map(|c| json!({"name": c.name, "sql": c.sql}))
        .collect();
    let mut proof_env = vec![
        env("PGDATA", INSTANCE_PGDATA),
        env(wenv::RESTORE_TEST_SOCKET_DIR, RUN_DIR),
        env(wenv::RESTORE_TEST_USER, &plan.spec.user),
        env(wenv::RESTORE_TEST_DATABASE, &plan.spec.database),
        env(wenv::RESTORE_TEST_CHECKS, Value::Array(checks).to_string()),
        env(wenv::RESTORE_TEST_AMCHECK, plan.spec.amcheck.to_string()),
        env(
            wenv::RESTORE_TEST_TIMEOUT,
            plan.spec.deadline_seconds.to_string(),
        ),
        env(wenv::TERMINATION_LOG, TERMINATION_LOG),
    ];
    proof_env.extend(storage_env);
    let resources = plan.spec.resources.clone().unwrap_or(ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".to_string())),
            ("memory".to_string(), Quantity("256Mi".to_string())),
        ])),
        ..Default::default()
    });
    let proof = with_encryption_key(
        Container {
            name: RESTORE_TEST_CONTAINER.to_string(),
            image: Some(plan.postgres_image.to_string()),
            command: Some(vec![
                format!("{BIN_DIR}/walden"),
                "restore-test".to_string(),
            ]),
            env: Some(proof_env),
            volume_mounts: Some(vec![
                mount(DATA_VOLUME, DATA_MOUNT, false),
                mount(BIN_VOLUME, BIN_DIR, true),
                mount(RUN_VOLUME, RUN_DIR, false),
            ]),
            resources: Some(resources),
            termination_message_policy: Some("FallbackToLogsOnError".to_string()),
            security_context: Some(restricted_security_context(uid, false)),
            ..Default::default()
        },
        plan.storage,
    );
    let mut data = empty_dir(DATA_VOLUME);
    if let (Some(e), Some(size)) = (data.empty_dir.as_mut(), &plan.spec.storage_size) {
        e.size_limit = Some(Quantity(size.clone()));
    }
    let mut volumes = vec![data, empty_dir(BIN_VOLUME), empty_dir(RUN_VOLUME)];
    volumes.extend(encryption_volume(plan.storage));
    let annotations = plan
        .target_lsn
        .map(|lsn| BTreeMap::from([(RESTORE_TEST_TARGET_ANNOTATION.to_string(), lsn.to_string())]));
    Pod {
        metadata: ObjectMeta {
            name: Some(restore_test_pod_name(plan.cb_name)),
            namespace: Some(plan.namespace.to_string()),
            labels: Some(labels),
            annotations,
            owner_references: Some(vec![plan.owner.clone()]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            init_containers: Some(vec![install_container(plan.walden_image, uid), restore]),
            containers: vec![proof],
            volumes: Some(volumes),
            restart_policy: Some("Never".to_string()),
            active_deadline_seconds: Some(plan.spec.deadline_seconds),
            security_context: Some(pod_security_context(uid)),
            automount_service_account_token: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service of a fork (read-write once promoted) or follower (read-only).
pub fn instance_service(plan: &InstancePlan<'_>) -> Service {
    Service {
        metadata: meta(&instance_service_name(plan.kind, plan.name), plan),
        spec: Some(ServiceSpec {
            selector: Some(instance_labels(plan.kind, plan.name)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".to_string()),
                port: POSTGRES_PORT,
                target_port: Some(IntOrString::String("postgres".to_string())),
                protocol: Some("TCP".to_string()),
                ..Default::default()
            }]),
            type_: Some("ClusterIP".to_string()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ContinuousBackupSpec, InstanceSpec, S3Credentials, S3Spec};
    use serde_json::json;

    const IMAGE: &str = "ghcr.io/walden-dev/walden:1";

    fn storage(creds: bool, endpoint: Option<&str>) -> StorageSpec {
        StorageSpec {
            s3: S3Spec {
                bucket: "backups".into(),
                prefix: Some("/prod/pg/".into()),
                region: "eu-west-1".into(),
                endpoint: endpoint.map(str::to_string),
                path_style: endpoint.is_some(),
                credentials: creds.then(|| S3Credentials {
                    secret: "s3".into(),
                    access_key_id_key: "id".into(),
                    secret_access_key_key: "key".into(),
                }),
                workload_identity: (!creds).then_some(true),
            },
            encryption: None,
        }
    }

    fn cb(spec: serde_json::Value) -> ContinuousBackup {
        let spec: ContinuousBackupSpec = serde_json::from_value(spec).expect("spec");
        let mut cb = ContinuousBackup::new("pg-backup", spec);
        cb.metadata.namespace = Some("db".into());
        cb
    }

    fn base_cb() -> ContinuousBackup {
        cb(json!({
            "target": {"statefulSet": "pg", "credentialsSecret": "pg-creds"},
            "storage": {"s3": {"bucket": "backups", "prefix": "pg", "credentials": {"secret": "s3"}}},
            "compression": {"level": 7},
            "archiveTimeout": "30s",
            "retention": {"fullBackups": 7, "recoveryWindow": "14d"},
            "sidecar": {"resources": {"limits": {"memory": "256Mi"}}}
        }))
    }

    fn sts(mounts: serde_json::Value, args: Option<Vec<&str>>) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "pg", "namespace": "db"},
            "spec": {
                "selector": {"matchLabels": {"app": "pg"}},
                "serviceName": "pg",
                "template": {"spec": {"containers": [
                    {"name": "postgres", "image": "postgres:16", "volumeMounts": mounts, "args": args}
                ]}}
            }
        }))
        .expect("sts")
    }

    fn env_map(c: &Value) -> BTreeMap<String, Value> {
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let v = e
                    .get("value")
                    .cloned()
                    .unwrap_or_else(|| e["valueFrom"].clone());
                (e["name"].as_str().unwrap_or_default().to_string(), v)
            })
            .collect()
    }

    fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
        list.as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == name))
            .unwrap_or_else(|| panic!("no container {name} in {list}"))
    }

    #[test]
    fn storage_urls() {
        let mut s = storage(true, None);
        let cases = [
            ("/prod/pg/", "s3://backups/prod/pg"),
            ("", "s3://backups"),
            ("a", "s3://backups/a"),
        ];
        for (prefix, want) in cases {
            s.s3.prefix = Some(prefix.into());
            assert_eq!(storage_url(&s), want, "{prefix:?}");
        }
    }

    #[test]
    fn storage_env_table() {
        struct Case {
            name: &'static str,
            storage: StorageSpec,
            read_only: bool,
            present: &'static [(&'static str, &'static str)],
            absent: &'static [&'static str],
        }
        let cases = [
            Case {
                name: "static credentials, AWS",
                storage: storage(true, None),
                read_only: false,
                present: &[
                    ("WALDEN_STORAGE", "s3://backups/prod/pg"),
                    ("AWS_REGION", "eu-west-1"),
                    ("WALDEN_S3_PATH_STYLE", "false"),
                    ("WALDEN_COMPRESSION_LEVEL", "5"),
                ],
                absent: &["WALDEN_S3_ENDPOINT", "WALDEN_READ_ONLY"],
            },
            Case {
                name: "workload identity, custom endpoint, read-only",
                storage: storage(false, Some("http://minio:9000")),
                read_only: true,
                present: &[
                    ("WALDEN_S3_ENDPOINT", "http://minio:9000"),
                    ("WALDEN_S3_PATH_STYLE", "true"),
                    ("WALDEN_READ_ONLY", "true"),
                ],
                absent: &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            },
        ];
        for c in cases {
            let env: BTreeMap<_, _> = storage_env(&c.storage, 5, c.read_only)
                .into_iter()
                .map(|e| (e.name.clone(), e))
                .collect();
            for (k, v) in c.present {
                assert_eq!(
                    env.get(*k).and_then(|e| e.value.as_deref()),
                    Some(*v),
                    "{}: {k}",
                    c.name
                );
            }
            for k in c.absent {
                assert!(!env.contains_key(*k), "{}: {k} must be absent", c.name);
            }
        }
        let env = storage_env(&storage(true, None), 3, false);
        let key = env
            .iter()
            .find(|e| e.name == "AWS_SECRET_ACCESS_KEY")
            .expect("secret env");
        let sel = key
            .value_from
            .as_ref()
            .and_then(|v| v.secret_key_ref.as_ref())
            .expect("secretKeyRef");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("s3", "key"));
        assert!(key.value.is_none(), "credentials never inline");
    }

    #[test]
    fn sidecar_image_table() {
        let op = "walden:2";
        let spec = |image: Option<&str>, policy| SidecarSpec {
            resources: None,
            image: image.map(str::to_string),
            update_policy: policy,
        };
        use SidecarUpdatePolicy::{Automatic, Manual};
        let cases = [
            ("new injection", None, None, "walden:2", "Current"),
            ("same image", None, Some("walden:2"), "walden:2", "Current"),
            (
                "upgrade, default policy: pinned to live",
                None,
                Some("walden:1"),
                "walden:1",
                "UpdateAvailable",
            ),
            (
                "upgrade, Manual",
                Some(spec(None, Manual)),
                Some("walden:1"),
                "walden:1",
                "UpdateAvailable",
            ),
            (
                "upgrade, Automatic",
                Some(spec(None, Automatic)),
                Some("walden:1"),
                "walden:2",
                "Current",
            ),
            (
                "explicit image",
                Some(spec(Some("walden:1.5"), Manual)),
                Some("walden:1"),
                "walden:1.5",
                "Pinned",
            ),
            (
                "explicit image wins over Automatic",
                Some(spec(Some("walden:1.5"), Automatic)),
                Some("walden:2"),
                "walden:1.5",
                "Pinned",
            ),
            (
                "explicit operator image",
                Some(spec(Some("walden:2"), Manual)),
                Some("walden:1"),
                "walden:2",
                "Current",
            ),
        ];
        for (name, spec, live, image, reason) in cases {
            let got = choose_sidecar_image(spec.as_ref(), live, op);
            assert_eq!((got.image.as_str(), got.reason), (image, reason), "{name}");
            assert_eq!(got.current, reason == "Current", "{name}");
        }
    }

    #[test]
    fn postgres_args_table() {
        let ours = |timeout: &str, level: &str| {
            vec![
                "-c".to_string(),
                "archive_mode=always".into(),
                "-c".into(),
                format!("wal_level={level}"),
                "-c".into(),
                "archive_command=/walden/bin/walden wal-push %p".into(),
                "-c".into(),
                format!("archive_timeout={timeout}"),
            ]
        };
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
            ("no args", vec![], ours("60s", "replica")),
            (
                "user settings kept before ours",
                s(&["-c", "max_connections=50"]),
                [s(&["-c", "max_connections=50"]), ours("60s", "replica")].concat(),
            ),
            (
                "user archive settings replaced",
                s(&["-c", "archive_mode=off", "-c", "archive_timeout=5min"]),
                ours("60s", "replica"),
            ),
            (
                "logical wal_level kept",
                s(&["-c", "wal_level=logical"]),
                ours("60s", "logical"),
            ),
            (
                "minimal wal_level raised",
                s(&["-c", "wal_level=minimal"]),
                ours("60s", "replica"),
            ),
            (
                "other flags kept",
                s(&["-N", "200"]),
                [s(&["-N", "200"]), ours("60s", "replica")].concat(),
            ),
        ];
        for (name, current, want) in cases {
            let got = postgres_args(&current, "60s");
            assert_eq!(got, want, "{name}");
            assert_eq!(
                postgres_args(&got, "60s"),
                got,
                "{name}: applying twice changes nothing"
            );
        }
    }

    /// Without `spec.compression` the sidecar gets the level the CLI uses
    /// by default (they once differed: 3 here, 1 there).
    #[test]
    fn the_default_compression_level_is_the_clis() {
        let mut cb = base_cb();
        cb.spec.compression = None;
        let target = sts(
            json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
            None,
        );
        let patch = primary_patch(&cb, &target, IMAGE).expect("patch");
        let side = container(
            &patch["spec"]["template"]["spec"]["containers"],
            SIDECAR_CONTAINER,
        );
        assert_eq!(env_map(side)["WALDEN_COMPRESSION_LEVEL"], json!("1"));
        let omitted: crate::api::CompressionSpec = serde_json::from_value(json!({})).expect("spec");
        assert_eq!(omitted.level, 1, "the CRD's default");
    }

    #[test]
    fn primary_patch_injects_everything() {
        let cfg = OperatorConfig {
            walden_image: IMAGE.into(),
        };
        let target = sts(
            json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
            Some(vec!["-c", "max_connections=50"]),
        );
        let patch = primary_patch(&base_cb(), &target, &cfg.walden_image).expect("patch");
        assert_eq!(patch["apiVersion"], "apps/v1");
        assert_eq!(patch["metadata"], json!({"name": "pg", "namespace": "db"}));
        let pod = &patch["spec"]["template"]["spec"];

        let init = container(&pod["initContainers"], INSTALL_CONTAINER);
        assert_eq!(
            init["command"],
            json!(["/usr/local/bin/walden", "install", "/walden/bin"])
        );
        assert_eq!(init["image"], IMAGE);

        let pg = container(&pod["containers"], "postgres");
        let args: Vec<String> = serde_json::from_value(pg["args"].clone()).expect("args");
        assert_eq!(&args[..2], ["-c", "max_connections=50"]);
        assert!(args.contains(&"archive_command=/walden/bin/walden wal-push %p".to_string()));
        assert!(args.contains(&"archive_timeout=30s".to_string()));
        assert_eq!(env_map(pg)["WALDEN_SOCKET"], json!(SOCKET));
        assert!(pg.get("image").is_none(), "the user's image is not touched");

        let side = container(&pod["containers"], SIDECAR_CONTAINER);
        assert_eq!(side["command"], json!(["/usr/local/bin/walden", "daemon"]));
        let env = env_map(side);
        assert_eq!(env["WALDEN_STORAGE"], json!("s3://backups/pg"));
        assert_eq!(env["WALDEN_LISTEN"], json!("0.0.0.0:8008"));
        assert_eq!(env["WALDEN_TOKEN_FILE"], json!("/walden/token/token"));
        assert_eq!(env["WALDEN_COMPRESSION_LEVEL"], json!("7"));
        assert_eq!(env["PGDATA"], json!("/var/lib/postgresql/data/pgdata"));
        assert_eq!(
            env["PGPASSWORD"]["secretKeyRef"],
            json!({"name": "pg-creds", "key": "password", "optional": false})
        );
        assert!(
            !env.contains_key("WALDEN_READ_ONLY"),
            "the primary writes its archive"
        );
        let mounts = side["volumeMounts"].as_array().expect("mounts");
        assert!(mounts.contains(
            &json!({"name": "data", "mountPath": "/var/lib/postgresql/data", "readOnly": true})
        ));
        assert!(mounts
            .contains(&json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true})));
        assert_eq!(side["resources"], json!({"limits": {"memory": "256Mi"}}));
        let sc = &side["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["runAsUser"], 999);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));

        let volumes = pod["volumes"].as_array().expect("volumes");
        let names: Vec<_> = volumes
            .iter()
            .map(|v| v["name"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            [BIN_VOLUME, RUN_VOLUME, TOKEN_VOLUME, NO_SA_TOKEN_VOLUME]
        );
        assert_eq!(volumes[2]["secret"]["secretName"], "pg-backup-walden-token");
    }

    /// The injected containers never see a ServiceAccount token, whatever the
    /// user chose for the pod; the user's own setting (and so their containers'
    /// token) is left exactly as it was.
    #[test]
    fn primary_patch_keeps_service_account_tokens_out_of_walden_containers() {
        let cases = [
            ("user left it unset", None),
            ("user wants tokens", Some(true)),
            ("user disabled tokens", Some(false)),
        ];
        for (name, user) in cases {
            let mut target = sts(
                json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
                None,
            );
            if let Some(pod) = target.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
                pod.automount_service_account_token = user;
            }
            let patch = primary_patch(&base_cb(), &target, IMAGE).expect("patch");
            let pod = &patch["spec"]["template"]["spec"];
            assert!(
                pod.get("automountServiceAccountToken").is_none(),
                "{name}: the user's pod-level setting is not ours to apply"
            );
            let shadow =
                json!({"name": NO_SA_TOKEN_VOLUME, "mountPath": SA_TOKEN_DIR, "readOnly": true});
            for c in [
                container(&pod["initContainers"], INSTALL_CONTAINER),
                container(&pod["containers"], SIDECAR_CONTAINER),
            ] {
                let mounts = c["volumeMounts"].as_array().expect("mounts");
                assert!(
                    mounts.contains(&shadow),
                    "{name}: {} gets an empty directory where the token would be: {mounts:?}",
                    c["name"]
                );
            }
            let pg = container(&pod["containers"], "postgres");
            assert!(
                !pg["volumeMounts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m["mountPath"] == SA_TOKEN_DIR),
                "{name}: the user's postgres container keeps what it had"
            );
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == NO_SA_TOKEN_VOLUME)
                .unwrap_or_else(|| panic!("{name}: no {NO_SA_TOKEN_VOLUME} volume"));
            assert!(volume.get("emptyDir").is_some(), "{name}: {volume}");
        }
    }

    /// The key Secret reaches every container that runs `walden` with storage
    /// settings (primary sidecar; fork/follower restore and sidecar) and no other.
    #[test]
    fn encryption_key_is_mounted_where_walden_runs_and_nowhere_else() {
        let cfg = OperatorConfig {
            walden_image: IMAGE.into(),
        };
        let mut encrypted = base_cb();
        encrypted.spec.storage.encryption = Some(crate::api::EncryptionSpec {
            secret: "archive-key".into(),
            key: "age.key".into(),
        });
        let target = sts(
            json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
            None,
        );
        let key_env =
            json!({"name": "WALDEN_ENCRYPTION_KEY_FILE", "value": "/walden/encryption/age.key"});
        let key_mount =
            json!({"name": ENCRYPTION_VOLUME, "mountPath": ENCRYPTION_DIR, "readOnly": true});
        let check = |pod: &Value, with: &[&str], without: &[&str], what: &str| {
            let volume = pod["volumes"]
                .as_array()
                .expect("volumes")
                .iter()
                .find(|v| v["name"] == ENCRYPTION_VOLUME)
                .unwrap_or_else(|| panic!("{what}: no key volume"));
            assert_eq!(volume["secret"]["secretName"], "archive-key", "{what}");
            for list in ["initContainers", "containers"] {
                for c in pod[list].as_array().into_iter().flatten() {
                    let name = c["name"].as_str().expect("name");
                    let env = c["env"].as_array().cloned().unwrap_or_default();
                    let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
                    let has = (env.contains(&key_env), mounts.contains(&key_mount));
                    if with.contains(&name) {
                        assert_eq!(has, (true, true), "{what}: {name}");
                    } else {
                        assert!(
                            without.contains(&name),
                            "{what}: unexpected container {name}"
                        );
                        assert_eq!(has, (false, false), "{what}: {name} must not see the key");
                    }
                }
            }
        };
        let patch = primary_patch(&encrypted, &target, &cfg.walden_image).expect("patch");
        check(
            &patch["spec"]["template"]["spec"],
            &[SIDECAR_CONTAINER],
            &[INSTALL_CONTAINER, "postgres"],
            "primary",
        );
        let plain = primary_patch(&base_cb(), &target, &cfg.walden_image).expect("patch");
        assert!(!plain.to_string().contains(ENCRYPTION_VOLUME));

        let inst = instance();
        let st = encrypted.spec.storage.clone();
        let plan = InstancePlan {
            kind: InstanceKind::Fork,
            name: "x",
            namespace: "db",
            owner: owner(),
            replicas: 1,
            instance: &inst,
            storage: &st,
            compression_level: 3,
            credentials_secret: Some("pg-creds"),
            target: None,
            streaming: None,
            walden_image: IMAGE,
        };
        let fork = serde_json::to_value(instance_statefulset(&plan)).expect("sts");
        check(
            &fork["spec"]["template"]["spec"],
            &[RESTORE_CONTAINER, SIDECAR_CONTAINER],
            &[INSTALL_CONTAINER, POSTGRES_CONTAINER],
            "fork",
        );
    }

    #[test]
    fn primary_patch_errors_table() {
        let cfg = OperatorConfig {
            walden_image: IMAGE.into(),
        };
        let cases = [
            (
                "pgdata below a deeper mount",
                json!([{"name": "a", "mountPath": "/var/lib"}, {"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
                "postgres",
                Ok("data"),
            ),
            (
                "prefix that is not a path boundary",
                json!([{"name": "x", "mountPath": "/var/lib/postgresql/da"}]),
                "postgres",
                Err("PgdataNotOnAVolume"),
            ),
            (
                "no mounts",
                json!([]),
                "postgres",
                Err("PgdataNotOnAVolume"),
            ),
            (
                "wrong container",
                json!([{"name": "data", "mountPath": "/var/lib/postgresql/data"}]),
                "pg",
                Err("ContainerNotFound"),
            ),
        ];
        for (name, mounts, container_name, want) in cases {
            let mut c = base_cb();
            c.spec.target.container = container_name.into();
            let got = primary_patch(&c, &sts(mounts, None), &cfg.walden_image);
            match (got, want) {
                (Ok(p), Ok(vol)) => {
                    let side = container(
                        &p["spec"]["template"]["spec"]["containers"],
                        SIDECAR_CONTAINER,
                    );
                    assert_eq!(side["volumeMounts"][0]["name"], vol, "{name}");
                }
                (Err(e), Err(reason)) => assert_eq!(e.reason(), reason, "{name}"),
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn restore_args_table() {
        let t =
            |v: serde_json::Value| -> RecoveryTarget { serde_json::from_value(v).expect("target") };
        let base = [
            "/usr/local/bin/walden",
            "restore",
            INSTANCE_PGDATA,
            "--restore-command",
            "/walden/bin/walden wal-fetch %f %p",
        ];
        type Case<'a> = (&'a str, Option<RecoveryTarget>, bool, bool, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            ("end of archive", None, false, false, vec![]),
            (
                "time",
                Some(t(json!({"time": "2025-05-01T10:00:00Z"}))),
                false,
                false,
                vec!["--target-time", "2025-05-01T10:00:00Z"],
            ),
            (
                "lsn exclusive",
                Some(t(json!({"lsn": "0/3000060", "exclusive": true}))),
                false,
                false,
                vec!["--target-lsn", "0/3000060", "--target-exclusive"],
            ),
            (
                "name",
                Some(t(json!({"name": "before-migration"}))),
                false,
                false,
                vec!["--target-name", "before-migration"],
            ),
            (
                "backup only",
                Some(t(json!({"backupId": "20250501T030000Z"}))),
                false,
                false,
                vec!["--backup", "20250501T030000Z"],
            ),
            (
                "backup and time",
                Some(t(
                    json!({"backupId": "20250501T030000Z", "time": "2025-05-01T04:00:00Z"}),
                )),
                false,
                false,
                vec![
                    "--backup",
                    "20250501T030000Z",
                    "--target-time",
                    "2025-05-01T04:00:00Z",
                ],
            ),
            ("standby", None, true, false, vec!["--standby"]),
            (
                "standby streaming",
                None,
                true,
                true,
                vec![
                    "--standby",
                    "--primary-conninfo",
                    "$(WALDEN_PRIMARY_CONNINFO)",
                ],
            ),
        ];
        for (name, target, standby, conninfo, tail) in cases {
            let want: Vec<String> = base
                .iter()
                .chain(tail.iter())
                .map(|s| s.to_string())
                .collect();
            assert_eq!(
                restore_args(target.as_ref(), standby, conninfo),
                want,
                "{name}"
            );
        }
    }

    fn instance() -> InstanceSpec {
        serde_json::from_value(json!({
            "image": "postgres:16", "storageSize": "10Gi", "storageClassName": "fast",
            "resources": {"requests": {"cpu": "500m"}},
            "sidecarResources": {"limits": {"memory": "128Mi"}}
        }))
        .expect("instance")
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "walden.dev/v1alpha1".into(),
            kind: "Fork".into(),
            name: "f".into(),
            uid: "uid-1".into(),
            controller: Some(true),
            block_owner_deletion: None,
        }
    }

    #[test]
    fn instance_objects_table() {
        let inst = instance();
        let st = storage(true, None);
        let target: RecoveryTarget =
            serde_json::from_value(json!({"time": "2025-05-01T10:00:00Z"})).expect("target");
        let streaming = StreamingSpec {
            primary_conninfo_secret: "conninfo".into(),
            key: "primary_conninfo".into(),
        };
        struct Case<'a> {
            kind: InstanceKind,
            replicas: i32,
            target: Option<&'a RecoveryTarget>,
            streaming: Option<&'a StreamingSpec>,
            service: &'static str,
            restore_has: &'static [&'static str],
            restore_lacks: &'static [&'static str],
        }
        let cases = [
            Case {
                kind: InstanceKind::Fork,
                replicas: 1,
                target: Some(&target),
                streaming: None,
                service: "x",
                restore_has: &["--target-time"],
                restore_lacks: &["--standby", "--primary-conninfo"],
            },
            Case {
                kind: InstanceKind::Follower,
                replicas: 3,
                target: None,
                streaming: Some(&streaming),
                service: "x-ro",
                restore_has: &["--standby", "--primary-conninfo"],
                restore_lacks: &["--target-time"],
            },
            Case {
                kind: InstanceKind::Follower,
                replicas: 1,
                target: None,
                streaming: None,
                service: "x-ro",
                restore_has: &["--standby"],
                restore_lacks: &["--primary-conninfo"],
            },
        ];
        for c in cases {
            let plan = InstancePlan {
                kind: c.kind,
                name: "x",
                namespace: "db",
                owner: owner(),
                replicas: c.replicas,
                instance: &inst,
                storage: &st,
                compression_level: 3,
                credentials_secret: Some("pg-creds"),
                target: c.target,
                streaming: c.streaming,
                walden_image: IMAGE,
            };
            let label = format!("{:?}", c.kind);
            let sts = serde_json::to_value(instance_statefulset(&plan)).expect("sts");
            let svc = serde_json::to_value(instance_service(&plan)).expect("svc");
            assert_eq!(
                sts["metadata"]["ownerReferences"][0]["uid"], "uid-1",
                "{label}"
            );
            assert_eq!(
                svc["metadata"]["ownerReferences"][0]["uid"], "uid-1",
                "{label}"
            );
            assert_eq!(sts["spec"]["replicas"], c.replicas, "{label}");
            assert_eq!(sts["spec"]["serviceName"], c.service, "{label}");
            assert_eq!(svc["metadata"]["name"], c.service, "{label}");
            assert_eq!(
                svc["spec"]["selector"], sts["spec"]["selector"]["matchLabels"],
                "{label}"
            );
            assert_eq!(
                sts["spec"]["template"]["metadata"]["labels"],
                sts["spec"]["selector"]["matchLabels"],
                "{label}"
            );
            let pod = &sts["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{label}");
            assert_eq!(pod["securityContext"]["fsGroup"], 999, "{label}");
            let restore = container(&pod["initContainers"], RESTORE_CONTAINER);
            let cmd: Vec<String> = serde_json::from_value(restore["command"].clone()).expect("cmd");
            for a in c.restore_has {
                assert!(cmd.iter().any(|x| x == a), "{label}: {a} in {cmd:?}");
            }
            for a in c.restore_lacks {
                assert!(!cmd.iter().any(|x| x == a), "{label}: {a} not in {cmd:?}");
            }
            let renv = env_map(restore);
            assert_eq!(
                renv["WALDEN_READ_ONLY"],
                json!("true"),
                "{label}: restore is read-only"
            );
            assert_eq!(
                renv.contains_key(CONNINFO_ENV),
                c.streaming.is_some(),
                "{label}"
            );
            assert!(
                !cmd.iter().any(|a| a.contains("host=")),
                "{label}: no conninfo inline"
            );
            let side = container(&pod["containers"], SIDECAR_CONTAINER);
            assert_eq!(
                env_map(side)["WALDEN_READ_ONLY"],
                json!("true"),
                "{label}: invariant 6"
            );
            assert_eq!(
                side["resources"],
                json!({"limits": {"memory": "128Mi"}}),
                "{label}"
            );
            let pg = container(&pod["containers"], POSTGRES_CONTAINER);
            assert_eq!(
                pg["resources"],
                json!({"requests": {"cpu": "500m"}}),
                "{label}"
            );
            for cont in pod["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(pod["initContainers"].as_array().into_iter().flatten())
            {
                let sc = &cont["securityContext"];
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{label} {}",
                    cont["name"]
                );
                assert_eq!(
                    sc["capabilities"]["drop"],
                    json!(["ALL"]),
                    "{label} {}",
                    cont["name"]
                );
                assert_eq!(sc["runAsNonRoot"], true, "{label} {}", cont["name"]);
            }
            let claim = &sts["spec"]["volumeClaimTemplates"][0];
            assert_eq!(
                claim["spec"]["resources"]["requests"]["storage"], "10Gi",
                "{label}"
            );
            assert_eq!(claim["spec"]["storageClassName"], "fast", "{label}");
        }
    }

    #[test]
    fn token_secret_is_owned_and_opaque() {
        let s = serde_json::to_value(token_secret("n-walden-token", "db", owner(), "abc"))
            .expect("secret");
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["data"]["token"], "YWJj");
        assert_eq!(s["metadata"]["ownerReferences"][0]["controller"], true);
    }
}
