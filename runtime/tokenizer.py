"""CLIP tokenisation with the `tokenizers` library, identical to transformers' CLIPTokenizerFast as the
PickScore model card calls it: lower-cased by the tokenizer.json normaliser, `padding=True` (to the
longest prompt of the batch) with <|endoftext|>, `truncation=True, max_length=77`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PromptError


@dataclass(frozen=True)
class TokenizedBatch:
    input_ids: np.ndarray  # [B, T] int64, T = longest prompt (<= max_length)
    truncated: list[bool]  # prompt was longer than max_length tokens and was cut, as the reference does
    lengths: np.ndarray  # [B] tokens through the first <|endoftext|>: all the causal text tower reads

    def key(self, row: int) -> bytes:
        """A row's identity for caching: its ids through the first <|endoftext|>. The tower pools there and
        is causal, so padding after it cannot change the embedding."""
        return self.input_ids[row, : self.lengths[row]].astype("<i4").tobytes()


# The text tower reads 77 tokens. A prompt far longer than that is refused before tokenising, because
# tokenising 8 M characters takes seconds of a shared thread; cutting the text instead would change which
# tokens the reference sees whenever the cut falls before its 77th token.
MAX_PROMPT_CHARS = 16_384


def check_prompt(prompt: object, index: int | None = None) -> str:
    """The prompt, as the tokenizer will see it, or PromptError naming it: a non-empty string of valid
    Unicode (no lone surrogates, which the tokenizer rejects) of at most MAX_PROMPT_CHARS characters."""
    where = "prompt" if index is None else f"prompt #{index}"
    if not isinstance(prompt, str):
        raise PromptError(f"{where} must be a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"{where} is {len(prompt):,} characters, over the {MAX_PROMPT_CHARS:,} limit "
                          "(the model reads only its first 77 tokens)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{where} is not valid Unicode: {prompt[e.start]!r} at character {e.start} "
                          "is a lone surrogate") from None
    if not prompt.strip():
        raise PromptError(f"{where} is empty: an empty prompt has no meaning to score against")
    return prompt


class ClipTokenizer:
    def __init__(self, tokenizer_json: str | Path, max_length: int, pad_token: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        pad_id = self._tok.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"pad token {pad_token!r} is not in {tokenizer_json}")
        self.max_length = max_length
        self.pad_id = pad_id
        self._tok.enable_truncation(max_length=max_length)
        self._tok.enable_padding(pad_id=pad_id, pad_token=pad_token)

    @property
    def bos_id(self) -> int:
        return int(self._tok.encode("").ids[0])

    @property
    def eos_id(self) -> int:
        return int(self._tok.encode("").ids[-1])

    def __call__(self, prompts: Sequence[str]) -> TokenizedBatch:
        """Tokenise valid prompts (see `check_prompt`) into one padded batch."""
        encodings = self._tok.encode_batch(list(prompts))
        if not encodings:
            return TokenizedBatch(np.zeros((0, 0), np.int64), [], np.zeros(0, np.int64))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        # The tower pools at argmax(input_ids): <|endoftext|> has the largest id in CLIP's vocabulary.
        lengths = ids.argmax(axis=1) + 1
        return TokenizedBatch(ids, [bool(e.overflowing) for e in encodings], lengths)
