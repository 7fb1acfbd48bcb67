"""Nothing under deploy/ or configs/ looks like a committed secret: credentials reach a cluster only
through Kubernetes Secrets, environment variables or files on the operator's own machine."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_files import REPO

SCANNED = [REPO / "deploy", REPO / "configs"]
SECRET_KEYS = (
    r"password|passwd|pwd|secret|client_secret|token|auth_token|api_?key|access_?key|secret_?key|"
    r"private_?key|requirepass|masterauth|aws_secret_access_key"
)
# A value that only points at a secret: an env/shell reference or substitution, a placeholder, nothing.
REFERENCE = re.compile(r"""^["']?(\$.*|<[^>]*>)?["']?$""")

# Anywhere, comments included.
STRONG = {
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]*:([^@\s/'\"]+)@"),
    "long hex string": re.compile(r"(?<!sha256:)(?<![0-9a-fA-F])[0-9a-fA-F]{32,}(?![0-9a-fA-F])"),
    "long base64 string": re.compile(
        r"(?<![A-Za-z0-9+/])(?=[A-Za-z0-9+/]*[0-9])(?=[A-Za-z0-9+/]*[A-Z])[A-Za-z0-9+/]{40,}={0,2}"
    ),
}
# Outside comments: a secret-named key, setting or flag given a literal value.
ASSIGNMENTS = [
    re.compile(
        rf"""(?i)(?:^|[\s{{,"'])(?:[a-z0-9_]*_)?(?:{SECRET_KEYS})["']?\s*[:=]\s*(?P<value>[^\s#,}}]+)"""
    ),
    re.compile(r"(?i)^\s*(?:requirepass|masterauth)\s+(?P<value>\S+)"),
    re.compile(r"(?i)--(?:requirepass|masterauth|password|token)[\s=,]+(?P<value>[^\s,\]]+)"),
]


def _is_comment(line: str) -> bool:
    return line.lstrip().startswith("#")


def _env_literals(text: str) -> list[str]:
    """Kubernetes env entries with a secret-like name and a literal `value:` (YAML only)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return []
    found = []

    def walk(node):
        if isinstance(node, dict):
            name = node.get("name")
            if isinstance(name, str) and "value" in node and re.search(SECRET_KEYS, name, re.I):
                if not REFERENCE.match(str(node["value"])):
                    found.append(f"env: {name} has a literal value")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(docs)
    return found


def findings(text: str) -> list[str]:
    found = []
    for line_no, line in enumerate(text.splitlines(), 1):
        for name, pattern in STRONG.items():
            for m in pattern.finditer(line):
                if name == "credentials in a URL" and REFERENCE.match(m.group(1)):
                    continue
                found.append(f"{line_no}: {name}: {line.strip()[:120]}")
        if _is_comment(line):
            continue
        for pattern in ASSIGNMENTS:
            for m in pattern.finditer(line):
                value = m.group("value")
                if REFERENCE.match(value) or value.lower() in ("true", "false", "null", "~"):
                    continue
                found.append(f"{line_no}: secret assignment: {line.strip()[:120]}")
    return found + _env_literals(text)


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN RSA PRIVATE KEY-----",
        "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
        "url: redis://:hunter2@arcopo-redis:6379/0",
        "REDIS_URL=rediss://default:s3cr3t@cache.example.com:6380/0",
        "auth_token: 3f9a1c0e7b2d4a6f8e0c1b3d5a7f9e2c",
        "requirepass correct-horse-battery-staple",
        "password: hunter2",
        'stringData: {"token": "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9abcdefGHIJ1234"}',
        "    - name: REDIS_PASSWORD\n      value: hunter2",
    ],
)
def test_scanner_flags_secrets(text):
    assert findings(text), text


@pytest.mark.parametrize(
    "text",
    [
        "args: [--requirepass, $(REDIS_PASSWORD)]",
        "secretKeyRef: {name: arcopo-redis, key: password}",
        'export ARCOPO_REDIS_PASSWORD="$(cat ~/.config/arcopo/redis_password)";',
        "printf '%s' '<the replay Redis password>' > ~/.config/arcopo/redis_password",
        "url: rediss://arcopo-redis:6380/0?ssl_ca_certs=/tls/ca.crt",
        "image: redis@sha256:" + "ab" * 32,
        "secretName: arcopo-ray-auth",
    ],
)
def test_scanner_passes_references(text):
    assert findings(text) == [], findings(text)


def test_no_committed_secrets_in_deploy_or_configs():
    files = [p for root in SCANNED if root.exists() for p in sorted(root.rglob("*")) if p.is_file()]
    assert any(p.name == "raycluster.yaml" for p in files)
    problems = {str(p.relative_to(REPO)): f for p in files if (f := findings(p.read_text(errors="replace")))}
    assert problems == {}


def test_no_kubernetes_secret_objects_are_committed():
    for path in (REPO / "deploy").rglob("*.y*ml"):
        for doc in yaml.safe_load_all(path.read_text()):
            assert not (doc and doc.get("kind") == "Secret"), (
                f"{path}: create Secrets with kubectl, never commit them"
            )


def test_every_secret_reference_names_a_documented_secret():
    guide = (REPO / "docs" / "deploy.md").read_text()
    refs = set()
    for path in (REPO / "deploy").rglob("*.y*ml"):
        text = path.read_text()
        refs |= set(re.findall(r"secretKeyRef: \{name: ([\w-]+), key: ([\w-]+)\}", text))
        refs |= {(n, "auth_token") for n in re.findall(r"secretName: ([\w-]+)", text)}
    assert refs
    for name, key in refs:
        assert re.search(
            rf"kubectl create secret generic {name}\b[^\n]*(\\\n[^\n]*)*--from-literal={key}=", guide
        ), f"docs/deploy.md does not show how to create Secret {name} with key {key}"
