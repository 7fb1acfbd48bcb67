"""Check a manifest's keys and value types against the schema subset in data/kuberay_v1_subset.yaml."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

SUBSET_FILE = Path(__file__).parent / "data" / "kuberay_v1_subset.yaml"


def load_subset(path: Path = SUBSET_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return {"kinds": data["kinds"], "definitions": {**data["definitions"], **data["core"]}}


def _scalar_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "int-or-string":
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    if kind == "any":
        return True
    raise ValueError(f"unknown type {kind!r} in the schema subset")


def validate(value: Any, node: Any, definitions: dict[str, Any], path: str = "") -> list[str]:
    """Every problem found, each naming its path; an empty list means the value fits."""
    where = path or "<root>"
    if isinstance(node, dict) and "ref" in node:
        return validate(value, definitions[node["ref"]], definitions, path)
    if isinstance(node, dict) and "items" in node:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [
            e for i, v in enumerate(value) for e in validate(v, node["items"], definitions, f"{path}[{i}]")
        ]
    if isinstance(node, dict) and "fields" in node:
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        errors = [
            f"{where}: missing required field {r!r}" for r in node.get("required", []) if r not in value
        ]
        for key, sub in value.items():
            if key not in node["fields"]:
                errors.append(f"{path}.{key}: unknown field (not in the CRD schema subset)".lstrip("."))
            else:
                errors += validate(sub, node["fields"][key], definitions, f"{path}.{key}".lstrip("."))
        return errors
    kind = node
    if kind == "object":
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        return [f"{where}.{k}: not in the schema subset (copy this level from the CRD)" for k in value]
    m = re.fullmatch(r"(map|array)<(.+)>", kind)
    if m:
        container, inner = m.groups()
        if container == "map":
            if not isinstance(value, dict):
                return [f"{where}: expected a mapping, got {type(value).__name__}"]
            items = [(f"{path}.{k}", v) for k, v in value.items()]
            bad_keys = [f"{where}: map key {k!r} is not a string" for k in value if not isinstance(k, str)]
        else:
            if not isinstance(value, list):
                return [f"{where}: expected a list, got {type(value).__name__}"]
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
            bad_keys = []
        return bad_keys + [e for p, v in items for e in validate(v, inner, definitions, p)]
    if not _scalar_ok(kind, value):
        return [f"{where}: expected {kind}, got {type(value).__name__} {value!r}"]
    return []


def validate_object(doc: dict[str, Any], subset: dict[str, Any]) -> list[str]:
    """A whole KubeRay object: apiVersion/kind, metadata and spec."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1" or kind not in subset["kinds"]:
        return [f"not a ray.io/v1 kind this subset covers: {doc.get('apiVersion')}/{kind}"]
    defs = subset["definitions"]
    unknown_top = sorted(set(doc) - {"apiVersion", "kind", "metadata", "spec"})
    errors = [f"{k}: unknown top-level field" for k in unknown_top]
    errors += validate(doc.get("metadata"), defs["ObjectMeta"], defs, "metadata")
    errors += validate(doc.get("spec"), defs[subset["kinds"][kind]], defs, "spec")
    return errors
