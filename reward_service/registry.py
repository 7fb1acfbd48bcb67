"""Reward registry: reward models are built by name from a plain config.

Adding a reward is one file under `reward_service/rewards/` that registers a factory:

    from reward_service.registry import register_reward

    @register_reward("my_reward")
    def build(**config) -> RewardModel:
        from my_package.heavy import MyReward   # heavy imports inside the factory
        return MyReward(**config)

`build_reward("my_reward", **config)` imports `reward_service.rewards.my_reward` on first use (then,
if the name is still unknown, every module of that package), so importing this registry imports
neither torch nor transformers. A reward living outside this package is named `"pkg.module:name"`:
the module is imported and must register `name`; or a plug-in (`policy.plugins`, e.g. the pocket
world's verifiers) registers it by name when plug-ins load. The pool never needs to change.

A registration may declare the model's heads (`register_reward("my_reward", heads=("VQ", "TA"))`, or
a function of the config for a model whose heads are configured) so that a run can check its reward
weights before building anything: `declared_heads(name, **config)`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from policy.plugins import load_plugins, plugin_note
from reward_service.base import RewardModel

RewardFactory = Callable[..., RewardModel]
DeclaredHeads = tuple[str, ...] | Callable[..., tuple[str, ...]]

_FACTORIES: dict[str, RewardFactory] = {}
_HEADS: dict[str, DeclaredHeads] = {}
_PLUGIN_PACKAGE = "reward_service.rewards"


def register_reward(name: str, heads: DeclaredHeads | None = None) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering `factory(**config) -> RewardModel` under `name`; `heads` (a tuple, or a
    function of the same config returning one) declares the heads the model will have."""
    if not name or ":" in name:
        raise ValueError(f"reward name must be non-empty and contain no ':', got {name!r}")

    def decorator(factory: RewardFactory) -> RewardFactory:
        existing = _FACTORIES.get(name)
        if existing is not None and _qualname(existing) != _qualname(factory):
            raise ValueError(
                f"reward {name!r} is already registered by {_qualname(existing)}; "
                f"{_qualname(factory)} cannot take the same name"
            )
        _FACTORIES[name] = factory
        if heads is not None:
            _HEADS[name] = heads if callable(heads) else tuple(heads)
        return factory

    return decorator


def build_reward(name: str, **config) -> RewardModel:
    """Build the reward model registered as `name` (or `"pkg.module:name"`) with `config`."""
    factory = resolve_factory(name)
    try:
        model = factory(**config)
    except TypeError as exc:
        raise TypeError(f"reward {name!r} rejected its config (keys {sorted(config)}): {exc}") from exc
    if not isinstance(model, RewardModel):
        raise TypeError(f"reward {name!r} factory returned {type(model).__name__}, not a RewardModel")
    if not getattr(model, "heads", None) or len(set(model.heads)) != len(model.heads):
        raise ValueError(f"reward {name!r} must declare distinct, non-empty heads, got {getattr(model, 'heads', None)}")
    declared = declared_heads(name, **config)
    if declared is not None and set(declared) != set(model.heads):
        raise ValueError(f"reward {name!r} was registered with heads {declared} but the model has {tuple(model.heads)}")
    return model


def declared_heads(name: str, **config) -> tuple[str, ...] | None:
    """The heads `name`'s registration declares for `config`, without building the model; None if it
    declares none. Raises KeyError for an unknown reward, like `build_reward`."""
    factory = resolve_factory(name)
    short = name.partition(":")[2] if ":" in name else name
    heads = _HEADS.get(short)
    if heads is None or _FACTORIES.get(short) is not factory:
        return None
    if callable(heads):
        try:
            heads = heads(**config)
        except TypeError as exc:
            raise TypeError(f"reward {name!r} rejected its config (keys {sorted(config)}): {exc}") from exc
    heads = tuple(heads)
    if not heads or len(set(heads)) != len(heads):
        raise ValueError(f"reward {name!r} must declare distinct, non-empty heads, got {heads}")
    return heads


def resolve_factory(name: str) -> RewardFactory:
    """The factory for `name`, importing the module that registers it if needed."""
    if ":" in name:
        module_name, _, short = name.partition(":")
        try:
            importlib.import_module(module_name)
        except ImportError as exc:
            raise KeyError(f"reward {name!r}: cannot import module {module_name!r}: {exc}") from exc
        if short not in _FACTORIES:
            raise KeyError(f"reward {name!r}: module {module_name!r} does not register {short!r}")
        return _FACTORIES[short]
    if name in _FACTORIES:
        return _FACTORIES[name]
    load_plugins()
    if name in _FACTORIES:
        return _FACTORIES[name]
    failures = _import_plugins(first=name)
    if name in _FACTORIES:
        return _FACTORIES[name]
    detail = "".join(f"\n  {module}: {error}" for module, error in failures.items())
    raise KeyError(
        f"unknown reward {name!r}; registered: {sorted(_FACTORIES)}"
        + (f"; plugin modules that failed to import:{detail}" if detail else "")
        + plugin_note()
    )


def available_rewards() -> list[str]:
    """Names of every reward registered in this package or by a plug-in (imports the registration files)."""
    load_plugins()
    _import_plugins()
    return sorted(_FACTORIES)


def _import_plugins(first: str | None = None) -> dict[str, str]:
    """Import `reward_service.rewards.<first>` then every other plugin module; return failures."""
    package = importlib.import_module(_PLUGIN_PACKAGE)
    names = [info.name for info in pkgutil.iter_modules(package.__path__)]
    if first in names:
        names.remove(first)
        names.insert(0, first)
    failures: dict[str, str] = {}
    for module in names:
        try:
            importlib.import_module(f"{_PLUGIN_PACKAGE}.{module}")
        except Exception as exc:  # one broken plugin must not hide the others
            failures[f"{_PLUGIN_PACKAGE}.{module}"] = f"{type(exc).__name__}: {exc}"
        if first is not None and first in _FACTORIES:
            break
    return failures


def _qualname(factory: RewardFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
