"""The text stage: validate -> tokenise -> deduplicate -> cache lookup -> text tower for the misses ->
cache fill. Prompts that tokenise alike ("a cat", "A  CAT") share one tower row and one cache entry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends.base import Backend
from .results import finite_rows
from .text_cache import TextEmbeddingCache
from .tokenizer import ClipTokenizer, check_prompt

# Prompts tokenised together: bounds the padded id matrix for any number of prompts.
TOKENIZE_CHUNK = 256


@dataclass(frozen=True)
class EncodedPrompts:
    embeddings: np.ndarray  # [N, D] float32, L2-normalised, in input order
    truncated: list[bool]  # the prompt was longer than the tokenizer's max_length and was cut, as the reference does


class TextEncoder:
    def __init__(self, tokenizer: ClipTokenizer, backend: Backend, cache: TextEmbeddingCache, embed_dim: int):
        self.tokenizer, self.backend, self.cache, self.embed_dim = tokenizer, backend, cache, embed_dim

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Embeddings of valid prompts; raises PromptError (naming the prompt's position) for an invalid one.
        A row the text tower returned non-finite is returned as it is (the ResultAssembler makes it the
        item's error) but never cached, so a fault of the moment (a GPU, an engine) is not served again from
        the cache, across runs, after it is gone."""
        prompts = [check_prompt(p, i) for i, p in enumerate(prompts)]
        embs, truncated = np.empty((len(prompts), self.embed_dim), np.float32), []
        for start in range(0, len(prompts), TOKENIZE_CHUNK):
            batch = self.tokenizer(prompts[start : start + TOKENIZE_CHUNK])
            keys = [batch.key(i) for i in range(len(batch.truncated))]
            found = self.cache.get_many(keys)
            first_row = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
            misses = list(first_row.values())
            for at in range(0, len(misses), max(1, self.backend.batch_size)):
                rows = misses[at : at + self.backend.batch_size]
                width = int(batch.lengths[rows].max())  # later columns are padding for every one of these rows
                computed = self.backend.embed_text(np.ascontiguousarray(batch.input_ids[rows, :width]))
                self.cache.put_many({keys[i]: emb for i, emb, ok in zip(rows, computed, finite_rows(computed)) if ok})
                found.update({keys[i]: emb for i, emb in zip(rows, computed)})
            embs[start : start + len(keys)] = [found[k] for k in keys]
            truncated += batch.truncated
        return EncodedPrompts(embs, truncated)
