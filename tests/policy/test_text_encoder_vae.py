"""umT5 text encoder and Wan VAE wrappers on tiny random models saved in their real on-disk layouts."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from policy.checkpoints import CheckpointMismatchError
from policy.text_encoder import UMT5TextEncoder, clean_prompt
from policy.vae import WanVideoCodec

WORDS = "a red cat walks on the beach at sunset slowly blue dog runs".split()
MAX_LEN = 12


def save_tiny_tokenizer(directory):
    """A SentencePiece-style Unigram tokenizer: pad 0, eos 1, unk 2, '</s>' appended like T5's."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz▁"]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return len(vocab)


def tiny_umt5(vocab_size, seed=0):
    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    return model


@pytest.fixture(scope="module")
def umt5_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("umt5")
    vocab_size = save_tiny_tokenizer(root / "tokenizer")
    model = tiny_umt5(vocab_size)
    model.save_pretrained(root / "text_encoder")
    return root, model


def test_encode_pads_with_zeros_truncates_and_cleans(umt5_dirs):
    root, _ = umt5_dirs
    encoder = UMT5TextEncoder.from_pretrained(root, max_length=MAX_LEN)  # pipeline folder layout
    prompts = ["a red cat walks", "a  blue dog\n runs on the beach &amp; " + "slowly " * 20, "the cat"]
    out = encoder.encode(prompts)
    assert out.shape == (3, MAX_LEN, 16) and out.dtype == torch.float32
    lengths = [5, MAX_LEN, 3]  # words + '</s>'; the long prompt is truncated to MAX_LEN
    for row, length in zip(out, lengths):
        assert row[:length].abs().sum(-1).min() > 0
        assert torch.equal(row[length:], torch.zeros_like(row[length:]))
    # A prompt's embedding does not depend on its batch neighbours or on stray whitespace.
    alone = encoder.encode(["  a red   cat walks "])
    assert (alone[0] - out[0]).abs().max() < 1e-5
    with pytest.raises(TypeError, match="list of prompts"):
        encoder.encode("a red cat")


def test_prompts_are_cleaned_like_wan_curly_quotes_and_full_width_text(umt5_dirs):
    # MovieGen Video Bench prompts carry curly quotes; Wan runs ftfy.fix_text before tokenising.
    assert clean_prompt("A sign reads \u201cOPEN\u201d, the cat\u2019s tail") == 'A sign reads "OPEN", the cat\'s tail'
    assert clean_prompt("\uff32\uff45\uff44\u3000\uff43\uff41\uff54\uff01") == "Red cat!"  # full-width, ideographic space
    assert clean_prompt("  caf\u00c3\u00a9 &amp;amp; tea\n\n") == "caf\u00e9 & tea"  # mojibake, HTML twice, whitespace
    assert clean_prompt("cafe\u0301") == "caf\u00e9"  # NFC
    root, _ = umt5_dirs
    encoder = UMT5TextEncoder.from_pretrained(root, max_length=MAX_LEN)
    full_width = "\uff41\u3000\uff52\uff45\uff44\u3000\uff43\uff41\uff54"  # "a red cat" in full-width forms
    out = encoder.encode([full_width, "a red cat"])
    assert torch.equal(out[0], out[1])
    raw = encoder.tokenizer(full_width)["input_ids"]  # uncleaned, the tokenizer sees unknown characters
    assert raw != encoder.tokenizer("a red cat")["input_ids"]


def test_encode_equals_transformers_forward_masked(umt5_dirs):
    root, model = umt5_dirs
    encoder = UMT5TextEncoder.from_pretrained(root / "text_encoder", root / "tokenizer", max_length=MAX_LEN)
    ids = torch.tensor([[3, 4, 5, 1] + [0] * (MAX_LEN - 4)])  # "▁a ▁red ▁cat </s>"
    mask = (torch.arange(MAX_LEN) < 4).long()[None]
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]
    assert (encoder.encode(["a red cat"]) - expected).abs().max() < 1e-6


# --- Wan's own T5 layout -----------------------------------------------------------------------------
def to_wan_t5_layout(model):
    """transformers UMT5 encoder -> Wan's T5Encoder names (written independently of the loader's map)."""
    wan = {"token_embedding.weight": model.shared.weight, "norm.weight": model.encoder.final_layer_norm.weight}
    for i, block in enumerate(model.encoder.block):
        attention, ffn = block.layer[0], block.layer[1]
        wan[f"blocks.{i}.norm1.weight"] = attention.layer_norm.weight
        for name in "qkvo":
            wan[f"blocks.{i}.attn.{name}.weight"] = getattr(attention.SelfAttention, name).weight
        wan[f"blocks.{i}.pos_embedding.embedding.weight"] = attention.SelfAttention.relative_attention_bias.weight
        wan[f"blocks.{i}.norm2.weight"] = ffn.layer_norm.weight
        wan[f"blocks.{i}.ffn.gate.0.weight"] = ffn.DenseReluDense.wi_0.weight
        wan[f"blocks.{i}.ffn.fc1.weight"] = ffn.DenseReluDense.wi_1.weight
        wan[f"blocks.{i}.ffn.fc2.weight"] = ffn.DenseReluDense.wo.weight
    return {k: v.detach().clone() for k, v in wan.items()}


def wan_t5_reference(sd, ids, mask, heads, buckets, max_dist=128):
    """Wan's T5 encoder forward written out from its definition (no scaling, tanh GELU gate, RMS norms)."""
    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    length = ids.shape[1]
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    bucket = bucket + torch.where(rel < exact, rel, large.clamp(max=half - 1))
    x = sd["token_embedding.weight"][ids]
    b, n = ids.shape[0], heads
    layers = 1 + max(int(re.match(r"blocks\.(\d+)", k).group(1)) for k in sd if k.startswith("blocks."))
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.view(b, length, n, -1) for t in (q, k, v))
        logits = torch.einsum("binc,bjnc->bnij", q, k) + sd[p + "pos_embedding.embedding.weight"][bucket].permute(2, 0, 1)
        logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(x.dtype).min)
        out = torch.einsum("bnij,bjnc->binc", logits.softmax(-1), v).reshape(b, length, -1)
        x = x + out @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gelu(h @ sd[p + "ffn.gate.0.weight"].T)) @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def test_wan_t5_checkpoint_loads_and_matches_wan_forward(umt5_dirs, tmp_path):
    root, model = umt5_dirs
    wan_dir = tmp_path / "Wan2.1-T2V-1.3B"
    wan_dir.mkdir()
    wan_state = to_wan_t5_layout(model)
    torch.save(wan_state, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    save_tiny_tokenizer(wan_dir / "google" / "umt5-xxl")
    encoder = UMT5TextEncoder.from_wan_checkpoint(wan_dir, max_length=MAX_LEN)
    assert not any(p.is_meta for p in encoder.model.parameters())

    prompts = ["a red cat walks on the beach at sunset", "blue dog"]
    out = encoder.encode(prompts)
    tokens = encoder.tokenizer(prompts, padding="max_length", max_length=MAX_LEN, return_tensors="pt")
    with torch.no_grad():
        expected = wan_t5_reference(wan_state, tokens.input_ids, tokens.attention_mask, heads=4, buckets=8)
    expected = expected * tokens.attention_mask[..., None]
    assert (out - expected).abs().max() < 1e-4
    # Same weights from the transformers folder: same embeddings and the same encoder id.
    from_hf = UMT5TextEncoder.from_pretrained(root, max_length=MAX_LEN)
    assert (from_hf.encode(prompts) - out).abs().max() < 1e-5
    assert from_hf.encoder_id == encoder.encoder_id
    assert UMT5TextEncoder.from_pretrained(root, max_length=MAX_LEN + 1).encoder_id != encoder.encoder_id

    del wan_state["blocks.1.ffn.fc1.weight"]
    torch.save(wan_state, wan_dir / "models_t5_umt5-xxl-enc-bf16.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys: encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1"):
        UMT5TextEncoder.from_wan_checkpoint(wan_dir, max_length=MAX_LEN)


# --- VAE ---------------------------------------------------------------------------------------------
TINY_VAE = dict(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                latents_mean=[0.3, -0.2, 0.1, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0])


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(3)
    vae = AutoencoderKLWan(**TINY_VAE).eval()
    with torch.no_grad():  # norm scales random too, so a mis-mapped tensor shows in the output
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def video(seed, frames=5, size=16):
    return np.random.default_rng(seed).integers(0, 256, (1, frames, size, size, 3), dtype=np.uint8)


def test_codec_normalises_like_wan_and_inverts_exactly(tiny_vae):
    codec = WanVideoCodec(tiny_vae)
    frames = video(0)
    latents = codec.encode(frames)
    assert latents.shape == (1, 2, 4, 2, 2) == (1, *codec.latent_shape(5, 16, 16))
    assert codec.fps == 16.0 and codec.num_frames(2) == 5
    pixels = torch.from_numpy(frames).float().permute(0, 4, 1, 2, 3) / 127.5 - 1.0
    with torch.no_grad():
        mu = tiny_vae.encode(pixels).latent_dist.mode()  # [1, C, F, h, w]
    mean = torch.tensor(TINY_VAE["latents_mean"]).view(1, 4, 1, 1, 1)
    std = torch.tensor(TINY_VAE["latents_std"]).view(1, 4, 1, 1, 1)
    assert (latents - ((mu - mean) / std).permute(0, 2, 1, 3, 4)).abs().max() < 1e-6
    frames_first = mu.permute(0, 2, 1, 3, 4)
    assert (codec.denormalize(codec.normalize(frames_first)) - frames_first).abs().max() < 1e-6

    decoded = codec.decode(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    with torch.no_grad():
        reference = tiny_vae.decode(mu).sample.permute(0, 2, 3, 4, 1)  # [B, T, H, W, 3]
    reference = ((reference.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    # Equal up to a rounding flip where the float value sits on a .5 boundary.
    assert np.abs(decoded.astype(int) - reference.astype(int)).max() <= 1
    assert (decoded == reference).mean() > 0.99
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        codec.encode(video(1, frames=4))


_RESNET = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
           "conv_shortcut": "shortcut"}


def to_wan_vae_layout(state):
    """diffusers AutoencoderKLWan names -> Wan2.1_VAE.pth names (written independently of diffusers' map)."""
    out = {}
    for key, value in state.items():
        # Residual blocks first, while their diffusers names are still unambiguous.
        k = re.sub(r"((?:down_blocks|resnets)\.\d+)\.(norm1|conv1|norm2|conv2|conv_shortcut)\.",
                   lambda m: f"{m[1]}.{_RESNET[m[2]]}.", key)
        for side in ("encoder", "decoder"):
            k = k.replace(f"{side}.conv_in.", f"{side}.conv1.").replace(f"{side}.norm_out.", f"{side}.head.0.")
            k = k.replace(f"{side}.conv_out.", f"{side}.head.2.").replace(f"{side}.mid_block.attentions.0.", f"{side}.middle.1.")
            k = re.sub(rf"^{side}\.mid_block\.resnets\.(\d)\.", lambda m, side=side: f"{side}.middle.{2 * int(m[1])}.", k)
        k = re.sub(r"^encoder\.down_blocks\.", "encoder.downsamples.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.resnets\.(\d)\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d)\.upsamplers\.0\.", lambda m: f"decoder.upsamples.{4 * int(m[1]) + 3}.", k)
        k = {"quant_conv.weight": "conv1.weight", "quant_conv.bias": "conv1.bias",
             "post_quant_conv.weight": "conv2.weight", "post_quant_conv.bias": "conv2.bias"}.get(k, k)
        out[k] = value.detach().clone()
    return out


def test_wan_vae_pth_loads_through_diffusers_converter(tiny_vae, tmp_path):
    wan_state = to_wan_vae_layout(tiny_vae.state_dict())
    assert "decoder.upsamples.4.shortcut.weight" in wan_state and "encoder.middle.2.residual.6.weight" in wan_state
    torch.save(wan_state, tmp_path / "Wan2.1_VAE.pth")
    codec = WanVideoCodec.from_pretrained(tmp_path, config=TINY_VAE)
    for key, value in tiny_vae.state_dict().items():
        assert torch.equal(codec.vae.state_dict()[key], value), key
    tiny_vae.save_pretrained(tmp_path / "pipeline" / "vae")
    from_dir = WanVideoCodec.from_pretrained(tmp_path / "pipeline")
    assert all(torch.equal(from_dir.vae.state_dict()[k], v) for k, v in tiny_vae.state_dict().items())
    assert torch.equal(from_dir.latents_std.flatten(), torch.tensor(TINY_VAE["latents_std"]))

    wan_state["decoder.head.2.weight"] = wan_state["decoder.head.2.weight"][:, :2]
    torch.save(wan_state, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointMismatchError, match=r"decoder\.conv_out\.weight: checkpoint \(3, 2"):
        WanVideoCodec.from_pretrained(tmp_path / "Wan2.1_VAE.pth", config=TINY_VAE)


def test_wan_t5_map_covers_umt5_xxl():
    """umT5-XXL's shapes, in Wan's names, give back the XXL config and the model's full key set."""
    from policy.checkpoints import check_state_matches
    from policy.text_encoder import umt5_config_from_wan_state, wan_t5_to_transformers

    xxl = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        model = UMT5EncoderModel(xxl)
    wan_state = to_wan_t5_layout(model)
    config = umt5_config_from_wan_state(wan_state)
    assert (config.d_model, config.d_kv, config.d_ff, config.num_layers, config.num_heads) == (4096, 64, 10240, 24, 64)
    check_state_matches(model, wan_t5_to_transformers(wan_state), "umT5-XXL key set")


def test_the_vae_keeps_float32_on_a_cpu_and_the_policy_dtype_on_an_accelerator():
    from policy.vae import codec_dtype

    assert codec_dtype(torch.bfloat16, "cpu") == torch.float32  # half-precision Conv3d has no fast CPU kernel
    assert codec_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert codec_dtype(torch.float16, torch.device("cuda", 1)) == torch.float16
    assert codec_dtype(torch.float32, "cpu") == torch.float32
