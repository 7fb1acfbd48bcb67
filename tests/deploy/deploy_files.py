"""Paths and loaders shared by the deploy tests."""

from __future__ import annotations

import functools
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    """The documents of a YAML file (parsed once per test session; callers must not mutate them)."""
    return _parsed(Path(path).resolve())


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Loader) if d is not None]


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def by_kind(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in all_yaml_files() for d in yaml_docs(p) if d.get("kind") == kind]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_pins() -> dict[str, str]:
    """Normalised distribution name -> exact version, from [project].dependencies."""
    pins = {}
    for req in pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req.strip())
        assert m, f"pyproject dependency is not an exact pin: {req!r}"
        pins[normalise(m.group(1))] = m.group(3)
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def images(doc: Any) -> list[str]:
    """Every container image named anywhere in a manifest."""
    found = []
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k == "image" and isinstance(v, str):
                found.append(v)
            else:
                found += images(v)
    elif isinstance(doc, list):
        for v in doc:
            found += images(v)
    return found
