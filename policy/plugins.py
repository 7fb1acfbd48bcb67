"""Plug-ins: packages outside production code that add presets, reward models, prompt sets and metrics.

A plug-in declares one function in the entry-point group ``arcopo.plugins`` of its package metadata
(``pyproject.toml``: ``[project.entry-points."arcopo.plugins"] pocket = "pocket.plugin:register"``).
``load_plugins()`` calls each once per process; the registries call it on their first miss, so Ray
actors (other processes) load the plug-ins the same way the driver does. A plug-in's ``register``
must stay light: it names the modules that hold heavy code instead of importing them.

The registries here hold what no lower package owns: named prompt sets (``rollout.prompts`` names like
``pocket:train``) and out-of-domain video metrics (``--ood pocket_fvd``), and the modules that register
presets (``register_preset_module``: ``policy.presets`` imports torch, so a plug-in names its preset's
module here and ``get_preset`` imports it on first request). Reward models register with
``reward_service.registry``, which imports nothing heavy.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

import numpy as np

ENTRY_POINT_GROUP = "arcopo.plugins"

PromptSet = Callable[[], Sequence[str]]
# (videos [N, T, H, W, 3] uint8, prompts) -> distance to real videos of those prompts; lower is better.
OodMetric = Callable[[np.ndarray, list[str]], float]

_LOCK = threading.RLock()
_LOADED: dict[str, str | None] = {}  # entry-point name -> None (loaded) or the error that stopped it
_PROMPT_SETS: dict[str, PromptSet] = {}
PRESET_MODULES: dict[str, str] = {}  # preset name -> the module that registers it when imported
_OOD_METRICS: dict[str, OodMetric | str] = {}  # a "module:function" string is imported on first use
_OOD_COLUMNS: dict[str, str] = {}  # metric name -> its metrics.jsonl column (after "eval_")


def load_plugins() -> dict[str, str | None]:
    """Call every ``arcopo.plugins`` entry point once in this process; returns name -> error (None: loaded).

    A plug-in that fails to load is reported in the registries' unknown-name errors, not raised here:
    one broken plug-in must not stop a run that never uses it."""
    with _LOCK:
        for point in entry_points(group=ENTRY_POINT_GROUP):
            if point.name in _LOADED:
                continue
            _LOADED[point.name] = None  # before the call: a plug-in may use a registry that calls back here
            try:
                point.load()()
            except Exception as exc:
                _LOADED[point.name] = f"{point.value}: {type(exc).__name__}: {exc}"
                logging.getLogger(__name__).warning("plug-in %r failed to load: %s", point.name, _LOADED[point.name])
        return dict(_LOADED)


def plugin_note() -> str:
    """For an unknown-name error: the plug-ins seen, and those that failed."""
    loaded = load_plugins()
    failed = {name: err for name, err in loaded.items() if err}
    note = f" (plug-ins of entry-point group {ENTRY_POINT_GROUP!r}: {sorted(loaded) or 'none installed'}"
    note += "".join(f"; {name} failed: {err}" for name, err in failed.items())
    return note + ")"


def register_preset_module(name: str, module: str) -> None:
    """``module`` registers the preset ``name`` (``policy.presets.register_preset``) when imported."""
    PRESET_MODULES[name] = module


def register_prompt_set(name: str, prompts: PromptSet) -> None:
    _PROMPT_SETS[name] = prompts


def prompt_set(name: str) -> list[str] | None:
    """The prompts of the registered set ``name``, or None when no plug-in registers it."""
    if name not in _PROMPT_SETS:
        load_plugins()
    return list(_PROMPT_SETS[name]()) if name in _PROMPT_SETS else None


def prompt_set_names() -> list[str]:
    load_plugins()
    return sorted(_PROMPT_SETS)


def register_ood_metric(name: str, metric: OodMetric | str, column: str | None = None) -> None:
    """``metric``: the function, or ``"module:function"`` to import when first computed; ``column``: the
    name its values take in metrics.jsonl after ``eval_`` (default: ``name``)."""
    _OOD_METRICS[name] = metric
    _OOD_COLUMNS[name] = column or name


def ood_column(name: str) -> str:
    """The metrics.jsonl column (after ``eval_``) of out-of-domain metric ``name``."""
    get_ood_metric(name)  # loads the plug-ins, and refuses an unknown name
    return _OOD_COLUMNS.get(name, name)


def ood_metric_names() -> list[str]:
    load_plugins()
    return sorted(_OOD_METRICS)


def get_ood_metric(name: str) -> OodMetric:
    if name not in _OOD_METRICS:
        load_plugins()
    if name not in _OOD_METRICS:
        raise ValueError(f"unknown out-of-domain metric {name!r}; known: {sorted(_OOD_METRICS)}{plugin_note()}")
    metric = _OOD_METRICS[name]
    if isinstance(metric, str):
        module, _, attr = metric.partition(":")
        metric = _OOD_METRICS[name] = getattr(importlib.import_module(module), attr)
    return metric
