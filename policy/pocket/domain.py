"""The pocket domain: procedurally generated videos of coloured shapes moving over plain backgrounds.

A prompt names the count, colour, shape and direction of the objects and the background, e.g.
``"two red circles moving left on a dark background"``. Everything the prompt leaves open (object
sizes, start positions, speed, a smooth random sideways drift and a mild speed modulation) is drawn
from a seeded generator, so a ``(prompt, seed)`` pair names exactly one video. The drift and speed
change at random knots every few frames, so a video's future is not fixed by its first frames: later
chunks of a streaming generator have something of their own to decide.

Frames are rendered with analytic anti-aliasing (pixel coverage from a signed distance), so edge
sharpness, blur and noise are measurable properties of a video.

Held-out prompts are unseen combinations: a (colour, shape, direction) triple is held out when
``(colour + 2 shape + 3 direction) % 6 == 0`` (indices into the tuples below), which holds out 12 of
the 72 triples, every colour twice, every shape four times and every direction three times.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np

NUM_FRAMES = 16
HEIGHT = WIDTH = 32
FPS = 8.0

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[float, float]] = {  # unit (dx, dy) in image coordinates (y down)
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "dark": (18, 18, 28),
    "grey": (118, 118, 118),
    "light": (228, 228, 222),
}
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two"}

# Free parameters of a scene (pixels, pixels per frame).
RADIUS_RANGE = (2.8, 4.0)  # radius of the equal-area circle
SPEED_RANGE = (0.7, 1.1)
KNOT_EVERY = 4  # frames between random changes of drift and speed
DRIFT_STD = 0.25  # sideways velocity at a knot, pixels per frame
SPEED_JITTER = 0.15  # relative change of the forward speed at a knot
LANE_GAP = 3.0  # minimum free pixels between two objects' outlines

# Circumradius of an equilateral triangle and half side of a square with the area of a unit circle.
TRIANGLE_R = float(np.sqrt(4.0 * np.pi / (3.0 * np.sqrt(3.0))))
SQUARE_HALF = float(np.sqrt(np.pi) / 2.0)


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt asks for."""

    count: int
    colour: str
    shape: str
    direction: str
    background: str

    def __post_init__(self) -> None:
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be one of {sorted(COUNT_WORDS)}, got {self.count}")
        for field, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} must be one of {sorted(allowed)}, got {value!r}")

    @property
    def text(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun} moving {self.direction} on a {self.background} background"


_PROMPT_RE = re.compile(
    r"^\s*(?P<count>a|one|two)\s+(?P<colour>\w+)\s+(?P<shape>\w+?)s?\s+moving\s+(?P<direction>\w+)"
    r"\s+on\s+an?\s+(?P<background>\w+)\s+background\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar ``<a|two> <colour> <shape>[s] moving <direction> on a <background> background``."""
    match = _PROMPT_RE.match(prompt)
    if match is None:
        raise ValueError(
            f"prompt {prompt!r} is not in the pocket grammar "
            "'<a|two> <colour> <shape>[s] moving <direction> on a <background> background'"
        )
    words = {k: v.lower() for k, v in match.groupdict().items()}
    count = 2 if words["count"] == "two" else 1
    return PromptSpec(count, words["colour"], words["shape"], words["direction"], words["background"])


def vocabulary() -> tuple[str, ...]:
    """Every word the grammar can produce, in a fixed order."""
    words = ["a", "two", "moving", "on", "background"]
    words += list(COLOURS) + [s for shape in SHAPES for s in (shape, shape + "s")] + list(DIRECTIONS) + list(BACKGROUNDS)
    return tuple(words)


def is_heldout(spec: PromptSpec) -> bool:
    c = list(COLOURS).index(spec.colour)
    s = SHAPES.index(spec.shape)
    d = list(DIRECTIONS).index(spec.direction)
    return (c + 2 * s + 3 * d) % 6 == 0


def all_specs() -> list[PromptSpec]:
    return [
        PromptSpec(n, c, s, d, b)
        for n, c, s, d, b in itertools.product(COUNT_WORDS, COLOURS, SHAPES, DIRECTIONS, BACKGROUNDS)
    ]


def train_prompts() -> list[str]:
    """The 360 prompts the generator is trained on."""
    return [s.text for s in all_specs() if not is_heldout(s)]


def heldout_prompts() -> list[str]:
    """The 72 prompts whose (colour, shape, direction) triple never occurs in training."""
    return [s.text for s in all_specs() if is_heldout(s)]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one video: per-object radius and centre track ``[n, T, 2]`` (x, y)."""

    spec: PromptSpec
    radii: np.ndarray  # [n]
    tracks: np.ndarray  # [n, T, 2]


def _knot_profile(rng: np.random.Generator, num_frames: int, std: float) -> np.ndarray:
    """A per-frame value that changes linearly between random knots every ``KNOT_EVERY`` frames."""
    knots = np.arange(0, num_frames - 1 + KNOT_EVERY, KNOT_EVERY)
    values = rng.normal(0.0, std, size=knots.shape)
    return np.interp(np.arange(num_frames - 1), knots, values)


def sample_scene(spec: PromptSpec, rng: np.random.Generator, num_frames: int = NUM_FRAMES) -> Scene:
    """Draw the free parameters of a video for ``spec``: sizes, lanes, start, speed, drift."""
    n = spec.count
    dx, dy = DIRECTIONS[spec.direction]
    forward = np.array([dx, dy])
    side = np.array([abs(dy), abs(dx)])  # the perpendicular axis, as a positive unit vector
    radii = rng.uniform(*RADIUS_RANGE, size=n)
    extent = radii * {"circle": 1.0, "square": SQUARE_HALF * np.sqrt(2), "triangle": TRIANGLE_R}[spec.shape]
    margin = extent + 1.0
    size = float(WIDTH if dx else HEIGHT)
    other = float(HEIGHT if dx else WIDTH)

    # Sideways lanes: object i sits in its own band so two objects never touch, drift included.
    if n == 1:
        bands = [(margin[0], other - margin[0])]
    else:
        split = rng.uniform(other * 0.42, other * 0.58)
        bands = [(margin[0], split - LANE_GAP / 2 - extent[0]), (split + LANE_GAP / 2 + extent[1], other - margin[1])]
    tracks = np.zeros((n, num_frames, 2))
    for i in range(n):
        speed = rng.uniform(*SPEED_RANGE) * (1.0 + _knot_profile(rng, num_frames, SPEED_JITTER).clip(-0.4, 0.4))
        along = np.concatenate([[0.0], np.cumsum(speed)])
        lo, hi = bands[i]
        lane = rng.uniform(lo + 1.5, hi - 1.5) if hi - lo > 3.0 else (lo + hi) / 2
        drift = np.concatenate([[0.0], np.cumsum(_knot_profile(rng, num_frames, DRIFT_STD))])
        sideways = np.clip(lane + drift, lo, hi)
        travel = along[-1]
        start_lo, start_hi = margin[i], size - margin[i] - travel
        start = rng.uniform(start_lo, max(start_lo, start_hi))
        pos_along = start + along if (dx + dy) > 0 else size - start - along
        pos = pos_along[:, None] * np.abs(forward)[None, :] + sideways[:, None] * side[None, :]
        tracks[i] = pos
    return Scene(spec, radii, tracks)


def shape_sdf(shape: str, radius: float | np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (pixels, negative inside) of a shape of equal-circle ``radius`` centred at the origin.

    Squares are axis-aligned; triangles are equilateral with a vertex pointing up. All three shapes
    of one radius have the same area.
    """
    if shape == "circle":
        return np.sqrt(x * x + y * y) - radius
    if shape == "square":
        h = radius * SQUARE_HALF
        qx, qy = np.abs(x) - h, np.abs(y) - h
        outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
        return outside + np.minimum(np.maximum(qx, qy), 0)
    if shape == "triangle":
        big_r = radius * TRIANGLE_R
        # Three half-planes at distance R/2 from the centre, normals pointing down, up-left, up-right.
        d = y - big_r / 2  # bottom edge: y grows downwards
        for angle in (np.pi / 6 + np.pi, -np.pi / 6):
            nx, ny = np.cos(angle), np.sin(angle)
            d = np.maximum(d, x * nx + y * ny - big_r / 2)
        return d
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage from a signed distance: a one-pixel linear ramp."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` of a scene."""
    spec = scene.spec
    num_frames = scene.tracks.shape[1]
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64) + 0.5
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float64)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float64)
    alpha = np.zeros((num_frames, HEIGHT, WIDTH))
    for radius, track in zip(scene.radii, scene.tracks):
        x = xs[None] - track[:, 0, None, None]
        y = ys[None] - track[:, 1, None, None]
        alpha = np.maximum(alpha, coverage(shape_sdf(spec.shape, radius, x, y)))
    frames = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def generate_video(prompt: str | PromptSpec, seed: int, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """The video ``(prompt, seed)`` names: uint8 ``[T, H, W, 3]``."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    rng = np.random.default_rng([seed, _spec_index(spec)])
    return render_scene(sample_scene(spec, rng, num_frames))


def generate_batch(prompts: list[str], seeds: list[int] | np.ndarray) -> np.ndarray:
    """uint8 ``[B, T, H, W, 3]`` for paired prompts and seeds."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    return np.stack([generate_video(p, int(s)) for p, s in zip(prompts, seeds)])


def _spec_index(spec: PromptSpec) -> int:
    return (
        ((spec.count * 8 + list(COLOURS).index(spec.colour)) * 4 + SHAPES.index(spec.shape)) * 4
        + list(DIRECTIONS).index(spec.direction)
    ) * 4 + list(BACKGROUNDS).index(spec.background)
