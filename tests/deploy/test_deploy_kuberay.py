"""The KubeRay manifests: every key checked against the CRD schema subset, and what the run relies on."""

from __future__ import annotations

import copy
import re
import shlex

import pytest
import yaml
from deploy_files import DEPLOY, all_yaml_files, by_kind, images, pyproject, pyproject_pins, yaml_docs
from schema_subset import load_subset, validate_object

from controller.config import CONFIG_DIR, load_config

KNOWN_KINDS = {
    ("ray.io/v1", "RayCluster"),
    ("ray.io/v1", "RayJob"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Service"),
    ("apps/v1", "StatefulSet"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"),
}
ROLE_RESOURCES = {"rollout": "rollout_gpu", "reward": "reward_gpu", "learner": "learner_gpu"}


@pytest.fixture(scope="module")
def subset():
    return load_subset()


@pytest.fixture(scope="module")
def cluster():
    [(_, doc)] = by_kind("RayCluster")
    return doc


def test_every_yaml_parses_and_every_kubernetes_kind_is_known():
    files = all_yaml_files()
    assert len(files) >= 10
    for path in files:
        for doc in yaml_docs(path):  # raises on a syntax error, naming the file
            assert isinstance(doc, dict), path
            if "kind" in doc:
                assert (doc.get("apiVersion"), doc["kind"]) in KNOWN_KINDS, f"{path}: {doc.get('kind')}"


def test_kuberay_objects_fit_the_crd_schema(subset):
    objects = by_kind("RayCluster") + by_kind("RayJob")
    assert {d["kind"] for _, d in objects} == {"RayCluster", "RayJob"}
    for path, doc in objects:
        assert validate_object(doc, subset) == [], path


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda s: s["workerGroupSpecs"][0].update(maxReplica=3),
            "workerGroupSpecs[0].maxReplica: unknown field",
        ),
        (lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "expected string, got int"),
        (lambda s: s["authOptions"].update(tokenSecret="x"), "authOptions.tokenSecret: unknown field"),
        (lambda s: s["workerGroupSpecs"][1].pop("minReplicas"), "missing required field 'minReplicas'"),
        (
            lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].update(envs=[]),
            "containers[0].envs: unknown field",
        ),
        (lambda s: s.update(gcsFaultToleranceOptions={"redisAddress": "r:6379"}), "not in the schema subset"),
    ],
    ids=[
        "misspelt-field",
        "int-start-param",
        "unknown-auth-field",
        "missing-required",
        "pod-field",
        "unexpanded",
    ],
)
def test_schema_check_rejects_what_kuberay_would(subset, cluster, mutate, expected):
    bad = copy.deepcopy(cluster)
    mutate(bad["spec"])
    errors = validate_object(bad, subset)
    assert any(expected in e for e in errors), errors


def test_worker_groups_are_separate_and_placed_by_custom_resources(cluster):
    spec = cluster["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLE_RESOURCES)
    for name, resource in ROLE_RESOURCES.items():
        g = groups[name]
        assert g["resources"] == {resource: "1"}, name
        container = g["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
    assert groups["rollout"]["maxReplicas"] > groups["rollout"]["minReplicas"] >= 1
    # A learner pod per rank of the config the RayJob submits; never scaled down.
    learners = load_config(CONFIG_DIR / "self_forcing.yaml").run.num_learners
    assert groups["learner"]["minReplicas"] == groups["learner"]["replicas"] == groups["learner"]["maxReplicas"] == learners
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_security_settings(cluster):
    spec = cluster["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": "arcopo-ray-auth"}
    head = spec["headGroupSpec"]
    # Not KubeRay's silent default: written down, with the Service kept inside the cluster.
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["serviceType"] == "ClusterIP"
    templates = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        assert t["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in t["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            env = {e["name"]: e for e in c["env"]}
            for name in ("ARCOPO_REPLAY_URL", "ARCOPO_REDIS_PASSWORD"):
                assert (
                    "value" not in env[name]
                    and env[name]["valueFrom"]["secretKeyRef"]["name"] == "arcopo-redis"
                )


def test_images_and_versions_are_pinned(cluster):
    project_version = pyproject()["project"]["version"]
    ours = set()
    for path in all_yaml_files():
        for doc in yaml_docs(path):
            for image in images(doc):
                name, _, tag = image.rpartition(":")
                assert name and tag and tag != "latest", f"{path}: unpinned image {image}"
                if "arcopo" in name:
                    ours.add(image)
    assert ours == {f"registry.example.com/arcopo/arcopo:{project_version}-cu128"}
    assert cluster["spec"]["rayVersion"] == pyproject_pins()["ray"]


def test_rayjob_submits_the_learner_to_that_cluster(cluster):
    [(_, job)] = by_kind("RayJob")
    spec = job["spec"]
    assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    # clusterSelector mode: the job must not try to delete a cluster it does not own.
    assert spec["shutdownAfterJobFinishes"] is False
    command = spec["entrypoint"].split("&&")[-1]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "learner.main"]
    assert argv[argv.index("--config") + 1].startswith("configs/")
    assert argv[argv.index("--output") + 1].startswith("/runs/")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}


def test_volumes_the_cluster_mounts_are_declared(cluster):
    claims = {d["metadata"]["name"] for _, d in by_kind("PersistentVolumeClaim")}
    templates = [cluster["spec"]["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    used = {
        v["persistentVolumeClaim"]["claimName"]
        for t in templates
        for v in t["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert used and used <= claims
    assert (DEPLOY / "kuberay" / "storage.yaml").is_file()


def test_what_kuberays_admission_checks_would_refuse(cluster):
    """The rules of KubeRay v1.7.0's validation.go that the schema alone does not express."""
    dns1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
    [(_, job)] = by_kind("RayJob")
    assert dns1035.fullmatch(cluster["metadata"]["name"]) and len(cluster["metadata"]["name"]) <= 53
    assert dns1035.fullmatch(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 47
    spec = cluster["spec"]
    # Token auth needs Ray >= 2.52.
    assert tuple(int(x) for x in spec["rayVersion"].split(".")) >= (2, 52, 0)
    start_resource_keys = {"num-cpus", "num-gpus", "memory", "resources"}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        # Resources either in rayStartParams or in the group's `resources`, never both.
        assert not (start_resource_keys & set(group["rayStartParams"]) and group.get("resources"))
        assert "labels" not in group["rayStartParams"]
        # Autoscaler v2: pods must not set a restartPolicy other than Never.
        assert group["template"]["spec"].get("restartPolicy", "Never") == "Never"
    assert spec["autoscalerOptions"]["version"] == "v2"
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] >= 0
