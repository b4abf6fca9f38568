#!/usr/bin/env python3
"""Walden's cluster suite: drives a real Kubernetes cluster the way a user
does (helm install of charts/walden, a protected PostgreSQL StatefulSet,
Forks, a Follower, faults) and checks rows, not exit codes.

Run through e2e/cluster/run.sh, which prepares images and the Python
environment (helm-python-sdk). Prints one line per step and ends with
`cluster: N passed, M failed`. Settings come from the environment (see
run.sh); every wait polls with a generous deadline (WALDEN_E2E_TIMEOUT).
"""

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import helm_python as helm
import yaml

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NS = os.environ.get("WALDEN_E2E_NAMESPACE", "walden-e2e")
OP_NS = os.environ.get("WALDEN_E2E_OPERATOR_NAMESPACE", "walden-system")
RELEASE = "walden"
DEPLOYMENT = f"{RELEASE}-operator"  # the chart's fullname for this release
TIMEOUT = int(os.environ.get("WALDEN_E2E_TIMEOUT", "300"))
REGISTRY = os.environ.get("WALDEN_E2E_REGISTRY", "walden")
TAG = os.environ["WALDEN_E2E_TAG"]
POSTGRES_IMAGE = os.environ.get("WALDEN_E2E_POSTGRES_IMAGE", "postgres:15")
S3_IMAGE = os.environ.get("WALDEN_E2E_S3_IMAGE", "local/s3s-fs:0.14.1")
KEEP = os.environ.get("WALDEN_E2E_KEEP") == "1"
KUBECONFIG = os.environ["KUBECONFIG"]


FOUNDATION = 6  # install, operator, fixtures, protection, archiving, base backup


class StepFailed(Exception):
    pass


# --- kubectl and polling ----------------------------------------------------


def kubectl(*args, stdin=None, check=True, ns=NS, timeout=120):
    cmd = ["kubectl"] + (["-n", ns] if ns else []) + list(args)
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise StepFailed(f"kubectl {' '.join(args)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def get(kind, name=None, ns=NS, check=True):
    out = kubectl("get", kind, *([name] if name else []), "-o", "json", ns=ns, check=check)
    return json.loads(out) if out.strip() else None


def apply(manifest, ns=NS):
    kubectl("apply", "-f", "-", stdin=manifest, ns=ns)


def poll(what, fn, timeout=None):
    """Calls fn until it returns a truthy value; fails with what it waited for
    and the last error or value once the deadline passes."""
    deadline = time.monotonic() + (timeout or TIMEOUT)
    last = None
    while True:
        try:
            value = fn()
            if value:
                return value
            last = value
        except (StepFailed, subprocess.TimeoutExpired, KeyError, IndexError, TypeError, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            raise StepFailed(f"timed out after {timeout or TIMEOUT}s waiting for {what} (last: {last})")
        time.sleep(1)


def condition(obj, kind):
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return {}


def pod_ready(name, ns=NS):
    pod = get("pod", name, ns=ns, check=False)
    if not pod or pod["metadata"].get("deletionTimestamp"):
        return None
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if statuses and all(s.get("ready") for s in statuses):
        return pod
    return None


def psql(pod, sql, container="postgres"):
    return kubectl(
        "exec", pod, "-c", container, "--", "psql", "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-Atqc", sql
    ).strip()


# --- the ledger: rows with known commit order --------------------------------


LEDGER = "CREATE TABLE IF NOT EXISTS ledger (id bigint PRIMARY KEY, batch text NOT NULL)"


def insert_batch(pod, batch, first, count):
    """Commits rows first..first+count-1 of a batch; returns their ids."""
    psql(pod, f"INSERT INTO ledger SELECT g, '{batch}' FROM generate_series({first}, {first + count - 1}) g")
    return set(range(first, first + count))


def ledger_ids(pod):
    out = psql(pod, "SELECT id FROM ledger ORDER BY id")
    return {int(x) for x in out.split()} if out else set()


def server_now(pod):
    """The server's clock after the previous commit returned, in RFC 3339
    with microseconds (a target recorded to the second can precede a commit
    made in the same second)."""
    return psql(pod, "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")


def archived_through(pod):
    """Switches WAL and returns the segment the archive must reach to hold
    everything committed so far."""
    seg = psql(pod, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    psql(pod, "SELECT pg_switch_wal()")
    return seg


def wait_archived(pod, seg):
    def done():
        row = psql(pod, "SELECT coalesce(last_archived_wal, ''), failed_count FROM pg_stat_archiver")
        last, failed = row.split("|")
        return last >= seg and last
    return poll(f"segment {seg} archived", done)


# --- the suite ------------------------------------------------------------


class Suite:
    def __init__(self):
        self.passed = 0
        self.failed = 0
        self.crds_created = False
        self.helm = helm.Config(kubeconfig_path=KUBECONFIG, namespace=OP_NS)
        self.expected = set()  # ids committed on the primary
        self.fork_target = None

    def step(self, name, fn):
        start = time.monotonic()
        try:
            detail = fn()
        except Exception as e:
            self.failed += 1
            msg = str(e) if isinstance(e, StepFailed) else "".join(traceback.format_exception(e))
            print(f"FAIL {name} ({time.monotonic() - start:.1f}s): {msg}", flush=True)
            self.diagnostics()
            return False
        self.passed += 1
        print(f"ok   {name} ({time.monotonic() - start:.1f}s){': ' + detail if detail else ''}", flush=True)
        return True

    def diagnostics(self):
        print("--- diagnostics", file=sys.stderr)
        for args, ns in (
            (["get", "all,cb,fork,follower,pvc", "-o", "wide"], NS),
            (["get", "events", "--sort-by=.lastTimestamp"], NS),
            (["logs", "deploy/" + DEPLOYMENT, "--tail=60"], OP_NS),
        ):
            print(kubectl(*args, ns=ns, check=False)[-6000:], file=sys.stderr)
        # Containers that restarted: their last words.
        pods = get("pods", check=False) or {"items": []}
        for pod in pods["items"]:
            for c in pod.get("status", {}).get("containerStatuses") or []:
                if c.get("restartCount"):
                    name = pod["metadata"]["name"]
                    print(f"--- {name}/{c['name']} (previous)", file=sys.stderr)
                    print(kubectl("logs", name, "-c", c["name"], "--previous", "--tail=30", check=False), file=sys.stderr)
        sys.stderr.flush()

    # 1. the operator, installed in the cluster from the chart

    def chart_for_cluster(self):
        """charts/walden, or for a cluster older than the chart's kubeVersion
        (1.20 has no CEL) a test-only copy: CRDs without their
        x-kubernetes-validations rules and kubeVersion widened. A modern
        cluster always gets the chart unchanged."""
        chart = os.path.join(REPO, "charts", "walden")
        version = json.loads(kubectl("version", "-o", "json", ns=None))["serverVersion"]
        minor = int(re.match(r"\d+", version["minor"]).group())
        meta = yaml.safe_load(open(os.path.join(chart, "Chart.yaml")))
        wanted = re.search(r">=\s*1\.(\d+)", meta.get("kubeVersion", ""))
        if not wanted or minor >= int(wanted.group(1)):
            return chart, f"chart unchanged (server {version['gitVersion']})"
        tmp = tempfile.mkdtemp(prefix="walden-chart-")
        copy = os.path.join(tmp, "walden")
        shutil.copytree(chart, copy)
        meta["kubeVersion"] = f">=1.{minor}.0-0"
        with open(os.path.join(copy, "Chart.yaml"), "w") as f:
            yaml.safe_dump(meta, f, sort_keys=False)
        removed = 0
        for name in os.listdir(os.path.join(copy, "crds")):
            path = os.path.join(copy, "crds", name)
            docs = list(yaml.safe_load_all(open(path)))

            def strip(node):
                nonlocal removed
                if isinstance(node, dict):
                    if node.pop("x-kubernetes-validations", None) is not None:
                        removed += 1
                    for v in node.values():
                        strip(v)
                elif isinstance(node, list):
                    for v in node:
                        strip(v)

            for d in docs:
                strip(d)
            with open(path, "w") as f:
                yaml.safe_dump_all(docs, f, sort_keys=False)
        self.tmp_chart = tmp
        return copy, (
            f"TEST-ONLY chart copy for {version['gitVersion']} < 1.{wanted.group(1)}: "
            f"{removed} CEL rule sets removed from the CRDs"
        )

    def values(self, tag):
        return {
            "image": {"repository": f"{REGISTRY}/walden-operator", "tag": tag, "pullPolicy": "IfNotPresent"},
            "walden": {"image": {"repository": f"{REGISTRY}/walden", "tag": tag}},
            "logging": {"format": "text"},
        }

    def install(self):
        self.crds_created = get("crd", "continuousbackups.walden.dev", ns=None, check=False) is None
        chart, how = self.chart_for_cluster()
        self.chart = chart
        kubectl("create", "namespace", OP_NS, ns=None, check=False)
        try:
            self.helm.status(RELEASE)
            exists = True
        except helm.HelmNotFoundError:
            exists = False
        if exists:  # left by an earlier run (e.g. WALDEN_E2E_KEEP=1)
            self.helm.upgrade(chart, RELEASE, self.values(TAG), namespace=OP_NS, wait="watcher", timeout=TIMEOUT)
            return how + " (upgraded the release an earlier run left)"
        self.helm.install(chart, RELEASE, self.values(TAG), namespace=OP_NS, wait="watcher", timeout=TIMEOUT)
        return how

    def operator_running(self):
        def available():
            d = get("deployment", DEPLOYMENT, ns=OP_NS)
            return d["status"].get("availableReplicas", 0) >= 1 and d
        poll("the operator Deployment available", available)
        pods = get("pods", ns=OP_NS)["items"]
        names = {p["metadata"]["name"] for p in pods if p["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE}

        def leader():
            lease = get("lease", "walden-operator", ns=OP_NS)
            holder = lease["spec"].get("holderIdentity")
            return holder if holder in names else None
        holder = poll("the Lease held by an operator pod", leader)
        svc = f"{DEPLOYMENT}-metrics"
        metrics = poll(
            "/metrics through the Service",
            lambda: kubectl("get", "--raw", f"/api/v1/namespaces/{OP_NS}/services/http:{svc}:8080/proxy/metrics", ns=None),
        )
        families = sorted({m.group(1) for m in re.finditer(r"^# TYPE (\S+)", metrics, re.M)})
        if not families:
            raise StepFailed(f"/metrics has no metric families: {metrics[:200]}")
        sa = get("deployment", DEPLOYMENT, ns=OP_NS)["spec"]["template"]["spec"]["serviceAccountName"]
        return f"leader {holder}, service account {sa}, {len(families)} metric families"

    # 2. a protected primary

    def infra(self):
        kubectl("create", "namespace", NS, ns=None, check=False)
        text = open(os.path.join(REPO, "e2e/cluster/manifests/infra.yaml")).read()
        apply(text.replace("${S3_IMAGE}", S3_IMAGE).replace("${POSTGRES_IMAGE}", POSTGRES_IMAGE))
        poll("the S3 server", lambda: get("deployment", "s3")["status"].get("availableReplicas"))
        poll("pg-0 ready", lambda: pod_ready("pg-0"))
        psql("pg-0", LEDGER)
        self.expected |= insert_batch("pg-0", "before-protection", 1, 100)
        return f"s3s-fs and PostgreSQL {psql('pg-0', 'SHOW server_version')}"

    def protect(self):
        before = get("pod", "pg-0")["metadata"]["uid"]
        apply(open(os.path.join(REPO, "e2e/cluster/manifests/continuousbackup.yaml")).read())

        def rolled():
            pod = pod_ready("pg-0")
            if not pod or pod["metadata"]["uid"] == before:
                return None
            names = [c["name"] for c in pod["spec"]["containers"]]
            inits = [c["name"] for c in pod["spec"].get("initContainers") or []]
            return pod if "walden" in names and "walden-install" in inits else None
        pod = poll("pg-0 rolled with the walden init container and sidecar", rolled)
        if psql("pg-0", "SHOW archive_command") != "/walden/bin/walden wal-push %p":
            raise StepFailed(f"archive_command is {psql('pg-0', 'SHOW archive_command')!r}")
        side = next(c for c in pod["spec"]["containers"] if c["name"] == "walden")
        sc = {**(pod["spec"].get("securityContext") or {}), **(side.get("securityContext") or {})}
        problems = []
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append("root fs writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append("privilege escalation allowed")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problems.append("capabilities not dropped")
        if not sc.get("runAsNonRoot") and not sc.get("runAsUser"):
            problems.append("may run as root")
        if side.get("args", [None])[0] != "daemon" and "daemon" not in (side.get("command") or []) + (side.get("args") or []):
            problems.append(f"sidecar runs {side.get('command')} {side.get('args')}")
        # As running: the kernel's view of the sidecar's process.
        status = kubectl("exec", "pg-0", "-c", "walden", "--", "cat", "/proc/1/status", check=False)
        if status:
            uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
            cap = re.search(r"^CapEff:\s+(\S+)", status, re.M).group(1)
            if uid == "0" or int(cap, 16) != 0:
                problems.append(f"sidecar runs as uid {uid} with CapEff {cap}")
            touch = subprocess.run(
                ["kubectl", "-n", NS, "exec", "pg-0", "-c", "walden", "--", "touch", "/walden-probe"],
                capture_output=True, text=True, timeout=60,
            )
            if touch.returncode == 0:
                problems.append("the sidecar could write to its root file system")
        if problems:
            raise StepFailed("sidecar security context: " + ", ".join(problems))
        if not (ids := ledger_ids("pg-0")) >= self.expected:
            raise StepFailed(f"rows lost across the roll: {len(self.expected - ids)}")
        return f"pod rolled; sidecar uid/caps as built ({sc.get('runAsUser')}, drop ALL, read-only root)"

    def archiving(self):
        self.expected |= insert_batch("pg-0", "archived", 1001, 1000)
        seg = archived_through("pg-0")
        wait_archived("pg-0", seg)
        row = psql("pg-0", "SELECT archived_count, failed_count FROM pg_stat_archiver")
        archived, failed = (int(x) for x in row.split("|"))
        if archived <= 0 or failed != 0:
            raise StepFailed(f"pg_stat_archiver archived={archived} failed={failed}")
        wal = poll("status.lastArchivedWal", lambda: get("cb", "pg")["status"].get("lastArchivedWal"))
        return f"pg_stat_archiver archived={archived} failed=0, status lastArchivedWal {wal}"

    def base_backup(self):
        backup = poll("a scheduled base backup in status", lambda: (get("cb", "pg")["status"].get("lastBackup") or {}).get("id"))
        cb = poll("ContinuousBackup Ready", lambda: (c := get("cb", "pg")) and condition(c, "Ready").get("status") == "True" and c)
        table = kubectl("get", "cb", "pg")
        header, row = table.splitlines()[:2]
        cols = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))
        for col in ("LAST BACKUP", "RECOVERABLE FROM", "ARCHIVE BACKLOG"):
            if not cols.get(col) or cols[col] == "<none>":
                raise StepFailed(f"kubectl get cb: column {col} empty: {table}")
        events = get("events")["items"]
        reasons = {e["reason"] for e in events if e["involvedObject"].get("name") == "pg" and e["involvedObject"].get("kind") == "ContinuousBackup"}
        if not any("Backup" in r for r in reasons):
            raise StepFailed(f"no backup Event on the ContinuousBackup (reasons: {sorted(reasons)})")
        del cb
        return f"backup {backup}; kubectl get cb: {cols}; events {sorted(reasons)}"

    # 3. forks

    def fork(self, name, target, source="pg"):
        body = {
            "apiVersion": "walden.dev/v1alpha1",
            "kind": "Fork",
            "metadata": {"name": name},
            "spec": {
                "source": {"continuousBackup": source},
                "instance": {"image": POSTGRES_IMAGE, "storageSize": "1Gi"},
                **({"target": target} if target else {}),
            },
        }
        apply(json.dumps(body))

        def ready():
            f = get("fork", name)
            phase = (f.get("status") or {}).get("phase")
            if phase == "Failed":
                raise RuntimeError(f"fork {name} Failed: {condition(f, 'Ready')}")
            return phase == "Ready" and f
        try:
            f = poll(f"fork {name} Ready", ready)
        except RuntimeError as e:
            raise StepFailed(str(e))
        pod = f"{name}-0"
        poll(f"{pod} ready", lambda: pod_ready(pod))
        return f, pod

    def check_fork_rows(self, pod, want):
        got = ledger_ids(pod)
        if got != want:
            raise StepFailed(
                f"{pod} rows differ: {len(got)} rows, missing {sorted(want - got)[:5]}…, extra {sorted(got - want)[:5]}…"
            )
        if psql(pod, "SELECT pg_is_in_recovery()") != "f":
            raise StepFailed(f"{pod} is still in recovery")
        psql(pod, "INSERT INTO ledger VALUES (-1, 'fork-write')")
        return len(got)

    def fork_at_time(self):
        self.expected |= insert_batch("pg-0", "before-target", 10001, 500)
        at_target = set(self.expected)
        target = server_now("pg-0")
        self.expected |= insert_batch("pg-0", "after-target", 20001, 500)
        wait_archived("pg-0", archived_through("pg-0"))
        f, pod = self.fork("pg-fork", {"time": target})
        n = self.check_fork_rows(pod, at_target)
        return f"target {target}: {n} rows exactly, none of the 500 committed after it; writable; from {f['status'].get('restoredFromBackup')}"

    def fork_at_lsn(self):
        self.expected |= insert_batch("pg-0", "before-lsn", 30001, 300)
        at_lsn = set(self.expected)
        lsn = psql("pg-0", "SELECT pg_current_wal_lsn()")
        self.expected |= insert_batch("pg-0", "after-lsn", 31001, 300)
        wait_archived("pg-0", archived_through("pg-0"))
        _, pod = self.fork("pg-fork-lsn", {"lsn": lsn})
        n = self.check_fork_rows(pod, at_lsn)
        return f"lsn {lsn}: {n} rows exactly; writable"

    def fork_latest(self):
        self.expected |= insert_batch("pg-0", "before-latest", 40001, 300)
        want = set(self.expected)
        wait_archived("pg-0", archived_through("pg-0"))
        _, pod = self.fork("pg-fork-latest", None)
        n = self.check_fork_rows(pod, want)
        return f"end of the archive: {n} rows (every committed row); writable"

    # 4. a follower

    def follower(self):
        body = {
            "apiVersion": "walden.dev/v1alpha1",
            "kind": "Follower",
            "metadata": {"name": "pg-replicas"},
            "spec": {
                "source": {"continuousBackup": "pg"},
                "replicas": 1,
                "streaming": {"primaryConninfoSecret": "pg-replication"},
                "instance": {"image": POSTGRES_IMAGE, "storageSize": "1Gi"},
            },
        }
        apply(json.dumps(body))
        poll("the follower's replica ready", lambda: (get("follower", "pg-replicas").get("status") or {}).get("readyReplicas") == 1)
        pod = "pg-replicas-0"
        poll(f"{pod} ready", lambda: pod_ready(pod))
        self.expected |= insert_batch("pg-0", "while-following", 50001, 300)
        want = set(self.expected)
        poll("the follower to hold every committed row", lambda: ledger_ids(pod) == want)
        if psql(pod, "SELECT pg_is_in_recovery()") != "t":
            raise StepFailed("the follower is not a standby")
        receiver = poll(
            "the follower streaming from the primary (pg_stat_wal_receiver)",
            lambda: psql(pod, "SELECT status || ' from ' || sender_host FROM pg_stat_wal_receiver WHERE status = 'streaming'"),
        )
        replica = poll(
            "replay lag in the Follower's status",
            lambda: next(
                (r for r in (get("follower", "pg-replicas")["status"].get("replicas") or [])
                 if r.get("pod") == pod and r.get("lagSeconds") is not None),
                None,
            ),
        )
        # Issue 14.4: status says, per replica, that it streams.
        streaming = poll(
            "the Follower's status: the replica streams, condition Streaming=True",
            lambda: (f := get("follower", "pg-replicas")) and any(
                r.get("pod") == pod and r.get("streaming") is True for r in (f["status"].get("replicas") or [])
            ) and condition(f, "Streaming").get("status") == "True" and condition(f, "Streaming"),
        )
        return (f"{len(want)} rows followed; {receiver}; status replayLsn {replica.get('replayLsn')} "
                f"lag {replica.get('lagSeconds')}s; Streaming {streaming.get('reason')}")

    def promote(self):
        kubectl("patch", "follower", "pg-replicas", "--type", "merge", "-p", '{"spec":{"promote":true}}')
        poll("status.promoted", lambda: get("follower", "pg-replicas")["status"].get("promoted") is True)
        pod = "pg-replicas-0"
        poll("the promoted follower out of recovery", lambda: psql(pod, "SELECT pg_is_in_recovery()") == "f")
        psql(pod, "INSERT INTO ledger VALUES (-2, 'promoted-write')")
        return "promoted and writable"

    # 5. faults

    def primary_pod_deleted(self):
        before = get("pod", "pg-0")["metadata"]["uid"]
        self.expected |= insert_batch("pg-0", "before-delete", 60001, 300)
        kubectl("delete", "pod", "pg-0", "--wait=false")
        # Load while the pod goes and comes back: every batch whose INSERT
        # returned success is committed; one that failed may or may not be.
        uncertain = set()
        first = 61001
        deadline = time.monotonic() + TIMEOUT
        while True:
            ids = set(range(first, first + 50))
            try:
                insert_batch("pg-0", "during-delete", first, 50)
                self.expected |= ids
            except (StepFailed, subprocess.TimeoutExpired):
                uncertain |= ids
            first += 50
            pod = get("pod", "pg-0", check=False)
            if pod and pod["metadata"]["uid"] != before and pod_ready("pg-0"):
                break
            if time.monotonic() > deadline:
                raise StepFailed("pg-0 did not come back")
        self.expected |= insert_batch("pg-0", "after-delete", first, 50)
        got = ledger_ids("pg-0")
        if not got >= self.expected:
            raise StepFailed(f"committed rows lost: {sorted(self.expected - got)[:10]}")
        self.expected |= got & uncertain
        wait_archived("pg-0", archived_through("pg-0"))
        _, fork = self.fork("pg-fork-after-delete", None)
        n = self.check_fork_rows(fork, set(self.expected))
        return f"pod recreated; archiving resumed; a restore to the end holds all {n} committed rows"

    def s3_backups(self):
        out = kubectl("exec", "deploy/s3", "--", "sh", "-c", "ls /data/walden-e2e/e2e/pg/backups/*/backup.json 2>/dev/null || true")
        return sorted(p.split("/")[-2] for p in out.split())

    def operator_restart_mid_backup(self):
        cb = poll("a backup in progress", lambda: (c := get("cb", "pg")) and c["status"].get("backupInProgress") and c, timeout=max(TIMEOUT, 180))
        running = cb["status"]["backupInProgress"]
        before = set(self.s3_backups())
        old = [p["metadata"]["name"] for p in get("pods", ns=OP_NS)["items"]
               if p["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE]
        kubectl("delete", "pod", *old, "--wait=false", ns=OP_NS)
        poll("a new operator leading", lambda: get("lease", "walden-operator", ns=OP_NS)["spec"].get("holderIdentity") not in old + [None])

        def finished():
            new = set(self.s3_backups()) - before
            status = get("cb", "pg")["status"]
            last = (status.get("lastBackup") or {}).get("id")
            return new and status.get("backupInProgress") != running and last in new and new
        new = sorted(poll(f"the backup running during the restart ({running}) in storage and in status", finished))
        after = self.s3_backups()
        minutes = [b[:13] for b in after]
        dupes = sorted({m for m in minutes if minutes.count(m) > 1})
        if dupes:
            raise StepFailed(f"more than one backup in a scheduled minute: {dupes} in {after}")
        poll("ContinuousBackup Ready after the restart", lambda: condition(get("cb", "pg"), "Ready").get("status") == "True")
        return f"job {running} survived the restart: new backups {new}, one per scheduled minute"

    def sidecar_killed(self):
        def walden_status():
            return next(c for c in get("pod", "pg-0")["status"]["containerStatuses"] if c["name"] == "walden")
        cid = walden_status().get("containerID", "")
        if not cid.startswith("docker://") or not shutil.which("docker"):
            raise StepFailed("killing a container needs the node's docker (containerID %r)" % cid)
        failed0 = int(psql("pg-0", "SELECT failed_count FROM pg_stat_archiver"))
        kills = 0
        first = 70001

        def failed():
            return int(psql("pg-0", "SELECT failed_count FROM pg_stat_archiver")) > failed0

        def down_and_failing():
            # One kill, one commit while the sidecar is gone, then wait until
            # PostgreSQL reports archive_command failing or the sidecar is back
            # (the kubelet restarted it within the client's socket wait): only
            # then kill again, so the kubelet's back-off grows no more than needed.
            nonlocal kills, first
            state = walden_status()
            if "running" in (state.get("state") or {}):
                subprocess.run(["docker", "kill", state["containerID"].removeprefix("docker://")],
                               capture_output=True, check=False)
                kills += 1
                poll("the sidecar seen down", lambda: "running" not in (walden_status().get("state") or {})
                     or walden_status().get("containerID") != state["containerID"], timeout=60)
            # Ids are never reused, even when kubectl fails after a commit;
            # what committed is read back below.
            first += 100
            insert_batch("pg-0", "sidecar-down", first - 100, 100)
            psql("pg-0", "SELECT pg_switch_wal()")
            return poll("archive_command failing, or the sidecar back",
                        lambda: ("failed" if failed() else None)
                        or ("back" if "running" in (walden_status().get("state") or {}) else None),
                        timeout=120) == "failed"
        try:
            poll("archive_command failing while the sidecar is down", down_and_failing)
        finally:
            down = psql("pg-0", "SELECT id FROM ledger WHERE batch = 'sidecar-down'")
            self.expected |= {int(x) for x in down.split()}
        seg = archived_through("pg-0")
        poll("the sidecar back", lambda: pod_ready("pg-0"))
        last = wait_archived("pg-0", seg)
        return (f"{kills} kill(s): archive_command failed while the sidecar was down, PostgreSQL kept the "
                f"segments, archived through {last} once it was back")

    def restore_proof(self):
        """spec.restoreTest on the node (issue 15 §1): a proof pod restores the
        archive's end, pg_amcheck and a ledger check pass, status records the
        proof, Recoverable=True, and the proof pod is removed."""
        n = len(self.expected)
        wait_archived("pg-0", archived_through("pg-0"))
        kubectl("patch", "cb", "pg", "--type", "merge", "-p", json.dumps({"spec": {"restoreTest": {
            "schedule": "* * * * *", "deadlineSeconds": 600,
            "checks": [{"name": "ledger", "sql": f"select count(*) >= {n} from ledger"}]}}}))
        try:
            cb = poll("a restore proof recorded", lambda: (c := get("cb", "pg"))
                      and (c.get("status") or {}).get("lastRestoreTest") and c, timeout=max(TIMEOUT, 420))
            last = cb["status"]["lastRestoreTest"]
            if last.get("result") != "Succeeded":
                raise StepFailed(f"proof {last.get('result')} {last.get('reason')}: {last.get('message')}")
            checks = {c["name"]: c["passed"] for c in last.get("checks", [])}
            if checks != {"pg_amcheck": True, "ledger": True}:
                raise StepFailed(f"checks {checks}")
            if not (last.get("reached") or {}).get("lsn") or not last.get("backupUsed"):
                raise StepFailed(f"no reached LSN or backup in {last}")
            cond = condition(cb, "Recoverable")
            if cond.get("status") != "True":
                raise StepFailed(f"Recoverable {cond}")
            if "Succeeded" not in kubectl("get", "cb", "pg"):
                raise StepFailed("no Restore Test column")
        finally:
            kubectl("patch", "cb", "pg", "--type", "json", "-p",
                    '[{"op": "remove", "path": "/spec/restoreTest"}]', check=False)
        poll("no proof pod left once restoreTest is removed", lambda: not kubectl(
            "get", "pods", "-l", "app.kubernetes.io/component=restore-test", "-o", "name").strip())
        return (f"{last['target']}: backup {last['backupUsed']}, reached {last['reached']['lsn']}, "
                f"restore {last.get('restoreSeconds')}s, replay {last.get('replaySeconds', 0):.1f}s, "
                f"pg_amcheck and ledger >= {n} rows passed; Recoverable=True")

    def bad_fork(self):
        future = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        apply(json.dumps({
            "apiVersion": "walden.dev/v1alpha1", "kind": "Fork", "metadata": {"name": "pg-fork-bad"},
            "spec": {"source": {"continuousBackup": "pg"}, "target": {"time": future},
                     "instance": {"image": POSTGRES_IMAGE, "storageSize": "1Gi"}},
        }))
        f = poll("the bad fork Failed", lambda: (f := get("fork", "pg-fork-bad")) and (f.get("status") or {}).get("phase") == "Failed" and f)
        cond = condition(f, "Ready")
        if cond.get("status") != "False" or not cond.get("message"):
            raise StepFailed(f"no clear condition: {cond}")
        left = kubectl("get", "statefulsets,pods", "-l", "walden.dev/instance=pg-fork-bad", "-o", "name")
        if left.strip():
            raise StepFailed(f"left running: {left.split()}")
        return f"Failed {cond.get('reason')}: {cond.get('message')}"

    def fork_past_a_hole(self):
        """A segment missing from the middle of the archive: a Fork whose target
        lies past it is Failed naming the hole (issue 14.5), never Recovering
        forever. The segment is put back afterwards."""
        kubectl("patch", "cb", "pg", "--type", "merge", "-p", '{"spec":{"suspend":true}}')
        try:
            # No backup may start after the hole, or the restore would skip it.
            poll("no backup in progress", lambda: not get("cb", "pg")["status"].get("backupInProgress"), timeout=max(TIMEOUT, 180))
            self.expected |= insert_batch("pg-0", "before-hole", 80001, 100)
            wait_archived("pg-0", archived_through("pg-0"))
            self.expected |= insert_batch("pg-0", "in-hole", 80101, 100)
            hole = archived_through("pg-0")
            self.expected |= insert_batch("pg-0", "after-hole", 80201, 100)
            target = server_now("pg-0")
            wait_archived("pg-0", archived_through("pg-0"))
            found = kubectl("exec", "deploy/s3", "--", "sh", "-c",
                            f"ls /data/walden-e2e/e2e/pg/wal/*/{hole}.zst").split()
            if len(found) != 1:
                raise StepFailed(f"segment {hole} not found once in the S3 server: {found}")
            kubectl("exec", "deploy/s3", "--", "mv", found[0], found[0] + ".aside")
            try:
                apply(json.dumps({
                    "apiVersion": "walden.dev/v1alpha1", "kind": "Fork", "metadata": {"name": "pg-fork-hole"},
                    "spec": {"source": {"continuousBackup": "pg"}, "target": {"time": target},
                             "instance": {"image": POSTGRES_IMAGE, "storageSize": "1Gi"}},
                }))
                f = poll("the fork past the hole Failed", lambda: (f := get("fork", "pg-fork-hole"))
                         and (f.get("status") or {}).get("phase") == "Failed" and f)
                cond = condition(f, "Ready")
                if hole not in cond.get("message", "") and "hole" not in cond.get("message", ""):
                    raise StepFailed(f"the condition does not name the hole {hole}: {cond}")
            finally:
                kubectl("exec", "deploy/s3", "--", "mv", found[0] + ".aside", found[0])
                kubectl("delete", "fork", "pg-fork-hole", "--wait=false", check=False)
            poll("the failed fork's objects gone", lambda: not kubectl(
                "get", "statefulsets,pods", "-l", "walden.dev/instance=pg-fork-hole", "-o", "name").strip())
            return f"segment {hole} moved aside: Failed {cond.get('reason')}: {cond.get('message')[:160]}"
        finally:
            kubectl("patch", "cb", "pg", "--type", "merge", "-p", '{"spec":{"suspend":false}}')

    def upgraded_server_new_archive(self):
        """Issue 17: a protected server refused by its archive as another
        database of an older major version is what pg_upgrade leaves (the new
        cluster has a new system identifier). The old archive is left as it
        is; the operator moves archiving to a new archive below the prefix by
        itself: the pod rolls, WAL and a first base backup go there, and a
        Fork from it holds every committed row. The old archive here is an
        identity document of a PostgreSQL 14 database (this node has one
        PostgreSQL image; the real pg_upgrade runs in pg_versions.rs)."""
        old_dir = "/data/walden-e2e/e2e/upgraded"
        identity = json.dumps({
            "format": 1, "system_identifier": "7000000000000000001", "pg_version": 14,
            "wal_segment_size": 16777216, "created_at": "2026-01-01T00:00:00Z",
            "created_by": "the cluster before pg_upgrade",
        })
        kubectl("exec", "-i", "deploy/s3", "--", "sh", "-c",
                f"mkdir -p {old_dir} && cat > {old_dir}/walden.json", stdin=identity)
        docs = list(yaml.safe_load_all(open(os.path.join(REPO, "e2e/cluster/manifests/infra.yaml")).read()
                                       .replace("${S3_IMAGE}", S3_IMAGE).replace("${POSTGRES_IMAGE}", POSTGRES_IMAGE)))
        sts = next(d for d in docs if d and d["kind"] == "StatefulSet")
        sts["metadata"]["name"] = sts["spec"]["serviceName"] = "pgu"
        sts["spec"]["selector"]["matchLabels"] = sts["spec"]["template"]["metadata"]["labels"] = {"app": "pgu"}
        apply(json.dumps(sts))
        try:
            poll("pgu-0 ready", lambda: pod_ready("pgu-0"))
            psql("pgu-0", LEDGER)
            rows = insert_batch("pgu-0", "upgraded", 1, 200)
            sysid = psql("pgu-0", "SELECT system_identifier FROM pg_control_system()")
            major = psql("pgu-0", "SHOW server_version_num")[:2]
            cb = yaml.safe_load(open(os.path.join(REPO, "e2e/cluster/manifests/continuousbackup.yaml")).read())
            cb["metadata"]["name"] = "pgu"
            cb["spec"]["target"]["statefulSet"] = "pgu"
            cb["spec"]["storage"]["s3"]["prefix"] = "e2e/upgraded"
            del cb["spec"]["schedule"]
            apply(json.dumps(cb))
            new_prefix = f"e2e/upgraded/pg{major}-{sysid}"
            url = f"s3://walden-e2e/{new_prefix}"

            def moved():
                status = get("cb", "pgu").get("status") or {}
                archive = status.get("archive") or {}
                return archive.get("prefix") == new_prefix and status
            status = poll(f"status.archive at {new_prefix}", moved)
            previous = status.get("previousArchives") or []
            if [(a.get("prefix"), a.get("systemIdentifier"), a.get("pgVersion")) for a in previous] != [
                    ("e2e/upgraded", "7000000000000000001", 14)]:
                raise StepFailed(f"previousArchives: {previous}")
            notes = [e.get("message", "") for e in get("events")["items"]
                     if e["reason"] == "NewArchive" and e["involvedObject"].get("name") == "pgu"]
            if not notes or url not in notes[0]:
                raise StepFailed(f"no NewArchive Event naming {url}: {notes}")

            def rolled():
                pod = pod_ready("pgu-0")
                side = pod and next((c for c in pod["spec"]["containers"] if c["name"] == "walden"), None)
                env = {e["name"]: e.get("value") for e in (side or {}).get("env") or []}
                return env.get("WALDEN_STORAGE") == url and pod
            poll(f"pgu-0 rolled with WALDEN_STORAGE={url}", rolled)
            rows |= insert_batch("pgu-0", "after-the-move", 1001, 200)
            wait_archived("pgu-0", archived_through("pgu-0"))
            backup = poll("the new archive's first backup, Ready", lambda: (c := get("cb", "pgu"))
                          and condition(c, "Ready").get("status") == "True"
                          and (c["status"].get("lastBackup") or {}).get("id"))
            kept = kubectl("exec", "deploy/s3", "--", "sh", "-c", f"cat {old_dir}/walden.json; echo; ls {old_dir}")
            lines = kept.splitlines()
            if json.loads(lines[0]) != json.loads(identity) or sorted(lines[1:]) != sorted(
                    ["walden.json", f"pg{major}-{sysid}"]):
                raise StepFailed(f"the old archive changed: {kept}")
            if not ledger_ids("pgu-0") >= rows:
                raise StepFailed("rows lost across the move")
            wait_archived("pgu-0", archived_through("pgu-0"))
            _, fork = self.fork("pgu-fork", None, source="pgu")
            n = self.check_fork_rows(fork, rows)
            return f"{url}: first backup {backup}; old archive untouched; a Fork to the end holds all {n} rows"
        finally:
            if not KEEP:
                kubectl("delete", "fork", "pgu-fork", "--wait=false", check=False)
                kubectl("delete", "cb", "pgu", "--wait=false", check=False)
                poll("the ContinuousBackup pgu gone", lambda: get("cb", "pgu", check=False) is None)
                kubectl("delete", "statefulset", "pgu", "--wait=false", check=False)
                poll("pgu's and its fork's pods gone", lambda: not kubectl(
                    "get", "pods", "-o", "name", check=False).count("pod/pgu"))

    # 6. lifecycle

    def fork_pod_recreated(self):
        before = ledger_ids("pg-fork-0")
        uid = get("pod", "pg-fork-0")["metadata"]["uid"]
        kubectl("delete", "pod", "pg-fork-0", "--wait=false")
        poll("pg-fork-0 recreated and ready", lambda: (p := pod_ready("pg-fork-0")) and p["metadata"]["uid"] != uid)
        poll("the fork Ready again", lambda: get("fork", "pg-fork")["status"].get("phase") == "Ready")
        if ledger_ids("pg-fork-0") != before or -1 not in before:
            raise StepFailed("the fork's rows (with its own write) changed across the recreation")
        return f"fork back Ready with its {len(before)} rows, its own write included"

    def follower_pod_recreated(self):
        before = ledger_ids("pg-replicas-0")
        uid = get("pod", "pg-replicas-0")["metadata"]["uid"]
        kubectl("delete", "pod", "pg-replicas-0", "--wait=false")
        poll("pg-replicas-0 recreated and ready", lambda: (p := pod_ready("pg-replicas-0")) and p["metadata"]["uid"] != uid)
        if ledger_ids("pg-replicas-0") != before or -2 not in before:
            raise StepFailed("the promoted follower's rows changed across the recreation")
        psql("pg-replicas-0", "INSERT INTO ledger VALUES (-3, 'after-recreation')")
        return f"promoted follower back with its {len(before)} rows, writable"

    def operator_upgrade(self):
        new_tag = os.environ.get("WALDEN_E2E_UPGRADE_TAG")
        if not new_tag:
            raise StepFailed("WALDEN_E2E_UPGRADE_TAG (a second image tag) is not set")
        primary = get("pod", "pg-0")["metadata"]["uid"]
        fork_rows, follower_rows = ledger_ids("pg-fork-0"), ledger_ids("pg-replicas-0")
        self.helm.upgrade(self.chart, RELEASE, self.values(new_tag), namespace=OP_NS, wait="watcher", timeout=TIMEOUT)
        image = f"{REGISTRY}/walden:{new_tag}"
        poll("the fork on the new walden image", lambda: any(
            c["image"] == image for c in get("statefulset", "pg-fork")["spec"]["template"]["spec"]["containers"]))
        poll("the fork Ready on the new image", lambda: (p := pod_ready("pg-fork-0")) and any(
            c["image"] == image for c in p["spec"]["containers"]) and get("fork", "pg-fork")["status"]["phase"] == "Ready")
        poll("the follower ready on the new image", lambda: (p := pod_ready("pg-replicas-0")) and any(
            c["image"] == image for c in p["spec"]["containers"]))
        if ledger_ids("pg-fork-0") != fork_rows or ledger_ids("pg-replicas-0") != follower_rows:
            raise StepFailed("a fork or follower lost data in the upgrade")
        rolled = get("pod", "pg-0")["metadata"]["uid"] != primary
        return f"forks and followers rolled to {new_tag} with their data; primary {'rolled' if rolled else 'not rolled'}"

    def delete_continuous_backup(self):
        kubectl("delete", "cb", "pg")

        def unprotected():
            spec = get("statefulset", "pg")["spec"]["template"]["spec"]
            names = [c["name"] for c in spec["containers"]] + [c["name"] for c in spec.get("initContainers") or []]
            return not any(n.startswith("walden") for n in names)
        poll("the injection removed from the StatefulSet", unprotected)
        poll("pg-0 rolled without walden", lambda: (p := pod_ready("pg-0")) and all(
            c["name"] == "postgres" for c in p["spec"]["containers"]))
        got = ledger_ids("pg-0")
        if not got >= self.expected:
            raise StepFailed("rows lost when the protection was removed")
        self.expected |= insert_batch("pg-0", "unprotected", 90001, 10)
        return f"injection removed, pg-0 serves all {len(got)} rows and takes writes"

    # cleanup

    def cleanup(self):
        if KEEP:
            print(f"kept: namespaces {NS} and {OP_NS} (WALDEN_E2E_KEEP=1)", flush=True)
            return
        # Walden's resources first, while the operator still runs: their
        # finalizers (the injection's removal) need it.
        kubectl("delete", "fork,follower,cb", "--all", "--wait=false", check=False)
        poll(f"Walden's resources in {NS} gone", lambda: not kubectl("get", "fork,follower,cb", "-o", "name", check=False).strip()
             if get("namespace", NS, ns=None, check=False) else True)
        kubectl("delete", "namespace", NS, "--wait=false", ns=None, check=False)
        poll(f"namespace {NS} gone", lambda: get("namespace", NS, ns=None, check=False) is None, timeout=max(TIMEOUT, 300))
        self.helm.uninstall(RELEASE, ignore_not_found=True, wait="watcher", timeout=TIMEOUT)
        if self.crds_created:
            for crd in ("continuousbackups", "forks", "followers"):
                kubectl("delete", "crd", f"{crd}.walden.dev", ns=None, check=False)
        kubectl("delete", "namespace", OP_NS, "--wait=false", ns=None, check=False)
        poll(f"namespace {OP_NS} gone", lambda: get("namespace", OP_NS, ns=None, check=False) is None, timeout=max(TIMEOUT, 300))
        if getattr(self, "tmp_chart", None):
            shutil.rmtree(self.tmp_chart, ignore_errors=True)

    def run(self):
        steps = [
            ("helm install charts/walden (helm-python-sdk)", self.install),
            ("operator Ready, Lease held, /metrics served", self.operator_running),
            ("S3 server and PostgreSQL StatefulSet", self.infra),
            ("ContinuousBackup: pod rolled, walden installed, sidecar as built", self.protect),
            ("archiving through the thin client", self.archiving),
            ("scheduled base backup, status columns, conditions, Events", self.base_backup),
            ("Fork at a recorded time: exact rows, writable", self.fork_at_time),
            ("Fork at an LSN: exact rows", self.fork_at_lsn),
            ("Fork at the latest point: every row", self.fork_latest),
            ("restore proof: pg_amcheck and a ledger check on a restored archive, Recoverable", self.restore_proof),
            ("Follower: restores, streams from the primary, lag in status", self.follower),
            ("Follower promoted: writable", self.promote),
            ("fault: primary pod deleted mid-load, no committed row lost", self.primary_pod_deleted),
            ("fault: operator restarted mid-backup", self.operator_restart_mid_backup),
            ("fault: sidecar killed, segments kept and archived later", self.sidecar_killed),
            ("fault: Fork with a bad target Failed, nothing left running", self.bad_fork),
            ("fault: Fork past a hole in the archive Failed, naming it", self.fork_past_a_hole),
            ("pg_upgrade: a newer server's archive moves by itself, Fork from it", self.upgraded_server_new_archive),
            ("lifecycle: Fork pod deleted, back Ready with its writes", self.fork_pod_recreated),
            ("lifecycle: promoted Follower pod deleted, back with its writes", self.follower_pod_recreated),
            ("lifecycle: operator upgrade, forks and followers keep data", self.operator_upgrade),
            ("fault: ContinuousBackup deleted, injection removed, pg serves", self.delete_continuous_backup),
        ]
        only = os.environ.get("WALDEN_E2E_STEPS")
        started = time.monotonic()
        # The first FOUNDATION steps build the protected primary every later
        # step uses: a failure there stops the run; later steps each stand on
        # their own, so one failing does not hide the others.
        for i, (name, fn) in enumerate(steps):
            if only and not re.search(only, name):
                continue
            if not self.step(name, fn) and i < FOUNDATION:
                print(f"     ({len(steps) - i - 1} later steps not run: they build on this one)", flush=True)
                break
        self.step("cleanup: everything the suite created removed", self.cleanup)
        print(f"cluster: {self.passed} passed, {self.failed} failed ({time.monotonic() - started:.0f}s)", flush=True)
        return 0 if self.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(Suite().run())
