"""ODE pairs from the exact empirical-flow teacher (see ``pocket.distill``), chunk by chunk.

For a prompt and an initial noise ``[L * f, C, H, W]``: chunk 0 chooses, through the probability-flow
ODE, one of ``candidates[0]`` scenes of the prompt (a bank shared by the prompt's pairs); each later
chunk ``c`` chooses one of ``candidates[1]`` continuations of the scene so far that agree on every
earlier frame. The pair is the noise and the rendered video of the final scene (uint8), so the
teacher's endpoints are exactly real domain videos.

``continuation_sets`` draws the real videos the training command's stage 3 matches first-step
predictions against: per context scene, real alternatives of every chunk given its earlier chunks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from pocket import domain
from pocket.codec import PocketCodec
from pocket.distill import empirical_flow_choice
from pocket.domain import SceneParams


@dataclass(frozen=True)
class OdePairs:
    prompt_ids: np.ndarray  # [N] indices into the prompt list
    noise_seeds: np.ndarray  # [N] seeds of each pair's initial noise (``pair_noise``)
    videos: np.ndarray  # [N, T, H, W, 3] uint8 teacher endpoints


def pair_noise(seeds, latent_frames: int, latent_shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial noise ``[N, F, C, H, W]``: one CPU generator per pair, seeded with its seed."""
    return torch.stack(
        [torch.randn((latent_frames, *latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def _stack(params: list[SceneParams]) -> SceneParams:
    return SceneParams(*(np.stack([getattr(p, f.name) for p in params]) for f in dataclasses.fields(SceneParams)))


def _take(params: SceneParams, idx) -> SceneParams:
    return SceneParams(*(getattr(params, f.name)[idx] for f in dataclasses.fields(SceneParams)))


def _continuations(chosen: SceneParams, chunk: int, count: int, rng: np.random.Generator) -> SceneParams:
    """``[m, count, ...]`` continuations of each of the ``m`` chosen scenes from knot ``chunk + 1`` on."""
    m = chosen.radii.shape[0]
    return _stack([domain.continue_params(_take(chosen, i), chunk, count, rng) for i in range(m)])


def _chunk_latents(spec, params: SceneParams, frames: slice, codec: PocketCodec) -> torch.Tensor:
    """Flattened latents ``[..., D]`` of the given video frames of scenes ``params [..., n]``."""
    tracks = domain.scene_tracks(spec, params)[..., frames, :]
    video = domain.render_tracks(spec, params.radii, tracks)
    lead = video.shape[:-4]
    latents = codec.encode(video.reshape(-1, *video.shape[-4:]))
    return latents.reshape(*lead, -1)


def pairs_for_prompt(
    prompt: str,
    noise: torch.Tensor,
    codec: PocketCodec,
    frames_per_chunk: int,
    rng: np.random.Generator,
    candidates: tuple[int, int] = (64, 16),
    ode_steps: int = 32,
) -> np.ndarray:
    """Teacher videos ``[m, T, H, W, 3]`` for ``m`` initial noises ``[m, F, C, H, W]`` of one prompt."""
    spec = domain.parse_prompt(prompt)
    m, latent_frames = noise.shape[:2]
    video_frames = frames_per_chunk * codec.time_stride
    bank = _stack([domain.sample_params(spec, rng) for _ in range(candidates[0])])
    bank_latents = _chunk_latents(spec, bank, slice(0, video_frames), codec)  # [K0, D]
    first = noise[:, :frames_per_chunk].reshape(m, -1)
    chosen = _take(bank, empirical_flow_choice(first, bank_latents.expand(m, -1, -1), ode_steps).numpy())
    for c in range(1, latent_frames // frames_per_chunk):
        options = _continuations(chosen, c, candidates[1], rng)  # [m, K, ...]
        lat = _chunk_latents(spec, options, slice(c * video_frames, (c + 1) * video_frames), codec)  # [m, K, D]
        eps = noise[:, c * frames_per_chunk : (c + 1) * frames_per_chunk].reshape(m, -1)
        idx = empirical_flow_choice(eps, lat, ode_steps).numpy()
        chosen = _take(options, (np.arange(m), idx))
    return domain.render_tracks(spec, chosen.radii, domain.scene_tracks(spec, chosen))


@dataclass(frozen=True)
class ContinuationSets:
    """Real videos for the first-step objective: per row, a context scene and, for every chunk ``c``,
    ``N`` real alternatives of chunk ``c`` given the context's earlier chunks (chunk 0: ``N`` fresh scenes)."""

    prompt_ids: np.ndarray  # [P]
    context: np.ndarray  # [P, T, H, W, 3] uint8: the scene whose earlier chunks condition each chunk
    alternatives: np.ndarray  # [P, N, T, H, W, 3] uint8: chunk c's frames hold alternatives of chunk c


def continuation_sets(
    prompts: list[str], rows: int, alternatives: int, rng: np.random.Generator, frames_per_chunk: int, time_stride: int
) -> ContinuationSets:
    """``rows`` sets over uniformly drawn ``prompts`` (see :class:`ContinuationSets`)."""
    video_frames = frames_per_chunk * time_stride
    chunks = domain.NUM_FRAMES // video_frames
    prompt_ids = rng.integers(0, len(prompts), size=rows)
    context = np.zeros((rows, domain.NUM_FRAMES, domain.HEIGHT, domain.WIDTH, 3), dtype=np.uint8)
    alts = np.zeros((rows, alternatives, *context.shape[1:]), dtype=np.uint8)
    for r, pid in enumerate(prompt_ids):
        spec = domain.parse_prompt(prompts[pid])
        scene = domain.sample_params(spec, rng)
        context[r] = domain.render_tracks(spec, scene.radii, domain.scene_tracks(spec, scene))
        for c in range(chunks):
            if c == 0:
                options = _stack([domain.sample_params(spec, rng) for _ in range(alternatives)])
            else:
                options = domain.continue_params(scene, c, alternatives, rng)
            frames = slice(c * video_frames, (c + 1) * video_frames)
            alts[r, :, frames] = domain.render_tracks(spec, options.radii, domain.scene_tracks(spec, options)[..., frames, :])
    return ContinuationSets(prompt_ids, context, alts)


def make_ode_pairs(
    prompts: list[str],
    count: int,
    seed: int,
    codec: PocketCodec,
    frames_per_chunk: int,
    latent_frames: int,
    latent_shape: tuple[int, int, int],
    candidates: tuple[int, int] = (64, 16),
    ode_steps: int = 32,
) -> OdePairs:
    """``count`` pairs over ``prompts`` (uniformly drawn), reproducible from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    prompt_ids = rng.integers(0, len(prompts), size=count)
    noise_seeds = (np.int64(seed) * 1_000_003 + np.arange(count)) % (2**63 - 1)
    videos = np.zeros((count, domain.NUM_FRAMES, domain.HEIGHT, domain.WIDTH, 3), dtype=np.uint8)
    for pid in tqdm(np.unique(prompt_ids), desc="teacher ODE pairs"):
        rows = np.nonzero(prompt_ids == pid)[0]
        noise = pair_noise(noise_seeds[rows], latent_frames, latent_shape)
        videos[rows] = pairs_for_prompt(prompts[pid], noise, codec, frames_per_chunk, rng, candidates, ode_steps)
    return OdePairs(prompt_ids, noise_seeds, videos)
