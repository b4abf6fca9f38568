//! The pods the operator builds, run as local processes (design §8): the
//! protected primary (the ContinuousBackup's StatefulSet patch), a Fork and
//! a Follower (their StatefulSets), each from the operator crate's own
//! builders. Commands, args and env are taken from the built objects, never
//! retyped; `walden_e2e::pod` maps only pod paths, ports, Secrets and the
//! user (its module doc lists the whole mapping). PostgreSQL 15 and s3s-fs
//! are real.
//!
//! Checks: the fork holds exactly the rows committed before its target time
//! and is promoted; the follower replays the archive, streams, follows new
//! writes, and is promoted through its daemon's API with the token from the
//! operator's Secret; and in every pod, the `restore_command` that `walden
//! restore` writes only uses paths the postgres container can see.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::json;
use walden_contract::pod::DAEMON_PORT;
use walden_e2e::daemon::http;
use walden_e2e::pod::{Pod, Secrets};
use walden_e2e::sys::{wait_for, ACCESS_KEY, BUCKET, SECRET_KEY};
use walden_e2e::{PgCluster, S3Server, Workdir};
use walden_operator::api::{ContinuousBackup, Follower, Fork};
use walden_operator::restore_test::{observe, Finished};
use walden_operator::specs::{
    self, InstanceKind, InstancePlan, OperatorConfig, RestoreTestPlan, INSTALL_CONTAINER,
    POSTGRES_CONTAINER, RESTORE_CONTAINER, RESTORE_TEST_CONTAINER, SIDECAR_CONTAINER,
};

const LONG: Duration = Duration::from_secs(300);
const IMAGE: &str = "registry.test/walden:e2e";
const NS: &str = "db";
const TOKEN: &str = "pod-test-token-0123456789abcdef";

fn cb(endpoint: &str) -> ContinuousBackup {
    let mut cb: ContinuousBackup = serde_json::from_value(json!({
        "apiVersion": "walden.dev/v1alpha1",
        "kind": "ContinuousBackup",
        "metadata": {"name": "pg", "namespace": NS, "uid": "cb-uid"},
        "spec": {
            "target": {"statefulSet": "pg", "credentialsSecret": "pg-credentials"},
            "storage": {"s3": {
                "bucket": BUCKET, "prefix": "prod/pg", "endpoint": endpoint, "pathStyle": true,
                "credentials": {"secret": "archive-s3"}
            }},
            "archiveTimeout": "60s"
        }
    }))
    .expect("ContinuousBackup");
    cb.metadata.namespace = Some(NS.into());
    cb
}

/// The user's own StatefulSet, as a typical chart for the postgres image writes it.
fn user_statefulset() -> StatefulSet {
    serde_json::from_value(json!({
        "metadata": {"name": "pg", "namespace": NS},
        "spec": {
            "serviceName": "pg",
            "selector": {"matchLabels": {"app": "pg"}},
            "template": {"spec": {"containers": [{
                "name": "postgres",
                "image": "postgres:15",
                "env": [{"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
                "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"}]
            }]}}
        }
    }))
    .expect("StatefulSet")
}

/// Server-side apply of the operator's patch onto the user's pod template:
/// containers merge by name (patch fields replace, lists of env and mounts
/// are merged by key), new containers and volumes are added.
fn apply_patch(sts: &StatefulSet, patch: &serde_json::Value) -> PodSpec {
    let mut pod = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let p: PodSpec =
        serde_json::from_value(patch["spec"]["template"]["spec"].clone()).expect("patch pod spec");
    for pc in p.containers {
        match pod.containers.iter_mut().find(|c| c.name == pc.name) {
            Some(c) => {
                if pc.args.is_some() {
                    c.args = pc.args;
                }
                let env = c.env.get_or_insert_with(Vec::new);
                for e in pc.env.into_iter().flatten() {
                    env.retain(|x| x.name != e.name);
                    env.push(e);
                }
                let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
                for m in pc.volume_mounts.into_iter().flatten() {
                    mounts.retain(|x| x.mount_path != m.mount_path);
                    mounts.push(m);
                }
            }
            None => pod.containers.push(pc),
        }
    }
    pod.init_containers = p.init_containers;
    pod.volumes
        .get_or_insert_with(Vec::new)
        .extend(p.volumes.into_iter().flatten());
    pod
}

fn owner(kind: &str, name: &str) -> OwnerReference {
    OwnerReference {
        api_version: "walden.dev/v1alpha1".into(),
        kind: kind.into(),
        name: name.into(),
        uid: format!("{name}-uid"),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn secrets(owner_name: &str, extra: &[(&str, &str, &str)]) -> Secrets {
    let mut s = Secrets::default();
    s.insert("archive-s3", "AWS_ACCESS_KEY_ID", ACCESS_KEY);
    s.insert("archive-s3", "AWS_SECRET_ACCESS_KEY", SECRET_KEY);
    s.insert("pg-credentials", "username", "postgres");
    s.insert("pg-credentials", "password", "unused-trust-auth");
    // The daemon API token Secret, as the operator builds it.
    s.add(&specs::token_secret(
        &specs::token_secret_name(owner_name),
        NS,
        owner("X", owner_name),
        TOKEN,
    ));
    for (n, k, v) in extra {
        s.insert(n, k, v);
    }
    s
}

/// The postgres container as its image runs it: `postgres` on `$PGDATA`
/// with the container's `-c` settings (written to postgresql.conf, which
/// PostgreSQL reads the same way), listening on the pod's 5432.
fn postgres(pod: &Pod, init: bool) -> PgCluster {
    let c = pod.container(POSTGRES_CONTAINER);
    let env = pod.env(c);
    let pgdata = env
        .iter()
        .find(|(k, _)| k == "PGDATA")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .expect("the postgres container sets PGDATA");
    let mut pg = if init {
        let parent = pgdata.parent().expect("PGDATA parent");
        let name = pgdata.file_name().and_then(|n| n.to_str()).expect("name");
        let pg = PgCluster::init(parent, name);
        // The image's entrypoint runs initdb once; its log lives with the pod.
        PgCluster::adopt(&pod.root, pg.data.clone())
    } else {
        PgCluster::adopt(&pod.root, pgdata)
    };
    pg.port = pod.local_port(5432);
    let mut settings: Vec<(String, String)> = vec![("port".into(), pg.port.to_string())];
    for (k, v) in pod.postgres_settings(c) {
        settings.push((k, format!("'{}'", v.replace('\'', "''"))));
    }
    let refs: Vec<(&str, String)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    pg.set(&refs);
    pg.with_env(env);
    pg
}

fn api(pod: &Pod, method: &str, path: &str) -> (u16, serde_json::Value) {
    let (code, body) = http(pod.local_port(DAEMON_PORT), method, path, Some(TOKEN))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (code, serde_json::from_str(&body).unwrap_or(json!(body)))
}

fn wait_daemon(pod: &Pod, log: &Path) {
    wait_for(
        &format!("the walden sidecar of {} to answer", pod.name),
        Duration::from_secs(60),
        || {
            let ok = http(pod.local_port(DAEMON_PORT), "GET", "/healthz", None)
                .ok()
                .is_some_and(|(c, _)| c == 200);
            if !ok
                && std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .contains("Error")
            {
                return None;
            }
            ok.then_some(())
        },
    );
}

fn digest(pg: &PgCluster) -> Result<String, String> {
    pg.try_sql("SELECT count(*) || ':' || coalesce(md5(string_agg(id || '=' || v, ',' ORDER BY id)), '') FROM t")
}

fn insert(pg: &PgCluster, from: u32, n: u32) {
    pg.sql(&format!(
        "INSERT INTO t SELECT g, md5(g::text) FROM generate_series({from}, {}) g",
        from + n - 1
    ));
}

/// The restore_command `walden restore` wrote, checked to use only paths
/// the postgres container sees, then mapped for this machine.
fn check_restore_command(pod: &Pod, container: &str, pgdata: &Path) {
    let conf_path = pgdata.join("postgresql.auto.conf");
    let conf = std::fs::read_to_string(&conf_path).expect("postgresql.auto.conf");
    let restore = pod.init_container(RESTORE_CONTAINER);
    let pg = pod.container(container);
    let line = conf
        .lines()
        .find(|l| l.trim_start().starts_with("restore_command"))
        .unwrap_or_else(|| panic!("walden restore wrote no restore_command:\n{conf}"));
    // Back to the restore container's view, then forward to the postgres container's.
    let mut pod_view = line.to_string();
    for word in line.split(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        if word.starts_with('/') {
            let in_pod = pod
                .unmap_path(restore, word)
                .unwrap_or_else(|| word.to_string());
            pod_view = pod_view.replace(word, &in_pod);
        }
    }
    for word in pod_view.split(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
        if word.starts_with('/') && word != "/dev/null" {
            assert!(
                pod.map_path(pg, word).is_some(),
                "restore_command uses {word}, which the postgres container of pod {} cannot see \
                 (it sees only its volume mounts): {pod_view}",
                pod.name
            );
        }
    }
    let local = pod.map_value(pg, &pod_view);
    std::fs::write(&conf_path, conf.replace(line, &local)).expect("rewrite postgresql.auto.conf");
}

struct Source {
    _s3: S3Server,
    _pod: Pod,
    pg: PgCluster,
    cb: ContinuousBackup,
}

/// The protected primary: the user's StatefulSet with the operator's patch,
/// its install init container, postgres and the archiving sidecar; a base
/// backup through the daemon API, as the operator's scheduler asks for it.
fn source(work: &Path) -> Source {
    let s3 = S3Server::start(&work.join("s3"));
    let cb = cb(&format!("http://127.0.0.1:{}", s3.port));
    let cfg = OperatorConfig {
        walden_image: IMAGE.into(),
    };
    let sts = user_statefulset();
    let patch = specs::primary_patch(&cb, &sts, &cfg.walden_image).expect("primary patch");
    let spec = apply_patch(&sts, &patch);
    let mut pod = Pod::new(work, "pg-0", spec, IMAGE, secrets("pg", &[]), &[5432]);
    pod.run_init(INSTALL_CONTAINER);
    let mut pg = postgres(&pod, true);
    let log = pod.start(SIDECAR_CONTAINER);
    wait_daemon(&pod, &log);
    pg.start();
    assert_eq!(pg.sql("SHOW archive_mode"), "always");
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    insert(&pg, 0, 5000);
    let (code, job) = api(&pod, "POST", "/v1/backups");
    assert_eq!(code, 202, "POST /v1/backups: {job}");
    let id = job["id"].as_str().expect("backup id").to_string();
    wait_for("the base backup to finish", LONG, || {
        let (_, j) = api(&pod, "GET", &format!("/v1/backups/{id}"));
        match j["state"].as_str() {
            Some("succeeded") => Some(()),
            Some("failed") => panic!(
                "backup failed: {j}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            _ => None,
        }
    });
    Source {
        _s3: s3,
        _pod: pod,
        pg,
        cb,
    }
}

fn plan<'a>(
    kind: InstanceKind,
    name: &'a str,
    cb: &'a ContinuousBackup,
    instance: &'a walden_operator::api::InstanceSpec,
    target: Option<&'a walden_operator::api::RecoveryTarget>,
    streaming: Option<&'a walden_operator::api::StreamingSpec>,
    replicas: i32,
) -> InstancePlan<'a> {
    // As the controllers resolve a `source.continuousBackup`: its storage,
    // compression level and credentials Secret.
    InstancePlan {
        kind,
        name,
        namespace: NS,
        owner: owner(
            if kind == InstanceKind::Fork {
                "Fork"
            } else {
                "Follower"
            },
            name,
        ),
        replicas,
        instance,
        storage: &cb.spec.storage,
        compression_level: cb.spec.compression.as_ref().map(|c| c.level).unwrap_or(3),
        credentials_secret: Some(&cb.spec.target.credentials_secret),
        target,
        streaming,
        walden_image: IMAGE,
    }
}

/// Runs pod 0 of an instance StatefulSet: install, restore, sidecar, postgres.
fn run_instance(work: &Path, sts: &StatefulSet, secrets: Secrets) -> (Pod, PgCluster) {
    let name = format!("{}-0", sts.metadata.name.clone().unwrap_or_default());
    let spec = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.clone())
        .expect("pod spec");
    let mut pod = Pod::new(work, &name, spec, IMAGE, secrets, &[5432]);
    pod.run_init(INSTALL_CONTAINER);
    pod.run_init(RESTORE_CONTAINER);
    let pg_container: Container = pod.container(POSTGRES_CONTAINER).clone();
    let env = pod.env(&pg_container);
    let pgdata = env
        .iter()
        .find(|(k, _)| k == "PGDATA")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .expect("PGDATA");
    check_restore_command(&pod, POSTGRES_CONTAINER, &pgdata);
    let log = pod.start(SIDECAR_CONTAINER);
    wait_daemon(&pod, &log);
    let mut pg = postgres(&pod, false);
    pg.start();
    (pod, pg)
}

#[test]
fn fork_pod_restores_to_its_target_time() {
    let work = Workdir::new("pod-fork");
    let src = source(work.path());
    insert(&src.pg, 5000, 5000);
    let before = digest(&src.pg).expect("digest");
    let target = src.pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    // Committed after the target: the fork must not have these rows.
    wait_for(
        "the clock to pass the target",
        Duration::from_secs(10),
        || {
            (src.pg.sql(&format!(
                "SELECT clock_timestamp() > '{target}'::timestamptz"
            )) == "t")
                .then_some(())
        },
    );
    insert(&src.pg, 10000, 5000);
    let last = src.pg.switch_wal();
    src.pg.wait_archived(&last, LONG);

    let fork: Fork = serde_json::from_value(json!({
        "apiVersion": "walden.dev/v1alpha1",
        "kind": "Fork",
        "metadata": {"name": "pg-fork", "namespace": NS},
        "spec": {
            "source": {"continuousBackup": "pg"},
            "target": {"time": target},
            "instance": {"image": "postgres:15", "storageSize": "1Gi"}
        }
    }))
    .expect("Fork");
    let p = plan(
        InstanceKind::Fork,
        "pg-fork",
        &src.cb,
        &fork.spec.instance,
        fork.spec.target.as_ref(),
        None,
        1,
    );
    let sts = specs::instance_statefulset(&p);
    let (_pod, fork_pg) = run_instance(work.path(), &sts, secrets("pg-fork", &[]));
    wait_for("the fork to reach its target and promote", LONG, || {
        (fork_pg.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    assert_eq!(
        digest(&fork_pg).expect("fork digest"),
        before,
        "fork rows at the target"
    );
    assert!(before.starts_with("10000:"), "{before}");
    assert!(
        fork_pg.log_text().contains("restored log file"),
        "the fork replayed no WAL through restore_command:\n{}",
        fork_pg.log_text()
    );
    fork_pg.sql("INSERT INTO t VALUES (-1, 'the fork is writable')");
}

fn fork_spec(target: &str) -> Fork {
    serde_json::from_value(json!({
        "apiVersion": "walden.dev/v1alpha1",
        "kind": "Fork",
        "metadata": {"name": "pg-fork", "namespace": NS},
        "spec": {
            "source": {"continuousBackup": "pg"},
            "target": {"time": target},
            "instance": {"image": "postgres:15", "storageSize": "1Gi"}
        }
    }))
    .expect("Fork")
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Issue 14.1: a Fork pod recreated on its kept volume (pod deleted, node
/// drained, operator upgrade rolling the StatefulSet) runs the restore init
/// container again. It steps aside and the fork's own writes survive; a
/// restore killed half-way is redone; another target is refused, touching
/// nothing.
#[test]
fn fork_pod_recreated_on_its_volume_keeps_its_writes() {
    let work = Workdir::new("pod-fork-again");
    let src = source(work.path());
    insert(&src.pg, 5000, 5000);
    let at_target = digest(&src.pg).expect("digest");
    let target = src.pg.sql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    wait_for(
        "the clock to pass the target",
        Duration::from_secs(10),
        || {
            (src.pg.sql(&format!(
                "SELECT clock_timestamp() > '{target}'::timestamptz"
            )) == "t")
                .then_some(())
        },
    );
    insert(&src.pg, 10000, 5000);
    let last = src.pg.switch_wal();
    src.pg.wait_archived(&last, LONG);

    let fork = fork_spec(&target);
    let p = plan(
        InstanceKind::Fork,
        "pg-fork",
        &src.cb,
        &fork.spec.instance,
        fork.spec.target.as_ref(),
        None,
        1,
    );
    let sts = specs::instance_statefulset(&p);
    let (pod, mut fork_pg) = run_instance(work.path(), &sts, secrets("pg-fork", &[]));
    wait_for("the fork to reach its target and promote", LONG, || {
        (fork_pg.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    assert_eq!(digest(&fork_pg).expect("digest"), at_target);
    fork_pg.sql("INSERT INTO t VALUES (-1, 'written to the fork')");
    let with_write = digest(&fork_pg).expect("digest");
    fork_pg.stop();

    // The pod is recreated: its init containers run again on the same volume.
    pod.run_init(INSTALL_CONTAINER);
    let again = pod.run_init(RESTORE_CONTAINER);
    assert!(
        stdout(&again).contains("already holds this restore"),
        "second run: {}\n{}",
        stdout(&again),
        String::from_utf8_lossy(&again.stderr)
    );
    fork_pg.start();
    assert_eq!(
        digest(&fork_pg).expect("digest"),
        with_write,
        "the fork's own write survives the second restore run"
    );
    assert_eq!(fork_pg.sql("SELECT pg_is_in_recovery()"), "f");
    fork_pg.stop();

    // The Fork's target changed: refused, with a reason, and nothing touched.
    let other = fork_spec("2020-01-01T00:00:00Z");
    let other_plan = plan(
        InstanceKind::Fork,
        "pg-fork",
        &src.cb,
        &other.spec.instance,
        other.spec.target.as_ref(),
        None,
        1,
    );
    let other_sts = specs::instance_statefulset(&other_plan);
    let other_init = other_sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.init_containers.as_ref())
        .and_then(|l| l.iter().find(|c| c.name == RESTORE_CONTAINER))
        .expect("restore init container")
        .clone();
    let refused = pod.command(&other_init).output().expect("restore");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a different target must fail");
    assert!(
        err.contains("holds a finished restore") && err.contains("2020-01-01"),
        "{err}"
    );
    fork_pg.start();
    assert_eq!(digest(&fork_pg).expect("digest"), with_write, "untouched");
    fork_pg.stop();

    // A restore killed half-way (no pg_control yet, marker in progress) on
    // a second pod is redone, not started.
    let sts2 = {
        let mut s = sts.clone();
        s.metadata.name = Some("pg-fork-b".into());
        s
    };
    let (pod2, mut first_pg2) = run_instance(work.path(), &sts2, secrets("pg-fork", &[]));
    wait_for("the second fork to promote", LONG, || {
        (first_pg2.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    first_pg2.stop();
    let marker = first_pg2.data.join("walden.restore.json");
    let text = std::fs::read_to_string(&marker).expect("restore marker");
    assert!(text.contains("\"complete\""), "{text}");
    std::fs::write(&marker, text.replace("\"complete\"", "\"in-progress\"")).expect("marker");
    std::fs::rename(
        first_pg2.data.join("global/pg_control"),
        first_pg2.data.join("global/pg_control.walden-partial"),
    )
    .expect("simulate a kill before pg_control");
    let redo = pod2.run_init(RESTORE_CONTAINER);
    assert!(
        stdout(&redo).contains("restored backup"),
        "{}\n{}",
        stdout(&redo),
        String::from_utf8_lossy(&redo.stderr)
    );
    check_restore_command(&pod2, POSTGRES_CONTAINER, &first_pg2.data);
    // The redone directory holds the backup's postgresql.conf again: the
    // container's settings (port, ...) are applied as on a fresh start.
    let mut pg2 = postgres(&pod2, false);
    pg2.start();
    wait_for("the redone fork to promote", LONG, || {
        (pg2.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    assert_eq!(
        digest(&pg2).expect("digest"),
        at_target,
        "redone to the target"
    );
}

#[test]
fn follower_pod_replays_streams_follows_and_is_promoted() {
    let work = Workdir::new("pod-follower");
    let src = source(work.path());
    insert(&src.pg, 5000, 5000);
    let last = src.pg.switch_wal();
    src.pg.wait_archived(&last, LONG);

    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres application_name=pg-replicas",
        src.pg.port
    );
    let follower: Follower = serde_json::from_value(json!({
        "apiVersion": "walden.dev/v1alpha1",
        "kind": "Follower",
        "metadata": {"name": "pg-replicas", "namespace": NS},
        "spec": {
            "source": {"continuousBackup": "pg"},
            "replicas": 1,
            "streaming": {"primaryConninfoSecret": "pg-replication"},
            "instance": {"image": "postgres:15", "storageSize": "1Gi"}
        }
    }))
    .expect("Follower");
    let p = plan(
        InstanceKind::Follower,
        "pg-replicas",
        &src.cb,
        &follower.spec.instance,
        None,
        follower.spec.streaming.as_ref(),
        follower.spec.replicas,
    );
    let sts = specs::instance_statefulset(&p);
    let extra = [("pg-replication", "primary_conninfo", conninfo.as_str())];
    let (pod, f_pg) = run_instance(work.path(), &sts, secrets("pg-replicas", &extra));

    let want = digest(&src.pg).expect("digest");
    wait_for("the follower to replay the archive", LONG, || {
        (digest(&f_pg).ok()? == want).then_some(())
    });
    assert_eq!(f_pg.sql("SELECT pg_is_in_recovery()"), "t");
    assert!(
        f_pg.log_text().contains("restored log file"),
        "the follower replayed no WAL from the archive:\n{}",
        f_pg.log_text()
    );
    // It follows: new rows arrive (streaming, with the archive as fallback).
    insert(&src.pg, 10000, 5000);
    let want = digest(&src.pg).expect("digest");
    wait_for("the follower to follow new writes", LONG, || {
        (digest(&f_pg).ok()? == want).then_some(())
    });
    wait_for("the follower to stream from the primary", LONG, || {
        (f_pg.sql("SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'") == "1")
            .then_some(())
    });
    let (code, status) = api(&pod, "GET", "/v1/status");
    assert_eq!(code, 200, "{status}");

    // Promote, as the operator does for spec.promote with one replica.
    let (code, body) = api(&pod, "POST", "/v1/promote");
    assert!(
        (200..300).contains(&code),
        "POST /v1/promote: {code} {body}"
    );
    wait_for("the follower to be promoted", LONG, || {
        (f_pg.try_sql("SELECT pg_is_in_recovery()").ok()? == "f").then_some(())
    });
    f_pg.sql("INSERT INTO t VALUES (-1, 'promoted')");
    assert_eq!(f_pg.sql("SELECT v FROM t WHERE id = -1"), "promoted");
}

/// A restore proof pod of `cb` run to its end as the kubelet would run it:
/// install, restore, then `walden restore-test` in the postgres image.
struct ProofRun {
    pod: Pod,
    restore: std::process::Output,
    proof: Option<std::process::Output>,
}

fn run_proof(
    work: &Path,
    name: &str,
    cb: &ContinuousBackup,
    checks: &[(&str, String)],
    target_lsn: Option<&str>,
) -> ProofRun {
    let spec: walden_operator::api::RestoreTestSpec = serde_json::from_value(json!({
        "schedule": "0 5 * * *",
        "checks": checks.iter().map(|(n, sql)| json!({"name": n, "sql": sql})).collect::<Vec<_>>(),
    }))
    .expect("restoreTest");
    let built = specs::restore_test_pod(&RestoreTestPlan {
        cb_name: "pg",
        namespace: NS,
        owner: owner("ContinuousBackup", "pg"),
        spec: &spec,
        storage: &cb.spec.storage,
        compression_level: 3,
        postgres_image: "postgres:15",
        walden_image: IMAGE,
        run_as_user: 999,
        target_lsn,
    });
    let pod = Pod::new(
        work,
        name,
        built.spec.expect("pod spec"),
        IMAGE,
        secrets("pg", &[]),
        &[],
    );
    pod.run_init(INSTALL_CONTAINER);
    let restore = pod.run_to_end(RESTORE_CONTAINER);
    if !restore.status.success() {
        return ProofRun {
            pod,
            restore,
            proof: None,
        };
    }
    let c = pod.container(RESTORE_TEST_CONTAINER).clone();
    let pgdata = pod
        .env(&c)
        .into_iter()
        .find(|(k, _)| k == "PGDATA")
        .map(|(_, v)| std::path::PathBuf::from(v))
        .expect("PGDATA");
    check_restore_command(&pod, RESTORE_TEST_CONTAINER, &pgdata);
    let proof = pod.run_to_end(RESTORE_TEST_CONTAINER);
    ProofRun {
        pod,
        restore,
        proof: Some(proof),
    }
}

impl ProofRun {
    /// The pod status the kubelet would report (exit codes and termination
    /// messages), read by the operator's own `observe`.
    fn observed(&self) -> Finished {
        let term = |name: &str, out: &std::process::Output| {
            json!({"name": name, "state": {"terminated": {
                "exitCode": out.status.code().unwrap_or(-1),
                "message": self.pod.termination_message(name).unwrap_or_default(),
            }}})
        };
        let mut status = json!({"phase": "Failed",
            "initContainerStatuses": [term(RESTORE_CONTAINER, &self.restore)]});
        if let Some(p) = &self.proof {
            status["containerStatuses"] = json!([term(RESTORE_TEST_CONTAINER, p)]);
            if p.status.success() {
                status["phase"] = json!("Succeeded");
            }
        }
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(
            json!({"metadata": {"name": "pg-restore-test"}, "status": status}),
        )
        .expect("pod status");
        let now = chrono::Utc::now();
        observe(&pod, now, 3600, now).expect("a pod whose containers ended is not running")
    }

    fn output(&self) -> String {
        let mut s = format!(
            "restore: {}\n{}",
            self.restore.status,
            String::from_utf8_lossy(&self.restore.stderr)
        );
        if let Some(p) = &self.proof {
            s.push_str(&format!(
                "restore-test: {}\nstdout: {}\nstderr: {}",
                p.status,
                String::from_utf8_lossy(&p.stdout),
                String::from_utf8_lossy(&p.stderr)
            ));
        }
        s
    }
}

/// Every file under the S3 server's directory with its size.
fn archive_files(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d)
            .expect("read the S3 directory")
            .flatten()
        {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((p, len));
            }
        }
    }
    out.sort();
    out
}

/// The file of the archive object named `name` (its last path part), under
/// the S3 server's directory.
fn archive_object(dir: &Path, name: &str) -> std::path::PathBuf {
    fn walk(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = walk(&p, name) {
                    return Some(f);
                }
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == name)
            {
                return Some(p);
            }
        }
        None
    }
    walk(dir, name).unwrap_or_else(|| panic!("no object {name} under {}", dir.display()))
}

/// Issue 15 §1: the restore proof pod, its containers run as the kubelet
/// runs them and its status read by the operator's own code. A healthy
/// archive is proven (pg_amcheck clean, a check on the ledger's row count
/// true), at the end and at a WAL position inside the window; a check that
/// does not hold, a hole in the archive and a corrupt backup part each
/// fail the proof with their reason.
#[test]
fn restore_proof_pod_proves_the_archive_and_fails_on_holes_and_corruption() {
    let work = Workdir::new("pod-proof");
    let src = source(work.path());
    // After the backup (5000 rows): a segment of 5000 more, then another.
    insert(&src.pg, 5000, 5000);
    let mid_lsn = src.pg.sql("SELECT pg_current_wal_lsn()");
    let middle = src.pg.switch_wal();
    insert(&src.pg, 10000, 5000);
    let last = src.pg.switch_wal();
    src.pg.wait_archived(&last, LONG);
    assert_eq!(src.pg.sql("SELECT count(*) FROM t"), "15000");
    let rows = |n: u32| vec![("rows", format!("select count(*) = {n} from t"))];

    let s3_dir = work.path().join("s3");
    let before = archive_files(&s3_dir);
    let healthy = run_proof(work.path(), "proof-end", &src.cb, &rows(15000), None);
    // The proof promoted its server on a new timeline, yet wrote nothing
    // to the archive it proved (read-only storage, archive_mode=off).
    assert_eq!(
        archive_files(&s3_dir),
        before,
        "the proof wrote to the archive"
    );
    let f = healthy.observed();
    assert_eq!(
        f.result,
        walden_operator::api::RestoreTestResult::Succeeded,
        "{f:?}\n{}",
        healthy.output()
    );
    let report = f.report.clone().expect("report");
    assert_eq!(
        report.amcheck.as_ref().map(|a| a.passed),
        Some(true),
        "{report:?}"
    );
    assert_eq!(
        report
            .checks
            .iter()
            .map(|c| (c.name.as_str(), c.passed))
            .collect::<Vec<_>>(),
        vec![("rows", true)]
    );
    assert!(
        report.reached_lsn.is_some() && report.reached_time.is_some(),
        "{report:?}"
    );
    assert!(f.backup.is_some() && report.backup == f.backup, "{f:?}");
    // The report on stdout is the termination message.
    let stdout = String::from_utf8_lossy(&healthy.proof.as_ref().expect("ran").stdout).into_owned();
    assert_eq!(
        Some(stdout.trim()),
        healthy
            .pod
            .termination_message(RESTORE_TEST_CONTAINER)
            .as_deref()
            .map(str::trim)
    );

    // A WAL position inside the window (what Random picks): exactly the
    // rows committed before it.
    let at = run_proof(
        work.path(),
        "proof-lsn",
        &src.cb,
        &rows(10000),
        Some(&mid_lsn),
    );
    let f = at.observed();
    assert_eq!(f.reason, "Passed", "{f:?}\n{}", at.output());

    let wrong = run_proof(work.path(), "proof-check", &src.cb, &rows(15001), None);
    let f = wrong.observed();
    assert_eq!(
        (f.result, f.reason.as_str()),
        (
            walden_operator::api::RestoreTestResult::Failed,
            "CheckFailed"
        ),
        "{f:?}\n{}",
        wrong.output()
    );
    assert!(f.message.contains("\"rows\""), "{}", f.message);

    // A hole: the segment between the backup and the archive's end.
    let seg = archive_object(&s3_dir, &format!("{middle}.zst"));
    let aside = seg.with_extension("aside");
    std::fs::rename(&seg, &aside).expect("move the segment aside");
    let hole = run_proof(work.path(), "proof-hole", &src.cb, &rows(15000), None);
    std::fs::rename(&aside, &seg).expect("put the segment back");
    let f = hole.observed();
    assert_eq!(f.reason, "RecoveryFailed", "{f:?}\n{}", hole.output());
    assert!(
        f.message.contains(&middle) && f.message.contains("hole"),
        "the proof names the hole: {}",
        f.message
    );

    // A corrupt part: the restore refuses it, and the proof says so.
    let part = archive_object(&s3_dir, "part-00001.tar.zst");
    let good = std::fs::read(&part).expect("part");
    let mut bad = good.clone();
    let i = bad.len() / 2;
    bad[i] ^= 0xff;
    std::fs::write(&part, &bad).expect("corrupt the part");
    let corrupt = run_proof(work.path(), "proof-corrupt", &src.cb, &rows(15000), None);
    std::fs::write(&part, &good).expect("repair the part");
    let f = corrupt.observed();
    assert_eq!(
        (f.result, f.reason.as_str()),
        (
            walden_operator::api::RestoreTestResult::Failed,
            "RestoreFailed"
        ),
        "{f:?}\n{}",
        corrupt.output()
    );
    assert!(f.message.contains("part-00001"), "{}", f.message);
}
