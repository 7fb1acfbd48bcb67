"""The Dockerfile pins pyproject's versions; the cluster-launcher YAML and the runtime env are what
Ray itself accepts, with the security settings the deploy guide promises."""

from __future__ import annotations

import re
import shlex

import pytest
import yaml
from deploy_files import DEPLOY, by_kind, normalise, pyproject, pyproject_pins
from ray.runtime_env import RuntimeEnv

# Installed in the image but not project dependencies: pip itself, and the AWS SDK that Ray's
# cluster launcher needs on the head node.
IMAGE_ONLY = {"pip", "boto3"}


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG ([A-Z0-9_]+)=(\S+)$", text, flags=re.M))


def dockerfile_pins(text: str) -> dict[str, str]:
    """name -> version for every `name==version` the Dockerfile installs, ARG values substituted."""
    args = dockerfile_args(text)
    expanded = re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
    return {
        normalise(n): v
        for n, v in re.findall(r"(?<![\w.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s'\"]*)", expanded)
    }


def test_dockerfile_pins_equal_pyproject():
    text = dockerfile()
    pins = pyproject_pins()
    installed = dockerfile_pins(text)
    assert installed["torch"] == pins["torch"]
    assert set(installed) - IMAGE_ONLY <= set(pins), sorted(set(installed) - IMAGE_ONLY - set(pins))
    for name, version in installed.items():
        if name not in IMAGE_ONLY:
            assert version == pins[name], f"{name}: Dockerfile {version} != pyproject {pins[name]}"
    # Everything else is installed from pyproject's own list of exact pins, not retyped.
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in text
    assert "pip install --no-deps -e /opt/arcopo" in text


def test_dockerfile_pin_check_can_fail():
    broken = dockerfile().replace("ARG TORCH_VERSION=2.13.0", "ARG TORCH_VERSION=2.12.0")
    assert dockerfile_pins(broken)["torch"] != pyproject_pins()["torch"]


def test_dockerfile_base_python_and_user():
    text = dockerfile()
    args = dockerfile_args(text)
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\S+", args["CUDA_IMAGE"])
    assert args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    python = tuple(int(x) for x in args["PYTHON_VERSION"].split("."))
    spec = pyproject()["project"]["requires-python"]  # ">=3.11,<3.13"
    bounds = re.fullmatch(r">=(\d+)\.(\d+),<(\d+)\.(\d+)", spec)
    assert bounds, f"unexpected requires-python {spec!r}"
    lo_major, lo_minor, hi_major, hi_minor = map(int, bounds.groups())
    assert (lo_major, lo_minor) <= python < (hi_major, hi_minor)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # The same uid the KubeRay pods run as.
    [(_, cluster)] = by_kind("RayCluster")
    assert cluster["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
        users[-1].split(":")[0]
    )


@pytest.fixture(scope="module")
def launcher():
    return yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())


def test_cluster_launcher_is_valid_for_ray(launcher):
    from ray.autoscaler._private.util import validate_config

    validate_config(launcher)  # Ray's own schema and checks; raises on an unknown field


def test_cluster_launcher_node_types_and_security(launcher):
    types = launcher["available_node_types"]
    assert types["rollout"]["resources"]["rollout_gpu"] == 1
    assert types["reward"]["resources"]["reward_gpu"] == 1
    assert types["learner"]["resources"]["learner_gpu"] == 1
    assert types["rollout"]["max_workers"] > types["rollout"]["min_workers"] >= 1
    assert types["learner"]["min_workers"] == types["learner"]["max_workers"] == 1
    head = " ".join(launcher["head_start_ray_commands"])
    port = re.search(r"ray start --head .*?--port=(\d+)", head)
    assert port and port.group(1) != "6379"
    assert "--dashboard-host=127.0.0.1" in head
    worker = " ".join(launcher["worker_start_ray_commands"])
    assert f"--address=$RAY_HEAD_IP:{port.group(1)}" in worker
    for command in (head, worker):
        assert "export RAY_AUTH_MODE=token;" in command
    # Credentials come from the operator's machine by file_mounts, never from this file.
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert (
        launcher["docker"]["image"]
        == f"registry.example.com/arcopo/arcopo:{pyproject()['project']['version']}-cu128"
    )


def test_runtime_env_is_one_ray_accepts_and_installs_nothing():
    env = yaml.safe_load((DEPLOY / "runtime_env.yaml").read_text())
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)
    # Dependencies come from the image (pyproject's pins), never a per-job install.
    assert not {"pip", "uv", "conda", "container", "image_uri"} & set(env)
    assert env["working_dir"] == "."
    assert {".git/", ".venv/", "runs/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_rayjob_and_launcher_use_the_same_entrypoint_module():
    [(_, job)] = by_kind("RayJob")
    header = (DEPLOY / "cluster-launcher.yaml").read_text()
    argv = shlex.split(job["spec"]["entrypoint"].split("&&")[-1])
    config = argv[argv.index("--config") + 1]
    assert f"python -m learner.main --config {config}" in header
