"""The pocket text encoder: a fixed word-level encoding of the domain's grammar.

Each word of the grammar's vocabulary has a fixed embedding, a Gaussian vector drawn from a
generator seeded by the word's position in the vocabulary; a prompt becomes its words' embeddings,
zero-padded to ``max_tokens`` (Wan's convention: zero past the prompt's length). There are no weights
to train or ship: the transformer's text projection (``condition_embedder.text_embedder``) learns what
the words mean. Words are attribute-specific in this grammar (a colour word is never a direction
word), so no position encoding is needed. A word outside the vocabulary is an error, since the
generator has never seen it.
"""

from __future__ import annotations

import re

import torch

from pocket import domain


class PocketTextEncoder:
    def __init__(self, dim: int = 32, max_tokens: int = 12, seed: int = 0) -> None:
        if dim < 1 or max_tokens < 1:
            raise ValueError(f"dim and max_tokens must be >= 1, got dim={dim}, max_tokens={max_tokens}")
        self.dim = dim
        self.max_tokens = max_tokens
        self.vocabulary = domain.vocabulary()
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(self.vocabulary), dim, generator=gen)
        self.index = {word: i for i, word in enumerate(self.vocabulary)}
        self.encoder_id = f"pocket-words-v1-d{dim}-s{max_tokens}-seed{seed}"

    def tokenize(self, prompt: str) -> list[int]:
        words = re.findall(r"[a-z]+", prompt.lower())
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"prompt {prompt!r} has words outside the pocket vocabulary: {unknown}")
        if not words:
            raise ValueError("empty prompt")
        if len(words) > self.max_tokens:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words, more than max_tokens={self.max_tokens}")
        return [self.index[w] for w in words]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """``[B, max_tokens, dim]`` float32, zero past each prompt's length."""
        out = torch.zeros(len(prompts), self.max_tokens, self.dim)
        for i, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            out[i, : len(ids)] = self.table[ids]
        return out
