"""The cluster install (packaging/kubernetes/) and the Grafana dashboard, checked offline.

- Core objects (Namespace, ServiceAccount, ConfigMap, DaemonSet, Service) are validated,
  strictly (unknown fields are errors), against the Kubernetes OpenAPI JSON schemas that
  the ``kubernetes-validate`` package bundles (no cluster, no network), for the oldest
  Kubernetes the manifests claim (1.30: securityContext.appArmorProfile) and the newest
  the package knows.
- ServiceMonitor and PrometheusRule are the Prometheus Operator's CRDs, whose schemas that
  package does not carry: they are checked structurally here (apiVersion, kind, required
  fields, the Service they select) and the PrometheusRule must be exactly what
  gen_prometheusrule.py makes from packaging/prometheus/sockguard.rules.yml (whose rules
  promtool tests in test_packaging.py).
- The wiring is checked with sockguard's own code: the ConfigMap's TOML through the config
  parser, the container's command through the CLI parser, the capabilities against the
  systemd unit's CapabilityBoundingSet, the dashboard's metric names against a registry
  of sockguard/service/metrics.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "packaging" / "kubernetes"
DASHBOARD = ROOT / "packaging" / "grafana" / "sockguard-dashboard.json"
CRD_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1",
             "PrometheusRule": "monitoring.coreos.com/v1"}
#: Oldest Kubernetes the manifests are for (appArmorProfile is a field since 1.30), newest
#: whose schemas the installed kubernetes-validate bundles.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
NAMESPACE = "sockguard"


def _docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                yield path, doc


DOCS = list(_docs())


def _one(kind: str) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def test_the_expected_objects_are_there() -> None:
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == sorted(["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service",
                            "ServiceMonitor", "PrometheusRule"])
    # `kubectl apply -f packaging/kubernetes/` applies files in name order, not recursing:
    # the namespace first; the CRD objects live in a subfolder applied only with the operator.
    top = sorted(p.name for p in K8S.glob("*.yaml"))
    assert top[0] == "00-namespace.yaml"
    for path, doc in DOCS:
        assert (doc["kind"] in CRD_KINDS) == (path.parent.name == "prometheus-operator"), path


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "path,doc", [(p, d) for p, d in DOCS if d["kind"] not in CRD_KINDS],
    ids=lambda v: v.name if isinstance(v, Path) else "")
def test_core_manifest_validates_against_kubernetes_schema(
        path: Path, doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{path.name}: {doc['kind']} invalid for Kubernetes {version}: {exc}")


def test_crds_are_not_in_the_bundled_schemas() -> None:
    """So they must be (and are, below) checked structurally; fails when that changes."""
    for kind in CRD_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(_one(kind), K8S_VERSIONS[-1], strict=True)


def test_namespaced_objects_share_one_namespace() -> None:
    for path, doc in DOCS:
        meta = doc["metadata"]
        assert meta.get("labels", {}).get("app.kubernetes.io/name") == "sockguard", path
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
            # hostPID, hostNetwork, hostPath and added capabilities: only "privileged" admits them.
            assert meta["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
        else:
            assert meta["namespace"] == NAMESPACE, path


# -- the DaemonSet -------------------------------------------------------------------------


def _unit_capabilities() -> set[str]:
    text = (ROOT / "systemd" / "sockguard.service").read_text(encoding="utf-8")
    m = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.MULTILINE)
    assert m, "no CapabilityBoundingSet in the unit"
    return {c.removeprefix("CAP_") for c in m.group(1).split()}


def test_daemonset_privileges_are_the_units() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == _one("ServiceAccount")["metadata"]["name"]
    sc = _container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsUser"] == 0
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == _unit_capabilities()
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


def test_daemonset_host_mounts_are_read_only_and_justified() -> None:
    pod = _one("DaemonSet")["spec"]["template"]["spec"]
    host = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert sorted(host.values()) == ["/run/netns", "/sys/fs/bpf", "/sys/fs/cgroup", "/var/log/pods"]
    mounts = {m["name"]: m for m in _container()["volumeMounts"]}
    text = (K8S / "30-daemonset.yaml").read_text(encoding="utf-8")
    for name, path in host.items():
        assert mounts[name]["mountPath"] == path
        assert mounts[name]["readOnly"] is True, name
        # every host mount carries a comment right above it saying why
        before = text[:text.index(f"- name: {name}\n              mountPath: {path}")]
        assert before.rstrip().splitlines()[-1].strip().startswith("#"), name


def test_daemonset_resources() -> None:
    res = _container()["resources"]
    assert res["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert res["limits"] == {"memory": "256Mi"}  # no CPU limit: no throttled audits


def test_command_config_and_probes_agree(tmp_path: Path) -> None:
    """The command parses as `sockguard run`; the config it names is the ConfigMap's; the
    endpoint it binds is where the probes and the Service look."""
    from sockguard.cli.commands import build_parser
    from sockguard.service.config import load_config, overrides_from_args

    c = _container()
    assert c["image"] == "sockguard:0.1.0"
    assert c["command"][0] == "sockguard"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    # the kubelet expands $(NODE_IP) in command; a hostNetwork pod's IP is the node's,
    # which is where httpGet probes without a host go.
    node_ip = "10.0.0.7"
    argv = [a.replace("$(NODE_IP)", node_ip) for a in c["command"][1:]]
    args = build_parser().parse_args(argv)
    assert args.command == "run"

    cm = _one("ConfigMap")
    (key,) = cm["data"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert args.config == f"{mount['mountPath']}/{key}"
    config_volume = next(v for v in _one("DaemonSet")["spec"]["template"]["spec"]["volumes"]
                         if v["name"] == "config")
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]

    # what the daemon gets: the ConfigMap's text at that path, then the flags
    mounted = tmp_path / key
    mounted.write_text(cm["data"][key], encoding="utf-8")
    cfg = load_config(str(mounted), overrides_from_args(args))
    assert cfg.metrics_enabled
    assert cfg.metrics_address == node_ip
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == cfg.metrics_port
    # liveness asks whether audits make progress (Daemon.health), the others whether it serves
    paths = {"startupProbe": "/metrics", "readinessProbe": "/metrics",
             "livenessProbe": "/healthz"}
    for probe, path in paths.items():
        get = c[probe]["httpGet"]
        assert get["path"] == path and get["port"] == "metrics", probe
        assert "host" not in get, f"{probe}: must go to the pod (= node) IP the daemon binds"
    # a hung audit answers 503 for liveness_timeout, then the probe fails failureThreshold
    # times: the restart comes within what the unit's WatchdogSec=60s allows, give or take
    live = c["livenessProbe"]
    restart_after = cfg.liveness_timeout + live["periodSeconds"] * live["failureThreshold"]
    assert restart_after <= 120, restart_after


def test_configmap_has_the_packaged_configs_keys() -> None:
    from sockguard.service.config import parse_toml

    (text,) = _one("ConfigMap")["data"].values()
    ours = tomllib.loads(text)
    packaged = tomllib.loads((ROOT / "packaging" / "sockguard.toml").read_text(encoding="utf-8"))

    def keys(doc: dict[str, Any]) -> set[str]:
        return {f"{s}.{k}" for s, body in doc.items() for k in body}

    assert keys(ours) == keys(packaged)
    differ = {k for k in keys(ours)
              if ours[k.split(".")[0]][k.split(".")[1]]
              != packaged[k.split(".")[0]][k.split(".")[1]]}
    assert differ == {"log.target"}  # stderr: no journald in the container
    parse_toml(text, "ConfigMap sockguard")  # sockguard accepts it (types, ranges)


def test_service_selects_the_pods_metrics_port() -> None:
    svc = _one("Service")
    pod_labels = _one("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["name"] == "metrics" and port["targetPort"] == "metrics"
    assert port["port"] == next(p["containerPort"] for p in _container()["ports"]
                                if p["name"] == "metrics")
    # the scrape job is named after the Service; the alert rules expect "sockguard"
    rules = (ROOT / "packaging" / "prometheus" / "sockguard.rules.yml").read_text()
    assert f'job="{svc["metadata"]["name"]}"' in rules


# -- the Prometheus Operator objects (CRDs: checked structurally) ----------------------------


def test_servicemonitor_structure() -> None:
    sm = _one("ServiceMonitor")
    assert sm["apiVersion"] == CRD_KINDS["ServiceMonitor"]
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert sm["metadata"]["name"]
    spec = sm["spec"]
    svc = _one("Service")
    assert spec["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert spec["namespaceSelector"]["matchNames"] == [svc["metadata"]["namespace"]]
    assert spec["endpoints"], "endpoints is required"
    allowed = {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings",
               "metricRelabelings", "honorLabels"}
    for ep in spec["endpoints"]:
        assert set(ep) <= allowed
        assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert ep["path"] == "/metrics" and ep["scheme"] == "http"
        for rl in ep.get("relabelings", []):
            assert set(rl) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement",
                               "separator", "modulus"}
            assert rl.get("action", "replace") in {"replace", "keep", "drop", "labelmap"}


def test_prometheusrule_structure() -> None:
    pr = _one("PrometheusRule")
    assert pr["apiVersion"] == CRD_KINDS["PrometheusRule"]
    assert set(pr) == {"apiVersion", "kind", "metadata", "spec"}
    groups = pr["spec"]["groups"]
    assert groups
    for g in groups:
        assert set(g) <= {"name", "interval", "rules", "limit", "partial_response_strategy"}
        assert g["name"] and g["rules"]
        for r in g["rules"]:
            assert set(r) <= {"alert", "record", "expr", "for", "keep_firing_for", "labels",
                              "annotations"}
            assert ("alert" in r) != ("record" in r)
            assert isinstance(r["expr"], str) and r["expr"]
            assert all(isinstance(v, str) for v in r.get("labels", {}).values())
            assert all(isinstance(v, str) for v in r.get("annotations", {}).values())


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_prometheusrule",
                                                  K8S / "gen_prometheusrule.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prometheusrule_is_what_the_generator_makes() -> None:
    gen = _generator()
    committed = (K8S / "prometheus-operator" / "prometheusrule.yaml").read_text(encoding="utf-8")
    assert committed == gen.render(), (
        "prometheusrule.yaml is stale: run packaging/kubernetes/gen_prometheusrule.py")
    source = yaml.safe_load((ROOT / "packaging" / "prometheus" / "sockguard.rules.yml").read_text())
    assert yaml.safe_load(committed)["spec"]["groups"] == source["groups"]


def test_generator_follows_its_source(tmp_path: Path) -> None:
    """A changed rules file gives a different PrometheusRule (the check above can fail)."""
    gen = _generator()
    source = ROOT / "packaging" / "prometheus" / "sockguard.rules.yml"
    changed = tmp_path / "rules.yml"
    changed.write_text(source.read_text().replace("for: 15m", "for: 16m", 1))
    assert gen.render(changed) != gen.render(source)
    assert "for: 16m" in gen.render(changed)


# -- the Grafana dashboard -------------------------------------------------------------------


def _exported_names() -> set[str]:
    """Every sample name a daemon's registry exports (a snapshot taken, so all gauges show)."""
    from sockguard.service.metrics import MapSample, Metrics, Snapshot

    m = Metrics()
    m._snapshot.snapshot = Snapshot(maps=(MapSample(1, "cilium_sock_ops", 1, {}, 0, 0),),
                                    taken=True)
    return {s.name for fam in m.registry.collect() for s in fam.samples}


def test_dashboard_parses_with_the_fields_grafana_needs() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert p["type"] in {"timeseries", "stat", "table", "gauge"}, p["title"]
        assert p["title"]
        gp = p["gridPos"]
        assert all(isinstance(gp[k], int) for k in ("h", "w", "x", "y"))
        assert gp["w"] > 0 and gp["x"] + gp["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["targets"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        assert all(t["expr"] for t in p["targets"])


def test_dashboard_queries_only_metrics_the_daemon_exports() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    queried = {n for e in exprs for n in re.findall(r"\bsockguard_[a-z0-9_]+", e)}
    exported = _exported_names()
    assert queried, "no sockguard metric queried"
    missing = queried - exported
    assert not missing, f"not exported by sockguard/service/metrics.py: {missing}"
    # the panels: findings by kind, deletions, audit duration, tracer detections
    for needed in ("sockguard_findings", "sockguard_map_entries", "sockguard_deletions_total",
                   "sockguard_audit_duration_seconds_bucket", "sockguard_detection_active"):
        assert needed in queried, needed
    for kind in ("stale", "shadowing", "recvpath"):
        assert any(f'kind="{kind}"' in e for e in exprs), kind


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables replaced) as a recording rule."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus; make test-deps)")
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    grafana_vars = {"$__rate_interval": "1m", "$instance": ".*"}
    rules = []
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = t["expr"]
            for var, value in grafana_vars.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unknown variable in {t['expr']}"
            rules.append({"record": f"dashboard:panel{p['id']}:{t['refId']}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
