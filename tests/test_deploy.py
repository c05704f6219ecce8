"""deploy/kubernetes.yaml, offline: every object against Kubernetes' own schemas (kubernetes-validate,
strict: an unknown field fails), the ScaledObject against the fields KEDA's Prometheus scaler takes, and
what ties the objects to each other and to the package (ports, probes, metric names) checked; the
health probe's command run against the session's real server."""

import copy
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, free_port
from llama_pkg import metrics

KUBERNETES = "1.37.0"
DOCS = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
BY_KIND = {d["kind"]: d for d in DOCS}

# keda.sh/v1alpha1 ScaledObject, the fields this example may use (KEDA's documented spec, closed to typos)
INT = {"type": "integer", "minimum": 0}
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": INT, "maxReplicaCount": INT, "pollingInterval": INT, "cooldownPeriod": INT,
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"const": "prometheus"},
                        "metadata": {"type": "object", "required": ["serverAddress", "query", "threshold"],
                                     "additionalProperties": {"type": "string"},
                                     "properties": {"threshold": {"type": "string", "pattern": r"^[0-9.]+$"}}}}}},
            }},
    }}


@pytest.mark.parametrize("doc", [d for d in DOCS if d["kind"] != "ScaledObject"], ids=lambda d: d["kind"])
def test_each_kubernetes_object_is_valid_strictly(doc):
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_the_validators_refuse_a_typo():
    """The check can fail: a misspelt field is refused by both validators."""
    deployment = copy.deepcopy(BY_KIND["Deployment"])
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    scaled = copy.deepcopy(BY_KIND["ScaledObject"])
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, SCALED_OBJECT)


def containers():
    return {c["name"]: c for c in BY_KIND["Deployment"]["spec"]["template"]["spec"]["containers"]}


def ports(container):
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_the_pod_serves_cog_and_the_front_on_one_gpu():
    cog, front = containers()["cog"], containers()["openai"]
    assert cog["resources"]["limits"]["nvidia.com/gpu"] == 1 and "nvidia.com/gpu" not in front["resources"].get(
        "limits", {})
    env = {e["name"]: e["value"] for e in cog["env"]}
    assert int(env["LLAMA_PKG_METRICS_PORT"]) == ports(cog)["metrics"]
    annotations = BY_KIND["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports(cog)["metrics"]
    command = front["command"]
    assert command[:4] == ["python", "-m", "llama_pkg", "openai"]
    assert command[command.index("--upstream") + 1] == f"http://127.0.0.1:{ports(cog)['cog']}"
    assert int(command[command.index("--port") + 1]) == ports(front)["openai"]
    assert command[command.index("--host") + 1] == "0.0.0.0"  # reachable from the Service
    service = BY_KIND["Service"]
    assert service["spec"]["selector"].items() <= BY_KIND["Deployment"]["spec"]["template"]["metadata"][
        "labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"openai", "cog"}


def test_the_scaled_object_scales_the_deployment_on_the_package_metrics():
    scaled = BY_KIND["ScaledObject"]
    jsonschema.validate(scaled, SCALED_OBJECT)
    assert scaled["spec"]["scaleTargetRef"]["name"] == BY_KIND["Deployment"]["metadata"]["name"]
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    served = {metrics.PREFIX + name for name in ("num_requests_running", "num_requests_waiting")}
    assert set(re.findall(r"llama_pkg:\w+", query)) == served


def probe(kind, port=5000):
    """The probe's command, run by this interpreter (the image's `python`), against another port."""
    command = containers()["cog"][kind]["exec"]["command"]
    assert command[0] == "python"
    return [sys.executable] + [part.replace("127.0.0.1:5000", f"127.0.0.1:{port}") for part in command[1:]]


@pytest.mark.slow
def test_the_probes_read_cogs_health_check(server):
    """The probes' own commands against the real server: ready and alive while it is READY; a server that
    cannot be reached is neither ready nor (once started) alive."""
    assert probe("startupProbe") == probe("readinessProbe")
    port = server.url.rsplit(":", 1)[1]
    for kind in ("readinessProbe", "livenessProbe"):
        assert subprocess.run(probe(kind, port), capture_output=True, timeout=30).returncode == 0, kind
        assert subprocess.run(probe(kind, free_port()), capture_output=True, timeout=30).returncode != 0, kind
