"""The block-causal transformer: same network as diffusers', cache == dense mask, teacher forcing."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from policy.attention import block_causal_mask, teacher_forcing_mask
from policy.presets import TINY_TRANSFORMER
from policy.rollout import denoise_chunk
from policy.sampler import x0_from_flow
from policy.transformer_causal_wan import CausalWanTransformer3DModel
from tests.policy.conftest import make_policy

B, C, H, W = 2, 4, 8, 8
TPF = 16  # (8 / 2) * (8 / 2) tokens per latent frame


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CausalWanTransformer3DModel(**TINY_TRANSFORMER).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 12, C, H, W, generator=g)
    text = torch.randn(B, 7, TINY_TRANSFORMER["text_dim"], generator=g)
    t = torch.rand(B, 12, generator=g) * 1000
    return x, text, t


def test_same_config_and_state_dict_keys_as_diffusers(model):
    reference = WanTransformer3DModel(**TINY_TRANSFORMER)
    assert set(model.state_dict()) == set(reference.state_dict())
    public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
    assert public(model.config) == public(reference.config)
    names = {n.split(".", 2)[-1] for n, _ in model.named_modules() if n.startswith("blocks.0.")}
    assert {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"} <= names


@pytest.mark.parametrize("per_frame", [False, True])
def test_one_chunk_equals_diffusers_forward(model, inputs, per_frame):
    x, text, t = inputs
    x, t = x[:, :5], (t[:, :5] if per_frame else t[:, 0])
    reference = WanTransformer3DModel(**TINY_TRANSFORMER).eval()
    reference.load_state_dict(model.state_dict())
    # diffusers takes [B, C, F, H, W]; per-frame timesteps go in as its per-token [B, seq] form.
    t_ref = t.repeat_interleave(TPF, dim=1) if per_frame else t
    with torch.no_grad():
        expected = reference(x.permute(0, 2, 1, 3, 4), t_ref, text).sample.permute(0, 2, 1, 3, 4)
        got = model.forward_chunk(x, t, model.new_kv_cache(B, 5, H, W), 0, text)
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize(
    "frames_per_chunk,window,sink", [(1, None, 0), (3, None, 0), (1, 4, 1), (3, 6, 3), (2, 5, 1)]
)
def test_streaming_with_cache_equals_dense_block_causal_forward(model, inputs, frames_per_chunk, window, sink):
    x, text, t = inputs
    f = frames_per_chunk
    with torch.no_grad():
        dense = model.forward_dense(x, t, text, f, local_window=window, sink_frames=sink)
        cache = model.new_kv_cache(B, 12, H, W, window, sink)
        streamed = torch.cat([model.forward_chunk(x[:, s : s + f], t[:, s : s + f], cache, s, text) for s in range(0, 12, f)], 1)
    assert (streamed - dense).abs().max() < 1e-4
    if window is not None:  # the cache really evicted: it holds the sinks and the last window - sink frames
        assert sorted(cache.cached_frames) == list(range(sink)) + list(range(12 - (window - sink), 12))
        assert cache.capacity == window


def test_window_changes_the_output(model, inputs):
    x, text, t = inputs
    with torch.no_grad():
        full = model.forward_dense(x, t, text, 1)
        windowed = model.forward_dense(x, t, text, 1, local_window=4, sink_frames=1)
    assert torch.equal(full[:, :4], windowed[:, :4])  # frames 0..3 see the same context
    assert (full[:, 4:] - windowed[:, 4:]).abs().max() > 1e-3


def test_mask_builders():
    m = block_causal_mask(4, 2, 1)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    w = block_causal_mask(6, 1, 1, local_window=3, sink_frames=1)
    assert w[5].tolist() == [1, 0, 0, 0, 1, 1]  # sink + the last 2 frames incl. itself
    tf = teacher_forcing_mask(4, 2, 1)  # [clean | noisy]
    assert tf[4].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]  # noisy chunk 0: itself only
    assert tf[6].tolist() == [1, 1, 0, 0, 0, 0, 1, 1]  # noisy chunk 1: clean chunk 0 + itself
    assert block_causal_mask(2, 1, 3).shape == (6, 6)
    with pytest.raises(ValueError, match="local_window"):
        block_causal_mask(6, 3, 1, local_window=4, sink_frames=2)


@pytest.mark.parametrize("name", ["tiny", "tiny-window"])
def test_generation_equals_teacher_forcing_forward(name):
    """Every step of every chunk of a generated video equals one dense teacher-forcing forward over
    the recorded noisy inputs with the generated clean video as context."""
    policy = make_policy(name)
    text = policy.text_conditioning(["a blue square moves up"])
    f, steps = policy.frames_per_chunk, policy.num_steps
    g = torch.Generator().manual_seed(3)
    cache = policy.new_cache(1)
    clean, inputs, preds = [], [], []
    with torch.no_grad():
        for c in range(policy.num_chunks):
            noise = torch.randn(1, f, *policy.latent_shape, generator=g)
            draws = torch.randn(steps - 1, 1, f, *policy.latent_shape, generator=g)
            x0, xs, x0s = denoise_chunk(policy, cache, text, noise, c * f, lambda k: draws[k], record=True)
            clean.append(x0)
            inputs.append(xs)
            preds.append(x0s)
    clean, inputs, preds = torch.cat(clean, 1), torch.cat(inputs, 2), torch.cat(preds, 2)
    ts = policy.timesteps()
    for k in range(steps):
        with torch.no_grad():
            flow = policy.transformer.forward_dense(
                inputs[:, k], ts[k].expand(1, policy.num_frames), text, f,
                clean_latents=clean, local_window=policy.local_window, sink_frames=policy.sink_frames,
            )
        x0 = x0_from_flow(inputs[:, k], flow, policy.sampler.sigmas(ts[k]))
        assert (x0 - preds[:, k]).abs().max() < 1e-4


def test_bad_inputs_are_named(model):
    cache = model.new_kv_cache(1, 6, H, W)
    with pytest.raises(ValueError, match=r"latents must be \[B, F, C=4"):
        model.forward_chunk(torch.zeros(1, C, H, W), torch.zeros(1), cache, 0, torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="timesteps"):
        model.forward_chunk(torch.zeros(1, 3, C, H, W), torch.zeros(1, 2), cache, 0, torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.forward_chunk(torch.zeros(1, 3, C, H, W), torch.zeros(1), cache, 0)
    with pytest.raises(ValueError, match="batch"):
        model.forward_chunk(torch.zeros(2, 3, C, H, W), torch.zeros(2), cache, 0, torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="divisible"):
        model.tokens_per_frame(7, 8)


def test_text_kv_computed_once_per_video_and_read_only_caches_refuse_writes(model, inputs):
    x, text, t = inputs
    calls = []
    handle = model.blocks[0].attn2.to_k.register_forward_hook(lambda *a: calls.append(1))
    try:
        cache = model.new_kv_cache(1, 12, H, W)
        with torch.no_grad():
            for s in range(0, 12, 3):
                for _ in range(2):  # two denoising steps on the same slot
                    model.forward_chunk(x[:1, s : s + 3], t[:1, s : s + 3], cache, s, text[:1])
    finally:
        handle.remove()
    assert len(calls) == 1
    shared = cache.expand(3, copy=False)
    assert shared.keys[0].data_ptr() == cache.keys[0].data_ptr()  # broadcast view, no copy
    with pytest.raises(RuntimeError, match="write_cache=False"):
        model.forward_chunk(x[:1, :3].expand(3, -1, -1, -1, -1), t[:1, :3].expand(3, -1), shared, 9)
    copied = cache.expand(3)
    assert copied.keys[0].data_ptr() != cache.keys[0].data_ptr() and torch.equal(copied.keys[0][2], cache.keys[0][0])
