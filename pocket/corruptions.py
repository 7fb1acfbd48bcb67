"""Controlled defects of pocket-domain videos, to check that the verifiers and the metric see them.

Scene-level defects (wrong colour, direction, count, shape; jittered motion) re-render the scene a
``(prompt, seed)`` pair names with one thing changed. Pixel-level defects (blur, noise, flicker)
transform rendered uint8 frames. All are deterministic given their seed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pocket import domain
from pocket.domain import PromptSpec, Scene, parse_prompt, render_scene, sample_scene


def _scene(prompt: str, seed: int) -> Scene:
    spec = parse_prompt(prompt)
    return sample_scene(spec, np.random.default_rng([seed, domain._spec_index(spec)]))


def _other(values, current: str, seed: int) -> str:
    choices = [v for v in values if v != current]
    return choices[seed % len(choices)]


def wrong_colour(prompt: str, seed: int) -> np.ndarray:
    scene = _scene(prompt, seed)
    spec = replace(scene.spec, colour=_other(list(domain.COLOURS), scene.spec.colour, seed))
    return render_scene(replace(scene, spec=spec))


def wrong_shape(prompt: str, seed: int) -> np.ndarray:
    scene = _scene(prompt, seed)
    spec = replace(scene.spec, shape=_other(domain.SHAPES, scene.spec.shape, seed))
    return render_scene(replace(scene, spec=spec))


def wrong_direction(prompt: str, seed: int) -> np.ndarray:
    """The same scene played backwards: the objects move the opposite way."""
    return render_scene(_scene(prompt, seed))[::-1].copy()


def wrong_count(prompt: str, seed: int) -> np.ndarray:
    spec = parse_prompt(prompt)
    other = PromptSpec(3 - spec.count, spec.colour, spec.shape, spec.direction, spec.background)
    return domain.generate_video(other, seed)


def jittered(prompt: str, seed: int, pixels: float = 1.5) -> np.ndarray:
    """Each frame's objects displaced by an independent random offset (shaky motion)."""
    scene = _scene(prompt, seed)
    rng = np.random.default_rng([seed, 1])
    offsets = rng.normal(0.0, pixels, size=(1, scene.tracks.shape[1], 2))
    return render_scene(replace(scene, tracks=scene.tracks + offsets))


def blurred(frames: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Separable Gaussian blur of every frame (edge pixels replicated)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    kernel /= kernel.sum()
    f = frames.astype(np.float64)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        p = np.pad(f, pad, mode="edge")
        f = sum(kernel[i] * np.take(p, np.arange(i, i + frames.shape[axis]), axis=axis) for i in range(len(kernel)))
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def noisy(frames: np.ndarray, std: float = 12.0, seed: int = 0) -> np.ndarray:
    """Additive Gaussian pixel noise of ``std`` (uint8 units)."""
    rng = np.random.default_rng([seed, 2])
    return np.clip(np.rint(frames + rng.normal(0.0, std, frames.shape)), 0, 255).astype(np.uint8)


def flickering(frames: np.ndarray, seed: int = 0, drop_every: int = 3, brightness: float = 0.15) -> np.ndarray:
    """Frames whose global brightness jumps, with every ``drop_every``-th frame's objects missing."""
    rng = np.random.default_rng([seed, 3])
    f = frames.astype(np.float64)
    background = np.median(f.reshape(f.shape[0], -1, 3), axis=1)
    f[::drop_every] = background[::drop_every, None, None, :]
    f *= 1.0 + rng.uniform(-brightness, brightness, size=(f.shape[0], 1, 1, 1))
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)
