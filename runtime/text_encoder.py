"""The text stage: validate -> tokenise -> deduplicate -> cache lookup -> text tower for the misses ->
cache fill. Prompts that tokenise alike ("a cat", "A  CAT") share one tower row and one cache entry.

Tokenising (`tokenize`) and embedding (`embed`) can run on different threads: the server tokenises each
request on its own thread, so a slow or failing prompt costs only its own request, and the thread that
owns the backend only ever meets token ids."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .backends.base import Backend
from .errors import PromptError
from .results import finite_rows
from .text_cache import TextEmbeddingCache
from .tokenizer import ClipTokenizer, check_prompt

# Prompts tokenised together: bounds the padded id matrix for any number of prompts.
TOKENIZE_CHUNK = 256


@dataclass(frozen=True)
class EncodedPrompts:
    embeddings: np.ndarray  # [N, D] float32, L2-normalised, in input order
    truncated: list[bool]  # the prompt was longer than the tokenizer's max_length and was cut, as the reference does


@dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts as the text tower reads them: each one's ids through its first <|endoftext|> (the cache key)."""

    keys: list[bytes]
    truncated: list[bool]

    @staticmethod
    def concat(parts: Sequence["TokenizedPrompts"]) -> "TokenizedPrompts":
        return TokenizedPrompts([k for p in parts for k in p.keys], [t for p in parts for t in p.truncated])


class TextEncoder:
    def __init__(self, tokenizer: ClipTokenizer, backend: Backend, cache: TextEmbeddingCache, embed_dim: int):
        self.tokenizer, self.backend, self.cache, self.embed_dim = tokenizer, backend, cache, embed_dim

    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        """Embeddings of valid prompts; raises PromptError (naming the prompt's position) for an invalid one.
        A row the text tower returned non-finite is returned as it is (the ResultAssembler makes it the
        item's error) but never cached, so a fault of the moment (a GPU, an engine) is not served again from
        the cache, across runs, after it is gone."""
        return self.embed(self.tokenize(prompts))

    def tokenize(self, prompts: Sequence[str]) -> TokenizedPrompts:
        """Validated and tokenised prompts; PromptError naming the first one that cannot be."""
        prompts = [check_prompt(p, i) for i, p in enumerate(prompts)]
        keys, truncated = [], []
        for start in range(0, len(prompts), TOKENIZE_CHUNK):
            chunk = prompts[start : start + TOKENIZE_CHUNK]
            try:
                batch = self.tokenizer(chunk)
            except Exception:  # noqa: BLE001 - check_prompt missed something the tokenizer refuses: find which
                for i, p in enumerate(chunk, start):
                    try:
                        self.tokenizer([p])
                    except Exception as e:  # noqa: BLE001 - any tokenizer failure is this prompt's
                        raise PromptError(f"prompt #{i} cannot be tokenised ({type(e).__name__}: {e})") from None
                raise
            keys += [batch.key(i) for i in range(len(batch.truncated))]
            truncated += batch.truncated
        return TokenizedPrompts(keys, truncated)

    def embed(self, tokens: TokenizedPrompts) -> EncodedPrompts:
        """Embeddings of tokenised prompts, from the cache or the text tower (see `encode`)."""
        keys = tokens.keys
        found = self.cache.get_many(keys)
        first_row = {k: i for i, k in reversed(list(enumerate(keys))) if k not in found}
        misses = list(first_row.values())
        for at in range(0, len(misses), max(1, self.backend.batch_size)):
            rows = misses[at : at + self.backend.batch_size]
            computed = self.backend.embed_text(self.ids(keys[i] for i in rows))
            self.cache.put_many({keys[i]: emb for i, emb, ok in zip(rows, computed, finite_rows(computed)) if ok})
            found.update({keys[i]: emb for i, emb in zip(rows, computed)})
        embs = np.empty((len(keys), self.embed_dim), np.float32)
        if keys:
            embs[:] = [found[k] for k in keys]
        return EncodedPrompts(embs, list(tokens.truncated))

    def ids(self, keys) -> np.ndarray:
        """The id matrix of these keys, padded to the longest: what the tokenizer's own padding gives (the
        tower is causal and pools at <|endoftext|>, so nothing after it is read)."""
        rows = [np.frombuffer(k, "<i4") for k in keys]
        ids = np.full((len(rows), max(len(r) for r in rows)), self.tokenizer.pad_id, np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        return ids
