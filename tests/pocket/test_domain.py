"""The pocket domain: grammar, splits, determinism and what the renderer draws."""

from __future__ import annotations

import numpy as np
import pytest

from pocket import domain
from pocket.domain import PromptSpec, parse_prompt


def test_every_prompt_parses_back_to_its_spec():
    for spec in domain.all_specs():
        assert parse_prompt(spec.text) == spec
    assert parse_prompt("A Red Circle moving left on a dark background.") == PromptSpec(1, "red", "circle", "left", "dark")


@pytest.mark.parametrize(
    "bad",
    ["three red circles moving left on a dark background", "a purple circle moving left on a dark background",
     "a red circle moving sideways on a dark background", "a red ball", ""],
)
def test_prompts_outside_the_grammar_are_rejected_with_the_reason(bad):
    with pytest.raises(ValueError, match="count|colour|direction|grammar"):
        parse_prompt(bad)


def test_heldout_prompts_are_unseen_combinations_of_seen_words():
    train, heldout = domain.train_prompts(), domain.heldout_prompts()
    assert (len(train), len(heldout)) == (360, 72)
    triple = lambda p: (lambda s: (s.colour, s.shape, s.direction))(parse_prompt(p))  # noqa: E731
    train_triples, heldout_triples = {triple(p) for p in train}, {triple(p) for p in heldout}
    assert not train_triples & heldout_triples
    assert len(heldout_triples) == 12
    for attr in ("colour", "shape", "direction", "background", "count"):
        seen = {getattr(parse_prompt(p), attr) for p in train}
        assert {getattr(parse_prompt(p), attr) for p in heldout} <= seen


def test_videos_are_deterministic_in_prompt_and_seed():
    p = domain.heldout_prompts()[5]
    a, b, c = domain.generate_video(p, 3), domain.generate_video(p, 3), domain.generate_video(p, 4)
    assert a.dtype == np.uint8 and a.shape == (domain.NUM_FRAMES, domain.HEIGHT, domain.WIDTH, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("seed", range(6))
def test_scenes_keep_objects_inside_the_frame_apart_and_moving_the_prompted_way(seed):
    spec = domain.all_specs()[seed * 67 % len(domain.all_specs())]
    spec = PromptSpec(2, spec.colour, spec.shape, spec.direction, spec.background)
    scene = domain.sample_scene(spec, np.random.default_rng(seed))
    reach = {"circle": 1.0, "square": domain.SQUARE_HALF * np.sqrt(2), "triangle": domain.TRIANGLE_R}[spec.shape]
    extent = scene.radii * reach  # farthest point of the outline from the centre
    for track, r in zip(scene.tracks, extent):
        assert (track - r >= 0).all() and (track[:, 0] + r <= domain.WIDTH).all() and (track[:, 1] + r <= domain.HEIGHT).all()
        forward = (track[-1] - track[0]) @ np.array(domain.DIRECTIONS[spec.direction])
        assert forward > 0.5 * domain.SPEED_RANGE[0] * (domain.NUM_FRAMES - 1)
    gap = np.linalg.norm(scene.tracks[0] - scene.tracks[1], axis=1).min()
    assert gap > extent.sum()


def test_edges_are_anti_aliased_and_colours_exact():
    video = domain.generate_video("a red square moving right on a dark background", 0)
    bg, fg = np.array(domain.BACKGROUNDS["dark"]), np.array(domain.COLOURS["red"])
    pixels = video.reshape(-1, 3).astype(float)
    alpha = ((pixels - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))
    assert np.isclose(alpha, 0, atol=0.01).mean() > 0.8  # mostly background
    assert (np.isclose(alpha, 1, atol=0.01)).any()  # object interiors are the exact colour
    assert ((alpha > 0.1) & (alpha < 0.9)).any()  # partially covered edge pixels
    residual = pixels - bg - alpha[:, None] * (fg - bg)
    assert np.abs(residual).max() <= 1.0  # every pixel is a background/object mixture (up to rounding)


def test_shapes_of_one_radius_have_equal_area():
    ys, xs = np.mgrid[-20:20:0.05, -20:20:0.05]
    areas = [(domain.shape_sdf(s, 4.0, xs, ys) < 0).sum() * 0.05**2 for s in domain.SHAPES]
    assert np.allclose(areas, np.pi * 16, rtol=0.02)
