"""The runtime tokenizer (tokenizers + tokenizer.json) against transformers' CLIP fast tokenizer,
called as the model card calls it: padding=True, truncation=True, max_length=77."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pickscore_runtime.tokenizer import ClipTokenizer


def prompt_corpus() -> list[str]:
    fixed = [
        "", " ", "a", ".", "A photo of a CAT", "a photo of a cat", "ÀÉÎÕÜ àéîõü ñ ç ß ø å æ œ", "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
        "e\u0301 vs \u00e9 (combining accent vs precomposed)", "東京の夜景とラーメン", "한국어 프롬프트", "Привет, мир!",
        "مرحبا بالعالم", "שלום עולם", "🌸🚀🔥👩‍🚀👍🏽", "emoji🙂inside🙃words", "!!!???...,,,;;;:::", "--==++**&&^^%%$$##@@",
        "tabs\tand\nnewlines\r\nand   spaces", "\u00a0non-breaking\u00a0space\u2003em space", "<|startoftext|> literal specials <|endoftext|>",
        "it's they're we've I'm you'll he'd", "IT'S THEY'RE", "3.14159 2,718 1e10 #42 $100 50%", "snake_case camelCase kebab-case",
        "https://example.com/path?q=1&r=2", "user@example.com", "a" * 300, "word " * 100, "🚀" * 90,
        "zero\u200bwidth\u200cjoiners\u200d", "ﬁ ligature ﬂ", "Ⅻ roman numeral Ⅳ", "x² y³ ½ ¾",
    ]
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?;:'\"()[]{}-_/\\&*%$#@~`^|<>+= \t\n") + \
        list("éèêëàâäôöûüçñøåæœßÉÈÀÖÜ") + list("日本語中文한국어ру́сскийΕλληνικάעבריתالعربية") + ["🙂", "🚀", "🌸", "👍🏽", "👩‍🚀", "\u00a0", "\u200b"]
    generated = []
    for _ in range(220):
        n = rng.choice([1, 3, 8, 20, 60, 150, 400])
        generated.append("".join(rng.choice(alphabet) for _ in range(n)))
    return fixed + generated


@pytest.fixture(scope="module")
def tokenizers(pickscore_files):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(pickscore_files)
    assert reference.is_fast
    ours = ClipTokenizer(pickscore_files / "tokenizer.json", max_length=77, pad_token="<|endoftext|>")
    return reference, ours


def test_corpus_is_large_and_varied():
    corpus = prompt_corpus()
    assert len(corpus) >= 200
    assert any(len(p) > 300 for p in corpus) and "" in corpus


def test_each_prompt_alone_matches_reference(tokenizers):
    reference, ours = tokenizers
    for prompt in prompt_corpus():
        want = reference(prompt, padding=True, truncation=True, max_length=77)["input_ids"]
        got = ours([prompt])
        assert got.input_ids[0].tolist() == want, prompt
        assert got.truncated[0] == (len(reference(prompt)["input_ids"]) > 77), prompt


def test_batches_pad_to_longest_like_reference(tokenizers):
    reference, ours = tokenizers
    corpus = prompt_corpus()
    for start in range(0, len(corpus), 16):
        batch = corpus[start : start + 16]
        want = np.array(reference(batch, padding=True, truncation=True, max_length=77)["input_ids"])
        got = ours(batch).input_ids
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, want)


def test_truncation_keeps_end_token_and_pooling_position(tokenizers):
    _, ours = tokenizers
    ids = ours(["word " * 200]).input_ids[0]
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
    assert int(np.argmax(ids)) == 76  # the tower pools at argmax = the (only) end token
