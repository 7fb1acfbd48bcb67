"""umT5 text encoder as Wan conditions on it: 512 tokens, embeddings zeroed past each prompt's length.

Loads either a transformers ``UMT5EncoderModel`` directory (e.g. the ``text_encoder/`` + ``tokenizer/``
folders of a diffusers Wan pipeline) or Wan's own ``models_t5_umt5-xxl-enc-bf16.pth`` (its T5 key layout
is renamed to transformers' here; the tokenizer is Wan's ``google/umt5-xxl`` folder).
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import ftfy
import torch
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from policy.checkpoints import CheckpointMismatchError, check_state_matches, torch_load_tensors

logger = logging.getLogger(__name__)

WAN_TEXT_LENGTH = 512
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning, always applied as Wan's T5 tokenizer (and diffusers' ``prompt_clean``) do:
    ``ftfy.fix_text`` (curly quotes to straight, full-width to normal width, mojibake repaired, NFC),
    HTML unescaped twice, whitespace collapsed."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# Wan's T5 encoder names -> transformers' UMT5EncoderModel names (per block i).
_WAN_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(tanh) branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def wan_t5_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Wan's umT5 encoder state dict; unknown keys are kept so the strict check lists them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif match and match.group(2) in _WAN_T5_BLOCK:
            out[f"encoder.block.{match.group(1)}.{_WAN_T5_BLOCK[match.group(2)]}"] = value
        else:
            out[key] = value
    return out


def umt5_config_from_wan_state(state: Mapping[str, torch.Tensor]) -> UMT5Config:
    """The encoder's hyper-parameters read off the tensor shapes (umT5-XXL: 24 x 4096, 64 heads)."""
    try:
        vocab, dim = state["token_embedding.weight"].shape
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        dim_attn = state["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = state["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as error:
        raise CheckpointMismatchError("Wan T5 checkpoint", [str(error.args[0])], [], []) from error
    layers = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    return UMT5Config(
        vocab_size=vocab, d_model=dim, d_kv=dim_attn // heads, d_ff=dim_ffn, num_layers=layers, num_heads=heads,
        relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False,
    )


class UMT5TextEncoder:
    """``encode(prompts) -> [B, max_length, D]`` float tensor, zero past each prompt's tokens."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, max_length: int = WAN_TEXT_LENGTH,
                 encoder_id: str | None = None, output_dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_dtype = output_dtype
        self.encoder_id = encoder_id or self._fingerprint()

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    @property
    def max_tokens(self) -> int:
        return self.max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _fingerprint(self) -> str:
        """Identifies config, tokenizer, length and weights (a few tensors' bytes), for prompt caches."""
        digest = hashlib.sha256()
        config = {k: v for k, v in self.model.config.to_dict().items()
                  if k not in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        digest.update(json.dumps(sorted(self.tokenizer.get_vocab().items())).encode())
        digest.update(str(self.max_length).encode())
        for tensor in (self.model.encoder.final_layer_norm.weight, self.model.shared.weight[:8],
                       self.model.encoder.block[-1].layer[1].DenseReluDense.wo.weight[:4]):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return f"umt5-{digest.hexdigest()[:16]}"

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.max_length, add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1).to(hidden.dtype)).to(self.output_dtype)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                        max_length: int = WAN_TEXT_LENGTH, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", encoder_id: str | None = None) -> UMT5TextEncoder:
        """A transformers directory, or a diffusers pipeline directory with ``text_encoder/`` + ``tokenizer/``."""
        model_dir = Path(model_dir)
        if (model_dir / "text_encoder").is_dir():
            tokenizer_dir = tokenizer_dir or model_dir / "tokenizer"
            model_dir = model_dir / "text_encoder"
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no config.json: not a transformers UMT5 directory")
        model = UMT5EncoderModel.from_pretrained(model_dir, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
        return cls(model, tokenizer, max_length, encoder_id)

    @classmethod
    def from_wan_checkpoint(cls, checkpoint: str | Path, tokenizer_dir: str | Path | None = None, *,
                            max_length: int = WAN_TEXT_LENGTH, dtype: torch.dtype = torch.float32,
                            device: str | torch.device = "cpu", encoder_id: str | None = None) -> UMT5TextEncoder:
        """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (a file, or the Wan model folder holding it)."""
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            checkpoint = checkpoint / WAN_T5_FILE
        tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else checkpoint.parent / WAN_TOKENIZER_DIR
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} not found (Wan ships it as {WAN_TOKENIZER_DIR}/)")
        wan_state = torch_load_tensors(checkpoint)
        config = umt5_config_from_wan_state(wan_state)
        state = wan_t5_to_transformers(wan_state)
        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        check_state_matches(model, state, str(checkpoint))
        state = {k: v.to(dtype=dtype, device=device) for k, v in state.items()}
        state["encoder.embed_tokens.weight"] = state["shared.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        model.encoder.embed_tokens = model.shared
        logger.info("loaded Wan T5 encoder %s (%d layers, dim %d)", checkpoint, config.num_layers, config.d_model)
        return cls(model, AutoTokenizer.from_pretrained(tokenizer_dir), max_length, encoder_id)
