"""The replay store's Redis: the manifests fit Kubernetes' schema, and a real redis-server runs the
committed redis.conf with the manifest's own command line, with the durability and memory policy an
at-least-once stream needs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid

import pytest
import redis
from deploy_files import DEPLOY, by_kind, yaml_docs
from schema_subset import load_subset, validate

REDIS_DIR = DEPLOY / "redis"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _statefulset():
    [(_, sts)] = [(p, d) for p, d in by_kind("StatefulSet") if d["metadata"]["name"] == "arcopo-redis"]
    return sts


def test_redis_objects_fit_the_kubernetes_schema():
    defs = load_subset()["definitions"]
    sts = _statefulset()
    assert validate(sts["spec"], defs["StatefulSetSpec"], defs, "spec") == []
    [(_, svc)] = [(p, d) for p, d in by_kind("Service") if d["metadata"]["name"] == "arcopo-redis"]
    assert validate(svc["spec"], defs["ServiceSpec"], defs, "spec") == []
    # The Service reaches the StatefulSet's pods, on the port the RayCluster's default URL names.
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == 6379
    # Its own volume, and the config from the committed file through kustomize.
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    [kustomization] = yaml_docs(REDIS_DIR / "kustomization.yaml")
    assert kustomization["configMapGenerator"][0]["files"] == ["redis.conf"]
    assert set(kustomization["resources"]) == {"redis.yaml"}
    container = sts["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "arcopo-redis", "key": "password"}


def test_redis_conf_runs_with_the_manifests_command_line(tmp_path):
    server = shutil.which("redis-server")
    assert server, "redis-server is needed on PATH (the suite's Redis comes from the same package)"
    container = _statefulset()["spec"]["template"]["spec"]["containers"][0]
    password = uuid.uuid4().hex
    local = {
        "/etc/redis/redis.conf": str(REDIS_DIR / "redis.conf"),
        "/data": str(tmp_path),
        "$(REDIS_PASSWORD)": password,
    }
    argv = [local.get(a, a) for a in container["args"]]
    assert argv[0] == str(REDIS_DIR / "redis.conf") and password in argv and str(tmp_path) in argv
    port = _free_port()
    # Only the listening address differs from the pod (loopback and a free port, never 6379), and the
    # memory limit, scaled down so that filling it takes a moment.
    proc = subprocess.Popen(
        [server, *argv, "--port", str(port), "--bind", "127.0.0.1", "--maxmemory", "4mb"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        client = redis.Redis(port=port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "always"
        assert config["maxmemory-policy"] == "noeviction"
        assert config["save"] == ""
        assert config["protected-mode"] == "yes"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:  # no client-side retries
            raw.sendall(b"PING\r\n")
            assert raw.recv(128).startswith(b"-NOAUTH")
        # Full memory refuses new entries instead of evicting stored ones: producers see back-pressure.
        client.xadd("stream", {"payload": b"x" * 1024})
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            for _ in range(100):
                client.xadd("stream", {"payload": b"y" * (256 << 10)})
        assert client.xrange("stream", count=1)[0][1][b"payload"] == b"x" * 1024
        assert (tmp_path / "appendonlydir").is_dir()
        client.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(timeout=10)


def test_the_urls_the_guide_gives_reach_the_service_with_the_secrets_password(monkeypatch):
    from replay import PASSWORD_ENV, URL_ENV, redis_connection

    [(_, cluster)] = by_kind("RayCluster")
    env = {e["name"] for e in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert {URL_ENV, PASSWORD_ENV} <= env  # the names the replay store reads
    guide = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    plain = "redis://arcopo-redis:6379/0"
    tls = "rediss://arcopo-redis:6380/0?ssl_ca_certs=/tls/ca.crt"
    assert f"--from-literal=url='{plain}'" in guide and tls in guide
    monkeypatch.setenv(PASSWORD_ENV, "from-the-secret")
    connection, _ = redis_connection(plain)
    assert (connection["host"], connection["port"], connection["password"]) == (
        "arcopo-redis",
        6379,
        "from-the-secret",
    )
    assert "ssl" not in connection
    connection, _ = redis_connection(tls)
    assert connection["ssl"] is True and connection["ssl_ca_certs"] == "/tls/ca.crt"
    assert (connection["port"], connection["password"]) == (6380, "from-the-secret")
