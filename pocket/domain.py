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
KNOT_EVERY = 4  # frames between random changes of drift and speed (one pocket chunk)
DRIFT_STD = 0.35  # sideways velocity at a knot, pixels per frame
SPEED_JITTER = 0.2  # relative change of the forward speed at a knot
SPEED_JITTER_LIMIT = 0.4
LANE_GAP = 3.0  # minimum free pixels between two objects' outlines
# Where objects start varies a little around a layout the prompt fixes (objects enter near the edge
# they move away from, one in the middle or two side by side): the pocket generator can learn the
# choices that remain from its initial noise in a CPU budget; anywhere-in-the-frame starts it could not.
LANE_SPREAD = 2.0  # sideways start: band centre +- this many pixels
START_SPREAD = 2.0  # forward start: up to this many pixels past the entry margin
SPLIT_RANGE = (0.46, 0.54)  # where two objects' lanes divide the frame, as a fraction of its width

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
class SceneParams:
    """The free parameters of scenes, as arrays with any leading batch shape ``...`` and ``n`` objects.

    Velocities change linearly between knots ``KNOT_EVERY`` frames apart (frames 0, 4, 8, ...): the
    forward speed is ``speed * (1 + speed_knots)`` and the sideways velocity is ``drift_knots``
    (pixels per frame). Frames ``< 4 c`` depend only on knots ``0..c``, so resampling knots ``> c``
    continues a scene from frame ``4 c`` on with new randomness and an unchanged past.
    """

    radii: np.ndarray  # [..., n]
    bands: np.ndarray  # [..., n, 2] sideways limits of each object's lane
    lane: np.ndarray  # [..., n] sideways start position
    start: np.ndarray  # [..., n] distance travelled from the entry edge at frame 0
    speed: np.ndarray  # [..., n] base forward speed
    speed_knots: np.ndarray  # [..., n, K] relative speed change at each knot
    drift_knots: np.ndarray  # [..., n, K] sideways velocity at each knot


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one video: per-object radius and centre track ``[n, T, 2]`` (x, y)."""

    spec: PromptSpec
    radii: np.ndarray  # [n]
    tracks: np.ndarray  # [n, T, 2]
    params: SceneParams | None = None


def num_knots(num_frames: int = NUM_FRAMES) -> int:
    return (num_frames - 2) // KNOT_EVERY + 2


def _knot_weights(num_frames: int) -> np.ndarray:
    """``[T - 1, K]`` linear-interpolation weights of the knots at each frame-to-frame step."""
    knots = np.arange(num_knots(num_frames)) * KNOT_EVERY
    eye = np.eye(len(knots))
    return np.stack([np.interp(np.arange(num_frames - 1), knots, eye[k]) for k in range(len(knots))], axis=1)


def _extent(shape: str, radii: np.ndarray) -> np.ndarray:
    """Farthest point of a shape's outline from its centre."""
    return radii * {"circle": 1.0, "square": SQUARE_HALF * np.sqrt(2), "triangle": TRIANGLE_R}[shape]


def sample_params(spec: PromptSpec, rng: np.random.Generator, num_frames: int = NUM_FRAMES) -> SceneParams:
    """Draw sizes, lanes, start, speed and the velocity knots of one scene for ``spec``."""
    n = spec.count
    dx, dy = DIRECTIONS[spec.direction]
    radii = rng.uniform(*RADIUS_RANGE, size=n)
    extent = _extent(spec.shape, radii)
    margin = extent + 1.0
    size = float(WIDTH if dx else HEIGHT)
    other = float(HEIGHT if dx else WIDTH)
    if n == 1:  # sideways lanes: two objects never touch, drift included
        bands = np.array([[margin[0], other - margin[0]]])
    else:
        split = other * rng.uniform(*SPLIT_RANGE)
        bands = np.array([[margin[0], split - LANE_GAP / 2 - extent[0]], [split + LANE_GAP / 2 + extent[1], other - margin[1]]])
    lane = np.array([np.clip((lo + hi) / 2 + rng.uniform(-LANE_SPREAD, LANE_SPREAD), lo, hi) for lo, hi in bands])
    speed = rng.uniform(*SPEED_RANGE, size=n)
    longest = speed * (1.0 + SPEED_JITTER_LIMIT) * (num_frames - 1)  # stays inside whatever the knots do
    room = np.maximum(0.0, size - 2 * margin - longest)  # forward slack that keeps the object in frame
    start = margin + rng.uniform(0.0, 1.0, size=n) * np.minimum(room, START_SPREAD)
    k = num_knots(num_frames)
    return SceneParams(
        radii, bands, lane, start, speed, rng.normal(0.0, SPEED_JITTER, size=(n, k)), rng.normal(0.0, DRIFT_STD, size=(n, k))
    )


def continue_params(params: SceneParams, chunk: int, count: int, rng: np.random.Generator) -> SceneParams:
    """``count`` continuations of one scene that agree on frames ``< KNOT_EVERY * chunk``: knots ``> chunk`` redrawn."""
    def repeat(a):
        return np.broadcast_to(a, (count, *a.shape)).copy()

    speed_knots, drift_knots = repeat(params.speed_knots), repeat(params.drift_knots)
    fresh = slice(chunk + 1, None)
    speed_knots[..., fresh] = rng.normal(0.0, SPEED_JITTER, size=speed_knots[..., fresh].shape)
    drift_knots[..., fresh] = rng.normal(0.0, DRIFT_STD, size=drift_knots[..., fresh].shape)
    return SceneParams(
        repeat(params.radii), repeat(params.bands), repeat(params.lane), repeat(params.start), repeat(params.speed),
        speed_knots, drift_knots,
    )


def scene_tracks(spec: PromptSpec, params: SceneParams, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Object centres ``[..., n, T, 2]`` (x, y) of scenes with parameters ``params``."""
    dx, dy = DIRECTIONS[spec.direction]
    w = _knot_weights(num_frames)  # [T-1, K]
    speed = params.speed[..., None] * (1.0 + np.clip(params.speed_knots @ w.T, -SPEED_JITTER_LIMIT, SPEED_JITTER_LIMIT))
    zero = np.zeros((*speed.shape[:-1], 1))
    along = params.start[..., None] + np.concatenate([zero, np.cumsum(speed, axis=-1)], axis=-1)
    drift = np.concatenate([zero, np.cumsum(params.drift_knots @ w.T, axis=-1)], axis=-1)
    sideways = np.clip(params.lane[..., None] + drift, params.bands[..., 0:1], params.bands[..., 1:2])
    size = float(WIDTH if dx else HEIGHT)
    if dx + dy < 0:
        along = size - along
    x, y = (along, sideways) if dx else (sideways, along)
    return np.stack([x, y], axis=-1)


def sample_scene(spec: PromptSpec, rng: np.random.Generator, num_frames: int = NUM_FRAMES) -> Scene:
    """Draw the free parameters of a video for ``spec`` and its object tracks."""
    params = sample_params(spec, rng, num_frames)
    return Scene(spec, params.radii, scene_tracks(spec, params, num_frames), params)


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
            nx, ny = np.cos(angle).astype(x.dtype), np.sin(angle).astype(x.dtype)
            d = np.maximum(d, x * nx + y * ny - big_r / 2)
        return d
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage from a signed distance: a one-pixel linear ramp."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def render_tracks(spec: PromptSpec, radii: np.ndarray, tracks: np.ndarray) -> np.ndarray:
    """uint8 frames ``[..., T, H, W, 3]`` of objects with ``radii [..., n]`` along ``tracks [..., n, T, 2]``."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32) + 0.5
    bg = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    fg = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    x = xs - tracks[..., 0, None, None].astype(np.float32)  # [..., n, T, H, W]
    y = ys - tracks[..., 1, None, None].astype(np.float32)
    radii = radii.astype(np.float32)[..., None, None, None]
    alpha = coverage(shape_sdf(spec.shape, radii, x, y)).max(axis=-4)
    frames = bg + alpha[..., None] * (fg - bg)
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def render_scene(scene: Scene) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` of a scene."""
    return render_tracks(scene.spec, scene.radii, scene.tracks)


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
