"""Score a batch with several reward models, isolating failures to the samples that cause them.

This is what one reward actor runs; it is plain Python so it can also run in-process.
A model that raises on a batch is re-run on each sample alone, so one bad video does not
invalidate the rest. NaN/inf, a missing head or a wrongly shaped output marks only the samples
concerned invalid, with a reason; nothing is ever replaced by zero. A model that knows why it left a
sample NaN says so in `last_errors` ({index in the call: reason}); that reason is then reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from reward_service.base import RewardModel, Video
from reward_service.result import RewardResult

# Reason kinds: the text before the first ':' of RewardResult.reason, and the metrics keys.
NON_FINITE = "non_finite"
EXCEPTION = "exception"
BAD_OUTPUT = "bad_output"
BATCH_FAILED = "batch_failed"
UNSCORED = "unscored"  # the model left the sample NaN and said why (e.g. its reward server failed)


class RewardOutputError(ValueError):
    """A reward model returned something other than one float array of shape (N,) per head."""


def reason_kind(reason: str) -> str:
    """The kind of an invalid result's reason (e.g. "non_finite")."""
    return reason.split(":", 1)[0]


def combined_heads(models: Sequence[RewardModel]) -> tuple[str, ...]:
    """Every head of every model, in order. Two models may not share a head name."""
    heads: list[str] = []
    for model in models:
        for head in model.heads:
            if head in heads:
                raise ValueError(f"head {head!r} of reward {model.name!r} is also produced by another reward")
            heads.append(head)
    return tuple(heads)


def checked_score(model: RewardModel, videos: Sequence[Video], prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """`model.score`, with its output checked: every head present, float64 of shape (N,)."""
    out = model.score(list(videos), list(prompts))
    if not isinstance(out, dict):
        raise RewardOutputError(f"{model.name} returned {type(out).__name__}, expected a dict of heads")
    checked = {}
    for head in model.heads:
        if head not in out:
            raise RewardOutputError(f"{model.name} returned no head {head!r} (got {sorted(out)})")
        values = np.asarray(out[head], dtype=np.float64)
        if values.shape != (len(videos),):
            raise RewardOutputError(
                f"{model.name} head {head!r} has shape {values.shape}, expected ({len(videos)},)"
            )
        checked[head] = values
    return checked


def score_isolated(
    models: Sequence[RewardModel], videos: Sequence[Video], prompts: Sequence[str], scored_by: str = ""
) -> list[RewardResult]:
    """Score `videos` with every model; one RewardResult per video, in order."""
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    n = len(videos)
    heads = combined_heads(models)
    values = {head: np.full(n, math.nan) for head in heads}
    problems: list[list[str]] = [[] for _ in range(n)]

    for model in models:
        failed, explained = _score_model(model, videos, prompts, values, problems)
        for i in range(n):
            if i in failed:
                continue
            if i in explained and not all(math.isfinite(values[h][i]) for h in model.heads):
                problems[i].append(f"{UNSCORED}: {model.name}: {explained[i]}")
                continue
            for head in model.heads:
                v = values[head][i]
                if not math.isfinite(v):
                    problems[i].append(f"{NON_FINITE}: {model.name} head {head} returned {v}")

    results = []
    for i in range(n):
        scores = {head: float(values[head][i]) for head in heads}
        if problems[i]:
            results.append(RewardResult(scores, False, "; ".join(problems[i]), scored_by))
        else:
            results.append(RewardResult(scores, True, None, scored_by))
    return results


def _score_model(
    model: RewardModel,
    videos: Sequence[Video],
    prompts: Sequence[str],
    values: dict[str, np.ndarray],
    problems: list[list[str]],
) -> tuple[set[int], dict[int, str]]:
    """Fill `values` for one model; return the indices it could not score (reasons appended) and the
    model's own reasons for the samples it left NaN."""
    try:
        out = checked_score(model, videos, prompts)
    except Exception as exc:
        if len(videos) == 1:
            problems[0].append(_describe(model, exc))
            return {0}, {}
    else:
        for head, v in out.items():
            values[head][:] = v
        return set(), _model_errors(model, len(videos))
    failed, explained = set(), {}
    for i in range(len(videos)):  # the batch failed: find out which samples are at fault
        try:
            out = checked_score(model, videos[i : i + 1], prompts[i : i + 1])
        except Exception as exc:
            problems[i].append(_describe(model, exc))
            failed.add(i)
            continue
        for head, v in out.items():
            values[head][i] = v[0]
        if 0 in (errors := _model_errors(model, 1)):
            explained[i] = errors[0]
    return failed, explained


def _model_errors(model: RewardModel, n: int) -> dict[int, str]:
    errors = getattr(model, "last_errors", None)
    if not isinstance(errors, dict):
        return {}
    return {i: str(reason) for i, reason in errors.items() if isinstance(i, int) and 0 <= i < n}


def _describe(model: RewardModel, exc: BaseException) -> str:
    kind = BAD_OUTPUT if isinstance(exc, RewardOutputError) else EXCEPTION
    return f"{kind}: {model.name} raised {type(exc).__name__}: {exc}"
