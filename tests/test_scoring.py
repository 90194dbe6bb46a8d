"""End-to-end scoring on the tiny random CLIP, asserted against the PyTorch reference."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from helpers import load_quietly
from pickscore_export.samples import PROMPTS
from pickscore_runtime import PickScorer, PromptError


def test_score_matches_reference(tiny_scorer, tiny_reference, sample_images, tolerances):
    prompt = PROMPTS[1]
    result = tiny_scorer.score(prompt, [str(p) for p in sample_images])
    ref_scores, ref_probs = tiny_reference.calc_probs(tiny_reference.text_embeddings([prompt])[0],
                                                      tiny_reference.image_embeddings(sample_images))
    assert np.abs(result.scores - ref_scores).max() <= tolerances["fp32"]["max_abs_score_diff"]
    assert np.abs(result.probs - ref_probs).max() <= tolerances["fp32"]["max_abs_prob_diff"]
    assert [r.rank for r in result.results] == list(np.argsort(np.argsort(-ref_scores)) + 1)
    assert result.probs.sum() == pytest.approx(1.0, abs=1e-5)
    assert result.random_weights and "RANDOM WEIGHTS" in repr(result)


def test_embeddings_are_unit_norm_and_batch_independent(tiny_scorer, sample_images):
    embs = tiny_scorer.embed_images([str(p) for p in sample_images[:10]])
    assert embs.shape == (10, 64) and embs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1, atol=1e-5)
    alone = tiny_scorer.embed_images([str(sample_images[9])])
    np.testing.assert_allclose(alone[0], embs[9], atol=1e-6)
    text = tiny_scorer.embed_text(["a", PROMPTS[7]])  # padded together vs. alone
    np.testing.assert_allclose(text[0], tiny_scorer.embed_text(["a"])[0], atol=1e-6)


def test_all_input_kinds_agree(tiny_scorer, sample_images):
    path = sample_images[2]
    data = path.read_bytes()
    pil = Image.open(io.BytesIO(data))
    array = np.asarray(Image.open(path).convert("RGB"))
    embs = tiny_scorer.embed_images([str(path), path, data, pil, array])
    for row in embs[1:]:
        np.testing.assert_allclose(row, embs[0], atol=1e-6)


def test_bad_image_is_reported_and_others_still_scored(tiny_scorer, sample_images, tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    good = [str(p) for p in sample_images[:3]]
    result = tiny_scorer.score("a cat", [good[0], str(corrupt), good[1], str(tmp_path / "missing.png"), good[2]])
    errors = {r.image: r.error for r in result.results if r.error}
    assert set(errors) == {str(corrupt), str(tmp_path / "missing.png")}
    assert "cannot decode" in errors[str(corrupt)] and "not found" in errors[str(tmp_path / "missing.png")]
    clean = tiny_scorer.score("a cat", good)
    scored = [r for r in result.results if r.error is None]
    np.testing.assert_allclose([r.score for r in scored], clean.scores, atol=1e-5)
    np.testing.assert_allclose([r.prob for r in scored], clean.probs, atol=1e-6)  # softmax over the good ones
    assert sorted(r.rank for r in scored) == [1, 2, 3]


def test_score_batch_keeps_prompt_errors_per_item(tiny_scorer, sample_images):
    imgs = [str(p) for p in sample_images[:2]]
    results = tiny_scorer.score_batch(["a dog", "", "a dog", None], [imgs, imgs, imgs[:1], imgs])
    assert results[0].error is None and results[2].error is None
    assert "empty" in results[1].error and "prompt #1" in results[1].error
    assert "must be a string" in results[3].error
    assert all(r.error == "prompt not scored" for r in results[1].results)
    assert results[2].results[0].score == pytest.approx(results[0].results[0].score, abs=1e-6)


def test_single_prompt_errors_raise(tiny_scorer):
    with pytest.raises(PromptError, match="empty"):
        tiny_scorer.score("   ", [])


def test_long_prompt_is_truncated_like_reference(tiny_scorer, tiny_reference, sample_images):
    result = tiny_scorer.score(PROMPTS[7], [str(sample_images[0])])
    assert result.truncated and result.to_json()["truncated"] is True
    ref = tiny_reference.text_embeddings([PROMPTS[7]])[0]
    np.testing.assert_allclose(tiny_scorer.embed_text([PROMPTS[7]])[0], ref, atol=1e-5)


def test_random_weights_are_loud(tiny_artifacts):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = PickScorer.load(tiny_artifacts, backend="onnx-cpu")
    assert scorer.random_weights
    assert any("RANDOM WEIGHTS" in str(w.message) for w in caught)
    assert scorer.score("x", []).to_json()["random_weights"] is True


def test_int8_scores_within_its_tolerance(tiny_artifacts, tiny_reference, sample_images, tolerances):
    scorer = load_quietly(tiny_artifacts, precision="int8")
    assert scorer.backend.precision == "int8"
    result = scorer.score(PROMPTS[0], [str(p) for p in sample_images])
    ref_scores, _ = tiny_reference.calc_probs(tiny_reference.text_embeddings([PROMPTS[0]])[0],
                                              tiny_reference.image_embeddings(sample_images))
    assert np.abs(result.scores - ref_scores).max() <= tolerances["int8"]["max_abs_score_diff"]
    scorer.close()
