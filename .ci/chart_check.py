"""Checks of charts/walden, run by .ci/chart.sh (see there for the tools).

Every check is a function; each prints PASS or FAIL with the reason, and the
last line is "chart: N passed, M failed". Exit status 1 on any failure.
"""

import copy
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "walden"
RBAC = ROOT / "operator" / "deploy" / "rbac.yaml"
CRDS = ROOT / "crds" / "walden.dev.yaml"
# Without CEL rules, for clusters before 1.25 (crdgen --legacy).
CRDS_LEGACY = ROOT / "crds" / "walden.dev.legacy.yaml"
CRD_NAMES = ["continuousbackups.walden.dev", "followers.walden.dev", "forks.walden.dev"]
# Schemas manifests are validated against: the oldest with CEL rules and the
# version the operator is built against (k8s-openapi feature v1_33).
# kubernetes-validate has no schemas before 1.25; the chart's own floor is
# Chart.yaml's kubeVersion (1.20), checked by rendering and linting there.
KUBE_VERSIONS = ["1.25.0", "1.33.0"]
# Clusters that must get the legacy CRDs, and ones that must get CEL rules.
OLD_CLUSTERS = ["1.20.2", "1.24.17"]
NEW_CLUSTERS = ["1.25.0", "1.33.0"]
NAMESPACE = "walden-system"
RELEASE = "walden"

# Non-default values: every optional branch of the templates switched on.
CUSTOM = {
    "replicaCount": 2,
    "image": {
        "repository": "registry.example/walden-operator",
        "digest": "sha256:" + "a" * 64,
        "pullPolicy": "Always",
    },
    "walden": {"image": {"repository": "registry.example/walden", "tag": "9.9.9"}},
    "imagePullSecrets": [{"name": "regcred"}],
    "fullnameOverride": "pitr",
    "serviceAccount": {"name": "pitr-sa", "annotations": {"team": "db"}},
    "leaderElection": {"leaseName": "pitr-lease", "leaseDurationSeconds": 30},
    "daemonTimeoutSeconds": 5,
    "logging": {"format": "text", "level": "debug"},
    "probePort": 9090,
    "metrics": {
        "service": {"port": 9090, "annotations": {"prometheus.io/scrape": "true"}},
        "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "kps"}},
    },
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}},
    "podAnnotations": {"a": "b"},
    "podLabels": {"tier": "control"},
    "priorityClassName": "system-cluster-critical",
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "walden"}},
                    },
                }
            ]
        }
    },
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
}

results = []


def check(name):
    def wrap(fn):
        try:
            fn()
            results.append((name, None))
            print(f"PASS {name}")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            detail = str(e) or traceback.format_exc()
            results.append((name, detail))
            print(f"FAIL {name}: {detail}")
        return fn

    return wrap


def render(values=None, kube_version=None):
    """Rendered documents (parsed), in template order, empty ones dropped.

    kube_version sets .Capabilities.KubeVersion; Chart.render has no argument
    for it, so that case calls the pinned SDK's native render with the option
    its Go side reads ("kube_version").
    """
    with helm.Chart.load(str(CHART)) as chart:
        if kube_version is None:
            manifests = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
        else:
            opts = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version}
            manifests = json.loads(
                helm._native.call_string("helm_render", chart._raw(), json.dumps(values or {}), json.dumps(opts))
            )
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs, manifests


def notes(manifests):
    return next(v for k, v in manifests.items() if k.endswith("NOTES.txt"))


def lint(values, kube_version=None):
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE, kube_version=kube_version)
    bad = [m for m in report.get("messages") or [] if m.get("severity", 0) >= 2]
    if report.get("errors") or bad:
        raise AssertionError(json.dumps({"errors": report.get("errors"), "messages": bad}, indent=1))
    if report.get("total_charts_linted") != 1:
        raise AssertionError(f"linted {report.get('total_charts_linted')} charts, expected 1")


def validate(docs):
    """Every manifest against the Kubernetes schemas (strict: unknown fields fail)."""
    problems = []
    for path, doc in docs:
        if doc.get("kind") == "ServiceMonitor":
            problems += servicemonitor_problems(doc)
            continue
        for v in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, v, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.absolute_path)
                problems.append(f"{path} {doc.get('kind')}/{doc['metadata'].get('name')} on {v}: {e.message} at /{where}")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{path} {doc.get('kind')}/{doc['metadata'].get('name')} on {v}: {e}")
    if problems:
        raise AssertionError("\n".join(problems))


def servicemonitor_problems(doc):
    """No offline schema for the Prometheus Operator's CRD: its required shape by hand."""
    out = []
    if doc.get("apiVersion") != "monitoring.coreos.com/v1":
        out.append("ServiceMonitor apiVersion")
    spec = doc.get("spec") or {}
    if not (spec.get("selector") or {}).get("matchLabels"):
        out.append("ServiceMonitor without selector.matchLabels")
    for ep in spec.get("endpoints") or [None]:
        if not ep or not ep.get("port"):
            out.append("ServiceMonitor endpoint without a named port")
    return out


def by_kind(docs, kind):
    return [d for _, d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind}, found {len(found)}")
    return found[0]


def normalise_rules(rules):
    """Order-insensitive form of a rule list."""
    return sorted(
        json.dumps({k: sorted(v) if isinstance(v, list) else v for k, v in r.items()}, sort_keys=True)
        for r in rules
    )


def rbac_source():
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    return {d["kind"]: d for d in docs}


def check_rbac_equals_source(docs, sa_name, fullname):
    src = rbac_source()
    cr, role = one(docs, "ClusterRole"), one(docs, "Role")
    if normalise_rules(cr["rules"]) != normalise_rules(src["ClusterRole"]["rules"]):
        raise AssertionError(
            "ClusterRole rules differ from operator/deploy/rbac.yaml:\n"
            f"chart:  {normalise_rules(cr['rules'])}\nsource: {normalise_rules(src['ClusterRole']['rules'])}"
        )
    if normalise_rules(role["rules"]) != normalise_rules(src["Role"]["rules"]):
        raise AssertionError("leader-election Role rules differ from operator/deploy/rbac.yaml")
    if role["metadata"]["namespace"] != NAMESPACE:
        raise AssertionError("the leader-election Role must live in the release namespace")
    for kind, role_kind, role_name in [
        ("ClusterRoleBinding", "ClusterRole", cr["metadata"]["name"]),
        ("RoleBinding", "Role", role["metadata"]["name"]),
    ]:
        b = one(docs, kind)
        if b["roleRef"] != {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role_name}:
            raise AssertionError(f"{kind} roleRef {b['roleRef']}")
        if b["subjects"] != [{"kind": "ServiceAccount", "name": sa_name, "namespace": NAMESPACE}]:
            raise AssertionError(f"{kind} subjects {b['subjects']}")
    dep = one(docs, "Deployment")
    if dep["spec"]["template"]["spec"]["serviceAccountName"] != sa_name:
        raise AssertionError("the Deployment does not run as the bound ServiceAccount")
    kinds_src = sorted(src)
    kinds_chart = sorted({d["kind"] for _, d in docs if d["kind"] in src})
    if kinds_src != kinds_chart:
        raise AssertionError(f"RBAC kinds: chart {kinds_chart}, source {kinds_src}")
    for _, d in docs:
        for r in d.get("rules") or []:
            # The one delete: the operator's own restore proof pods.
            deletes = "delete" in r.get("verbs", []) and r.get("resources") != ["pods"]
            if deletes or "*" in r.get("verbs", []) or "*" in r.get("resources", []):
                raise AssertionError(f"over-broad rule in {d['kind']}: {r}")
    if not fullname or cr["metadata"]["name"] != fullname:
        raise AssertionError(f"ClusterRole name {cr['metadata']['name']}, expected {fullname}")


def container(docs):
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def check_operator_accepts(c):
    """The operator binary parses the rendered args and env (clap stops at --help)."""
    binary = os.environ.get("WALDEN_OPERATOR_BIN", "")
    if not Path(binary).is_file():
        msg = f"operator binary {binary!r} not built (cargo build -p walden-operator)"
        if os.environ.get("CI") == "true":
            raise AssertionError(msg)
        print(f"SKIP  flags accepted by walden-operator: {msg}")
        return False
    env = {k: v for k, v in env_of(c).items() if isinstance(v, str)}
    env["PATH"] = os.environ.get("PATH", "")
    # The image's entrypoint is the binary, so args are its whole command line.
    proc = subprocess.run([binary, *c["args"], "--help"], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"walden-operator {' '.join(c['args'])}: {proc.stderr.strip()}")
    return True


# ---------------------------------------------------------------- checks


@check("helm lint --strict (default values)")
def _():
    lint(None)


@check("helm lint --strict (non-default values)")
def _():
    lint(CUSTOM)


@check("helm lint --strict on the oldest supported cluster (1.20)")
def _():
    lint(None, kube_version=OLD_CLUSTERS[0])


@check("default render: every manifest valid (kubernetes-validate --strict)")
def _():
    docs, _ = render()
    kinds = sorted(d["kind"] for _, d in docs)
    want = sorted(
        ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
        + ["CustomResourceDefinition"] * 3
    )
    if kinds != want:
        raise AssertionError(f"kinds {kinds}, expected {want}")
    validate(docs)


@check("non-default render: every manifest valid, ServiceMonitor included")
def _():
    docs, _ = render(CUSTOM)
    one(docs, "ServiceMonitor")
    validate(docs)


def source_crds(path):
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def without_cel(value):
    if isinstance(value, dict):
        return {k: without_cel(v) for k, v in value.items() if k != "x-kubernetes-validations"}
    if isinstance(value, list):
        return [without_cel(v) for v in value]
    return value


def rendered_crds(docs):
    """Rendered CRDs by name, with what the template adds checked and removed."""
    out = {}
    for _, d in docs:
        if d.get("kind") != "CustomResourceDefinition":
            continue
        d = copy.deepcopy(d)
        meta = d["metadata"]
        if meta.pop("annotations", None) != {"helm.sh/resource-policy": "keep"}:
            raise AssertionError(f"{meta['name']}: needs exactly helm.sh/resource-policy: keep")
        labels = meta.pop("labels", {})
        if labels.get("app.kubernetes.io/managed-by") != "Helm":
            raise AssertionError(f"{meta['name']}: labels {labels}")
        out[meta["name"]] = d
    return out


@check("chart CRD files byte-identical to crds/ (full and legacy), legacy = full without CEL")
def _():
    files = sorted(p.name for p in (CHART / "files" / "crds").iterdir())
    if files != ["walden.dev.legacy.yaml", "walden.dev.yaml"]:
        raise AssertionError(f"charts/walden/files/crds holds {files}")
    if (CHART / "crds").exists():
        raise AssertionError("charts/walden/crds/ must not exist: Helm would install it before the kubeVersion check")
    for src in [CRDS, CRDS_LEGACY]:
        if (CHART / "files" / "crds" / src.name).read_bytes() != src.read_bytes():
            raise AssertionError(f"charts/walden/files/crds/{src.name} differs: cp crds/*.yaml charts/walden/files/crds/")
    full, legacy = source_crds(CRDS), source_crds(CRDS_LEGACY)
    if sorted(full) != CRD_NAMES or sorted(legacy) != CRD_NAMES:
        raise AssertionError(f"CRDs {sorted(full)} / {sorted(legacy)}")
    if "x-kubernetes-validations" not in CRDS.read_text():
        raise AssertionError("crds/walden.dev.yaml lost its CEL rules")
    if "x-kubernetes-validations" in CRDS_LEGACY.read_text():
        raise AssertionError("crds/walden.dev.legacy.yaml has CEL rules")
    if {k: without_cel(v) for k, v in full.items()} != legacy:
        raise AssertionError("the legacy CRDs differ from the full ones by more than their CEL rules")
    validate([("crds", d) for d in full.values()] + [("crds-legacy", d) for d in legacy.values()])


@check("rendered CRDs: CEL variant from 1.25, legacy before, none with crds.install=false")
def _():
    for v in NEW_CLUSTERS:
        docs, _ = render(kube_version=v)
        if rendered_crds(docs) != source_crds(CRDS):
            raise AssertionError(f"on {v} the rendered CRDs are not crds/walden.dev.yaml")
    for v in OLD_CLUSTERS:
        docs, _ = render(kube_version=v)
        if rendered_crds(docs) != source_crds(CRDS_LEGACY):
            raise AssertionError(f"on {v} the rendered CRDs are not crds/walden.dev.legacy.yaml")
    docs, _ = render({"crds": {"install": False}})
    if by_kind(docs, "CustomResourceDefinition"):
        raise AssertionError("crds.install=false still renders CRDs")
    if yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] != ">=1.20.0-0":
        raise AssertionError("Chart.yaml kubeVersion must admit 1.20 (the legacy CRDs' floor)")


@check("rendered RBAC == operator/deploy/rbac.yaml (default values)")
def _():
    docs, _ = render()
    check_rbac_equals_source(docs, "walden-operator", "walden-operator")


@check("rendered RBAC == operator/deploy/rbac.yaml (custom names)")
def _():
    docs, _ = render(CUSTOM)
    check_rbac_equals_source(docs, "pitr-sa", "pitr")


@check("rbac.create=false and serviceAccount.create=false render no RBAC")
def _():
    docs, manifests = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    kinds = sorted(d["kind"] for _, d in docs if d["kind"] != "CustomResourceDefinition")
    if kinds != ["Deployment", "Service"]:
        raise AssertionError(f"kinds {kinds}")
    if container(docs) and one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] != "mine":
        raise AssertionError("serviceAccountName")
    if "operator/deploy/rbac.yaml" not in notes(manifests):
        raise AssertionError("NOTES.txt must say which rules to bind")


@check("Deployment: images, leader election, probes, security (default values)")
def _():
    docs, manifests = render()
    dep = one(docs, "Deployment")
    c = container(docs)
    env = env_of(c)
    app = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert c["image"] == f"ghcr.io/walden-dev/walden-operator:{app}", c["image"]
    assert env["WALDEN_IMAGE"] == f"ghcr.io/walden-dev/walden:{app}", env["WALDEN_IMAGE"]
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, env
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}, env
    assert c["args"][0] == "run" and "--lease-name=walden-operator" in c["args"], c["args"]
    assert "--probe-addr=0.0.0.0:8080" in c["args"], c["args"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    sc, psc = c["securityContext"], dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["resources"]["limits"]["memory"] == "256Mi"
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    svc = one(docs, "Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http-metrics"
    text = notes(manifests)
    assert "ContinuousBackup" in text and f"ghcr.io/walden-dev/walden:{app}" in text, text
    check_operator_accepts(c)


@check("Deployment: non-default values reach the operator's flags and env")
def _():
    docs, _ = render(CUSTOM)
    dep = one(docs, "Deployment")
    c = container(docs)
    env = env_of(c)
    assert dep["spec"]["replicas"] == 2
    assert c["image"] == "registry.example/walden-operator@sha256:" + "a" * 64, c["image"]
    assert env["WALDEN_IMAGE"] == "registry.example/walden:9.9.9", env
    assert env["RUST_LOG"] == "debug" and env["EXTRA"] == "1", env
    for flag in [
        "--lease-name=pitr-lease",
        "--lease-seconds=30",
        "--daemon-timeout=5",
        "--log-format=text",
        "--probe-addr=0.0.0.0:9090",
    ]:
        assert flag in c["args"], (flag, c["args"])
    assert c["ports"][0]["containerPort"] == 9090
    pod = dep["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "dedicated" and pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert dep["spec"]["template"]["metadata"]["labels"]["tier"] == "control"
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kps"
    assert sm["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert one(docs, "Service")["spec"]["ports"][0]["port"] == 9090
    check_operator_accepts(c)


@check("values.schema.json rejects bad values; templates reject bad combinations")
def _():
    bad = [
        {"logging": {"format": "xml"}},
        {"replicaCount": -1},
        {"probePort": 70000},
        {"typoKey": 1},
        {"image": {"repository": "x", "digest": "latest"}},
        {"leaderElection": {"leaseDurationSeconds": 1}},
        {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}},
        {"serviceAccount": {"create": False, "name": ""}},
    ]
    accepted = []
    for values in bad:
        try:
            render(values)
            accepted.append(values)
        except helm.HelmError:
            pass
    if accepted:
        raise AssertionError(f"accepted bad values: {accepted}")
    # And the defaults themselves satisfy the schema.
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(copy.deepcopy(chart.values))


@check("examples/*.yaml are the kinds the chart's CRDs define")
def _():
    crds = [d for d in yaml.safe_load_all(CRDS.read_text()) if d]
    kinds = {(d["spec"]["group"], d["spec"]["names"]["kind"]) for d in crds}
    versions = {v["name"] for d in crds for v in d["spec"]["versions"] if v.get("served")}
    for f in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            group, version = doc["apiVersion"].split("/")
            if (group, doc["kind"]) not in kinds or version not in versions:
                raise AssertionError(f"{f.name}: {doc['apiVersion']} {doc['kind']} is not served by the chart's CRDs")


failed = [n for n, e in results if e]
print(f"chart: {len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
