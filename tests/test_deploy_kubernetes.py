"""deploy/kubernetes/: every manifest validates against the Kubernetes
OpenAPI schemas (kubernetes-validate, which ships them: no network), strict
mode, for the version named in docs/operations.md; every flag in them exists
in the real commands' ``--help``; paths in the arguments are mounted."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
#: Named in docs/operations.md ("Kubernetes"); change both together.
KUBERNETES_VERSION = "1.34"
MANIFESTS = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def all_objects() -> list[dict[str, Any]]:
    return [d for name in MANIFESTS for d in documents(name)]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]
    return spec["template"]["spec"] if "template" in spec else spec


def containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [
        (pod_spec(obj), c)
        for obj in all_objects()
        if obj["kind"] in ("Pod", "DaemonSet", "Deployment")
        for c in pod_spec(obj)["containers"]
    ]


def help_flags(command: str) -> set[str]:
    out = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))


@pytest.mark.timeout(60)
def test_the_docs_name_the_kubernetes_version() -> None:
    text = (REPO / "docs" / "operations.md").read_text()
    assert f"Kubernetes {KUBERNETES_VERSION}" in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_the_openapi_schema(name: str) -> None:
    docs = documents(name)
    assert docs
    for doc in docs:
        version = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert version == KUBERNETES_VERSION


@pytest.mark.timeout(60)
def test_the_validator_rejects_what_it_should() -> None:
    # The control: a misspelt field and a wrong type fail, offline.
    pod = documents("broker-static-pod.yaml")[0]
    typo = copy.deepcopy(pod)
    typo["spec"]["hostNetwrk"] = True
    wrong = copy.deepcopy(pod)
    wrong["spec"]["containers"][0]["ports"][0]["containerPort"] = "8091"
    for bad in (typo, wrong):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@pytest.mark.timeout(60)
def test_kustomization_lists_every_cluster_object() -> None:
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    assert k["namespace"] == "kube-system"
    resources = k["resources"]
    assert all((K8S / r).is_file() for r in resources)
    # The static pod is a file for the kubelet, not an API object to apply.
    assert set(resources) == set(MANIFESTS) - {"broker-static-pod.yaml"}
    images = {i["name"] for i in k["images"]}
    used = {c["image"].split(":")[0] for _, c in containers()}
    assert used <= images


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["tether-broker", "tether-agent"])
def test_every_flag_exists(command: str) -> None:
    known = help_flags(command)
    found = [c for _, c in containers() if c["command"] == [command]]
    assert found, f"no container runs {command}"
    for c in found:
        flags = {a.split("=", 1)[0] for a in c["args"] if a.startswith("--")}
        assert all(a.startswith("--") for a in c["args"]), "one --flag=value per item"
        assert flags <= known, flags - known


@pytest.mark.timeout(60)
def test_paths_in_arguments_are_mounted() -> None:
    for spec, c in containers():
        mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
        volumes = {v["name"] for v in spec["volumes"]}
        assert {m["name"] for m in c["volumeMounts"]} <= volumes
        for arg in c["args"]:
            value = arg.split("=", 1)[1]
            if value.startswith("/"):
                assert any(value == m or value.startswith(m.rstrip("/") + "/") for m in mounts), (
                    f"{c['name']}: {arg} is not on a volume"
                )


@pytest.mark.timeout(60)
def test_broker_static_pod_beside_the_apiserver() -> None:
    (pod,) = documents("broker-static-pod.yaml")
    spec = pod["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-cluster-critical"
    (c,) = spec["containers"]
    args = dict(a.split("=", 1) for a in c["args"])
    # The socket kube-apiserver's egress selector points at (deploy/egress/).
    egress = yaml.safe_load(
        (REPO / "deploy/egress/egress-selector-http-connect-uds.yaml").read_text()
    )
    uds = egress["egressSelections"][0]["connection"]["transport"]["uds"]["udsName"]
    assert args["--uds-name"] == uds
    hostpaths = {v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert str(Path(uds).parent) in hostpaths
    assert "/etc/tether/pki" in hostpaths
    health = int(args["--health-port"])
    assert health == 8092
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"]["port"] == health and c[probe]["httpGet"]["path"] == path
    assert c["resources"]["requests"]


@pytest.mark.timeout(60)
def test_agent_daemonset_uses_a_projected_token_for_the_broker_audience() -> None:
    objs = {o["kind"]: o for o in documents("agent.yaml")}
    ds = objs["DaemonSet"]
    spec = pod_spec(ds)
    assert spec["serviceAccountName"] == objs["ServiceAccount"]["metadata"]["name"]
    assert spec["priorityClassName"] == "system-cluster-critical"
    assert spec["tolerations"]
    (c,) = spec["containers"]
    args = dict(a.split("=", 1) for a in c["args"])
    sources = [
        s["serviceAccountToken"]
        for v in spec["volumes"]
        if "projected" in v
        for s in v["projected"]["sources"]
        if "serviceAccountToken" in s
    ]
    (token,) = sources
    mount = next(
        m["mountPath"]
        for m in c["volumeMounts"]
        for v in spec["volumes"]
        if v["name"] == m["name"] and "projected" in v
    )
    assert args["--service-account-token-path"] == f"{mount}/{token['path']}"
    # The broker accepts exactly this audience and ServiceAccount.
    (pod,) = documents("broker-static-pod.yaml")
    broker = dict(a.split("=", 1) for a in pod["spec"]["containers"][0]["args"])
    assert broker["--authentication-audience"] == token["audience"]
    assert broker["--agent-service-account"] == objs["ServiceAccount"]["metadata"]["name"]
    assert broker["--agent-namespace"] == ds["metadata"]["namespace"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.mark.timeout(60)
def test_rbac_lets_the_broker_create_tokenreviews() -> None:
    (crb,) = documents("rbac.yaml")
    assert crb["kind"] == "ClusterRoleBinding"
    assert crb["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "system:auth-delegator",
    }
    (subject,) = crb["subjects"]
    assert subject["kind"] == "User" and subject["name"] == "system:tether-broker"
