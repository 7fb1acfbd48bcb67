"""Verifier rewards of the pocket domain, computed from decoded frames: TA, VQ and MQ in [0, 1].

Named like VideoAlign's heads. Every head is a mean of graded terms (continuous, so group advantages
carry signal), computed by simple image analysis of uint8 frames ``[T, H, W, 3]``:

- Background: the per-frame median colour (objects cover well under half the frame).
- Foreground strength of a pixel: its colour distance to the background, over the contrast of the
  palette colour it is closest to (so 1 = fully covered by an object, 0 = background).
- Membership of a pixel in palette colour ``c``: its position ``alpha`` along the line from the
  background to ``c`` (anti-aliased edges are mixtures on that line), damped by its distance from
  that line. A pixel belongs to the palette colour whose line it is closest to.

TA (text alignment): mean of four terms, each in [0, 1]
    colour     per frame, the prompt colour's soft area over the smallest possible object area times the
               count (capped at 1), times the prompt colour's share of all foreground mass
    count      fraction of frames whose number of prompt-coloured blobs equals the prompt's count
    shape      per blob, soft IoU with an equal-area template of the prompt's shape minus the best IoU
               of the other shapes, mapped to [0, 1]; averaged over blobs and frames (0 without blobs)
    direction  least-squares velocity of the prompt-coloured centroid: forward speed over 0.4 px/frame
               (capped at 1) times how well the velocity points the prompt's way
VQ (visual quality): mean of three terms
    clean      exp(-background noise / 0.02): mean colour distance of background pixels to the background
    sharp      object edges are one-pixel ramps: strongest foreground gradients against blur
    palette    exp(-residual / 0.08): how far foreground pixels are from background-to-palette mixtures
MQ (motion quality): mean of three terms, on foreground strength with faint values (< 0.15) ignored
    smooth     exp(-max(0, mean |centroid acceleration| - 0.25) / 0.3), foreground centroid per frame
    steady     no flicker: exp(-relative frame-to-frame change of foreground mass / 0.1) times
               exp(-frame-to-frame background colour change / 0.02)
    persist    fraction of frames whose blob count equals the video's most common count (> 0)

Every number is a deterministic function of the frames and the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pocket import domain
from pocket.domain import PromptSpec, parse_prompt

HEADS = ("VQ", "MQ", "TA")
PALETTE = np.asarray(list(domain.COLOURS.values()), dtype=np.float64) / 255.0
MIN_AREA = np.pi * domain.RADIUS_RANGE[0] ** 2 * 0.85  # smallest object's area, with margin for edges
BLOB_MIN_AREA = 0.3 * MIN_AREA
FAINT = 0.15  # foreground strength below this is an artefact for MQ (VQ judges it), not an object
MEMBERSHIP_WIDTH = 0.2  # distance from a palette line (relative to its length) that halves membership ~


@dataclass(frozen=True)
class FrameAnalysis:
    """Per-pixel quantities shared by the heads, for one video."""

    frames: np.ndarray  # float [T, H, W, 3] in [0, 1]
    background: np.ndarray  # [T, 3]
    distance: np.ndarray  # [T, H, W] colour distance to the background
    strength: np.ndarray  # [T, H, W] foreground strength in [0, 1]
    memberships: np.ndarray  # [P, T, H, W] membership in each palette colour
    residual: np.ndarray  # [T, H, W] distance to the nearest background-palette line (relative)


def analyse(frames: np.ndarray) -> FrameAnalysis:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    f = frames.astype(np.float64) / 255.0
    bg = np.median(f.reshape(f.shape[0], -1, 3), axis=1)  # [T, 3]
    diff = f - bg[:, None, None, :]
    distance = np.linalg.norm(diff, axis=-1)
    axes = PALETTE[:, None, :] - bg[None, :, :]  # [P, T, 3]
    axis_len2 = np.maximum((axes**2).sum(-1), 1e-6)[:, :, None, None]  # [P, T, 1, 1]
    dot = np.einsum("thwc,ptc->pthw", diff, axes)
    alpha = dot / axis_len2
    along = np.clip(alpha, 0.0, 1.1)
    # |diff - along * axis|^2 expanded, so no [P, T, H, W, 3] tensor is built.
    off2 = (distance**2)[None] - 2.0 * along * dot + along**2 * axis_len2
    rel_res = np.sqrt(np.maximum(off2, 0.0) / axis_len2)  # [P, T, H, W]
    memberships = np.clip(alpha, 0.0, 1.0) * np.exp(-((rel_res / MEMBERSHIP_WIDTH) ** 2))
    nearest = rel_res.argmin(axis=0)[None]
    only_best = np.where(np.arange(len(PALETTE))[:, None, None, None] == nearest, memberships, 0.0)
    contrast = np.sqrt(np.take_along_axis(np.broadcast_to(axis_len2, rel_res.shape), nearest, 0)[0])
    strength = np.clip(distance / contrast, 0.0, 1.0)
    residual = rel_res.min(axis=0)
    return FrameAnalysis(f, bg, distance, strength, only_best, residual)


# ---------------------------------------------------------------------------- blobs
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def label_blobs(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a boolean ``[T, H, W]`` mask (-1 outside; ids unique per video)."""
    big = np.iinfo(np.int64).max
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        h, w = mask.shape[1:]
        best = labels
        for dy, dx in _NEIGHBOURS:
            best = np.minimum(best, padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w])
        best = np.where(mask, best, big)
        if np.array_equal(best, labels):
            break
        labels = best
    return np.where(mask, labels, -1)


@dataclass(frozen=True)
class Blob:
    frame: int
    area: float
    cx: float
    cy: float
    soft: np.ndarray  # [H, W] soft mask of this blob only


def find_blobs(soft: np.ndarray) -> list[list[Blob]]:
    """Blobs per frame of a soft mask ``[T, H, W]``: cores above 0.5, grown one pixel into the fringe."""
    labels = label_blobs(soft > 0.5)
    h, w = soft.shape[1:]
    grown = labels.copy()
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    for dy, dx in _NEIGHBOURS:
        neighbour = padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
        grown = np.where((grown < 0) & (neighbour >= 0) & (soft > 0.02), neighbour, grown)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    out: list[list[Blob]] = []
    for t in range(soft.shape[0]):
        blobs = []
        for label in np.unique(labels[t][labels[t] >= 0]):
            m = np.where(grown[t] == label, soft[t], 0.0)
            area = float(m.sum())
            if area < BLOB_MIN_AREA:
                continue
            blobs.append(Blob(t, area, float((m * xs).sum() / area), float((m * ys).sum() / area), m))
        out.append(blobs)
    return out


def shape_ious(blob: Blob) -> dict[str, float]:
    """Soft IoU of a blob with an equal-area template of each shape at its centroid."""
    h, w = blob.soft.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    radius = np.sqrt(blob.area / np.pi)
    ious = {}
    for shape in domain.SHAPES:
        template = domain.coverage(domain.shape_sdf(shape, radius, xs - blob.cx, ys - blob.cy))
        ious[shape] = float(np.minimum(blob.soft, template).sum() / max(np.maximum(blob.soft, template).sum(), 1e-9))
    return ious


# ------------------------------------------------------------------------------ heads
def text_alignment_terms(a: FrameAnalysis, spec: PromptSpec) -> dict[str, float]:
    target = a.memberships[list(domain.COLOURS).index(spec.colour)]  # [T, H, W]
    target_area = target.sum(axis=(1, 2))
    all_area = a.memberships.sum(axis=0).sum(axis=(1, 2))
    presence = np.clip(target_area / (spec.count * MIN_AREA), 0.0, 1.0)
    purity = target_area / np.maximum(all_area, 1e-9)
    colour = float(np.mean(presence * purity))

    blobs = find_blobs(target)
    count = float(np.mean([len(b) == spec.count for b in blobs]))

    per_frame = []
    for frame_blobs in blobs:
        scores = []
        for blob in frame_blobs:
            ious = shape_ious(blob)
            other = max(v for k, v in ious.items() if k != spec.shape)
            scores.append(np.clip(0.5 + (ious[spec.shape] - other) / 0.1, 0.0, 1.0))
        per_frame.append(np.mean(scores) if scores else 0.0)
    shape = float(np.mean(per_frame))

    direction = _direction_score(target, target_area, spec)
    return {"colour": colour, "count": count, "shape": shape, "direction": direction}


def _direction_score(target: np.ndarray, target_area: np.ndarray, spec: PromptSpec) -> float:
    valid = target_area >= 0.5 * MIN_AREA
    if valid.sum() < 4:
        return 0.0
    h, w = target.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    t = np.nonzero(valid)[0].astype(np.float64)
    cx = (target[valid] * xs).sum(axis=(1, 2)) / target_area[valid]
    cy = (target[valid] * ys).sum(axis=(1, 2)) / target_area[valid]
    velocity = np.array([np.polyfit(t, cx, 1)[0], np.polyfit(t, cy, 1)[0]])
    forward = float(velocity @ np.asarray(domain.DIRECTIONS[spec.direction]))
    cosine = forward / (np.linalg.norm(velocity) + 1e-9)
    return float(np.clip(forward / 0.4, 0.0, 1.0) * np.clip((cosine - 0.5) / 0.4, 0.0, 1.0))


def visual_quality_terms(a: FrameAnalysis) -> dict[str, float]:
    core = a.strength > 0.1
    near = core.copy()
    h, w = core.shape[1:]
    padded = np.pad(core, ((0, 0), (2, 2), (2, 2)))
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            near |= padded[:, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]
    background = ~near
    noise = float(a.distance[background].mean()) if background.any() else 1.0
    clean = float(np.exp(-noise / 0.02))

    gy = np.abs(np.diff(a.strength, axis=1))
    gx = np.abs(np.diff(a.strength, axis=2))
    per_frame = []
    for t in range(a.strength.shape[0]):
        grads = np.sort(np.concatenate([gy[t].ravel(), gx[t].ravel()]))[::-1]
        mass = a.strength[t].sum()
        k = int(np.clip(2.0 * np.sqrt(np.pi * mass), 4, grads.size))  # ~ the edge pixels of that much area
        per_frame.append(grads[:k].mean() if mass >= BLOB_MIN_AREA else 0.0)
    sharp = float(np.clip((np.mean(per_frame) - 0.2) / 0.5, 0.0, 1.0))

    fg_weight = a.strength
    residual = float((a.residual * fg_weight).sum() / max(fg_weight.sum(), 1e-9)) if fg_weight.sum() > 0 else 1.0
    palette = float(np.exp(-residual / 0.08))
    return {"clean": clean, "sharp": sharp, "palette": palette}


def motion_quality_terms(a: FrameAnalysis) -> dict[str, float]:
    s = np.clip((a.strength - FAINT) / (1.0 - 2 * FAINT), 0.0, 1.0)  # motion of objects, not of faint artefacts
    mass = s.sum(axis=(1, 2))
    h, w = s.shape[1:]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    present = mass >= BLOB_MIN_AREA
    if present.sum() < 3:
        return {"smooth": 0.0, "steady": 0.0, "persist": 0.0}
    safe = np.maximum(mass, 1e-9)
    centroid = np.stack([(s * xs).sum(axis=(1, 2)) / safe, (s * ys).sum(axis=(1, 2)) / safe], axis=1)
    accel = centroid[2:] - 2 * centroid[1:-1] + centroid[:-2]
    both = present[2:] & present[1:-1] & present[:-2]
    jerk = float(np.linalg.norm(accel[both], axis=1).mean()) if both.any() else 10.0
    smooth = float(np.exp(-max(0.0, jerk - 0.25) / 0.3))

    typical = float(np.median(mass[present]))
    mass_change = float(np.abs(np.diff(mass)).mean() / typical)
    bg_change = float(np.linalg.norm(np.diff(a.background, axis=0), axis=1).mean())
    steady = float(np.exp(-mass_change / 0.1) * np.exp(-bg_change / 0.02))

    counts = [len(b) for b in find_blobs(s)]
    values, freq = np.unique(counts, return_counts=True)
    mode = values[np.argmax(freq)] if values.max() > 0 else 0
    persist = float(np.mean([c == mode for c in counts])) if mode > 0 else 0.0
    return {"smooth": smooth, "steady": steady, "persist": persist}


def score_terms(frames: np.ndarray, prompt: str | PromptSpec) -> dict[str, dict[str, float]]:
    """Every term of every head for one video: ``{"TA": {...}, "VQ": {...}, "MQ": {...}}``."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    a = analyse(frames)
    return {"TA": text_alignment_terms(a, spec), "VQ": visual_quality_terms(a), "MQ": motion_quality_terms(a)}


def score_video(frames: np.ndarray, prompt: str | PromptSpec) -> dict[str, float]:
    """``{"VQ", "MQ", "TA"}`` of one video: the mean of each head's terms."""
    return {head: float(np.mean(list(terms.values()))) for head, terms in score_terms(frames, prompt).items()}


def score_videos(videos: list[np.ndarray], prompts: list[str]) -> dict[str, np.ndarray]:
    """Heads for a batch: ``{head: float64 [N]}``."""
    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    rows = [score_video(v, p) for v, p in zip(videos, prompts)]
    return {head: np.array([r[head] for r in rows], dtype=np.float64) for head in HEADS}
