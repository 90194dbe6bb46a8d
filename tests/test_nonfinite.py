"""No NaN leaves the runtime as a result. A tower that returns NaN or Inf for one item (planted into a copy
of the tiny artifacts by helpers.plant_nonfinite: real ONNX graphs on real ONNX Runtime sessions) makes
that item an error naming the tower, and the rest of the batch is still scored, in every path: the CLI,
score_many / score_batch, the embedding calls, score_tensors and the RL reward, the text cache, the
server's protocols, and the Ray job's stages (called directly, without starting Ray)."""

from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import load_quietly, pixel_threshold, plant_nonfinite, preprocessed_means, run_cli, token_id
from pickscore_runtime import ImageError, NonFiniteError, PromptError, WorkItem
from pickscore_runtime.rewards import PickScoreReward, RewardError
from pickscore_runtime.text_cache import cache_stats

ATOL = 2e-5  # fp32 scores move by ~1e-6 with a batch's composition
FP32 = ("--backend", "onnx-cpu", "--precision", "fp32")
POISONED_WORD = "zebra"  # the text tower fails on any prompt holding it


def white(side: int = 64) -> np.ndarray:
    return np.full((side, side, 3), 255, np.uint8)


def noise(seed: int, side: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which Python's own parser accepts."""
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def picks(tiny_artifacts, sample_images) -> dict[str, list]:
    """The brightest verify image is poisoned (with a white array); every other one is spared."""
    means = preprocessed_means(tiny_artifacts, sample_images)
    order = np.argsort(means)
    return {"poisoned": [sample_images[order[-1]]], "spared": [sample_images[i] for i in order[:-1]]}


@pytest.fixture(scope="module")
def poisoned(tiny_artifacts, picks, tmp_path_factory) -> Path:
    """Both towers poisoned: images brighter than the spared ones, prompts holding POISONED_WORD."""
    tmp = tmp_path_factory.mktemp("nonfinite")
    when = pixel_threshold(tiny_artifacts, picks["poisoned"] + [white()], picks["spared"] + [noise(k) for k in range(4)])
    vision = plant_nonfinite(tiny_artifacts, tmp / "vision", tower="vision", when=when)
    return plant_nonfinite(vision, tmp / "both", tower="text", when=token_id(tiny_artifacts, POISONED_WORD))


@pytest.fixture(scope="module")
def scorer(poisoned):
    s = load_quietly(poisoned, hash_check="full")  # the copy's manifest matches its edited tower
    yield s
    s.close()


@pytest.fixture(scope="module")
def clean(tiny_artifacts):
    s = load_quietly(tiny_artifacts, precision="fp32")
    yield s
    s.close()


def assert_scored_like(result, clean_result, poisoned_rows: set[int]) -> None:
    """The poisoned rows are errors naming the vision tower; the others carry the clean scores, and probs
    and ranks over them alone."""
    kept = [j for j in range(len(result.results)) if j not in poisoned_rows]
    for j in poisoned_rows:
        row = result.results[j]
        assert row.score is None and row.prob is None and row.rank is None
        assert "vision tower returned non-finite values" in row.error
    got = np.array([result.results[j].score for j in kept])
    np.testing.assert_allclose(got, clean_result.scores, atol=ATOL)
    np.testing.assert_allclose([result.results[j].prob for j in kept], clean_result.probs, atol=ATOL)
    assert sorted(result.results[j].rank for j in kept) == list(range(1, len(kept) + 1))
    assert result.error is None and np.isnan(result.scores[sorted(poisoned_rows)]).all()


# ---- the CLI -------------------------------------------------------------------------------------
def test_cli_json_names_the_poisoned_image_and_scores_the_rest(poisoned, picks, clean):
    spared = picks["spared"][:3]
    paths = [spared[0], picks["poisoned"][0], *spared[1:]]
    out = run_cli("score", "--artifacts", str(poisoned), *FP32, "--prompt", "a cat", "--json", *map(str, paths))
    assert out.returncode == 1, out.stderr[-3000:]  # some items could not be scored
    doc = strict_json(out.stdout)
    rows = doc["results"]
    assert rows[1]["image"] == str(picks["poisoned"][0])
    assert rows[1]["score"] is None and rows[1]["prob"] is None and "non-finite" in rows[1]["error"]
    others = [rows[j] for j in (0, 2, 3)]
    assert all(math.isfinite(r["score"]) and "error" not in r for r in others)
    assert sum(r["prob"] for r in others) == pytest.approx(1.0, abs=1e-6)
    want = clean.score("a cat", spared)
    np.testing.assert_allclose([r["score"] for r in others], want.scores, atol=ATOL)
    assert "1 item(s) could not be scored" in out.stderr


def test_cli_jsonl_rows_stay_json_with_a_poisoned_prompt_and_image(poisoned, picks, tmp_path):
    spared = [str(p) for p in picks["spared"][:2]]
    work = tmp_path / "work.jsonl"
    work.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "prompt": "a cat", "images": [spared[0], str(picks["poisoned"][0]), spared[1]]},
        {"id": "b", "prompt": f"a {POISONED_WORD} at noon", "images": spared},
        {"id": "c", "prompt": "a dog", "image": spared[1]}]) + "\n")
    out = run_cli("score", "--artifacts", str(poisoned), *FP32, "--input", str(work))
    assert out.returncode == 1, out.stderr[-3000:]
    rows = [strict_json(line) for line in out.stdout.splitlines()]
    assert [r["id"] for r in rows] == ["a", "a", "a", "b", "b", "c"]
    assert rows[1]["score"] is None and "vision tower returned non-finite" in rows[1]["error"]
    assert rows[0]["prob"] + rows[2]["prob"] == pytest.approx(1.0, abs=1e-6)
    assert all(r["score"] is None and "text tower returned non-finite" in r["error"] for r in rows[3:5])
    assert math.isfinite(rows[5]["score"]) and rows[5]["error"] is None


# ---- the Python API ------------------------------------------------------------------------------
def test_score_many_and_score_batch_fail_only_the_poisoned_items(scorer, clean, picks):
    spared, bad = picks["spared"], picks["poisoned"][0]
    lists = [[spared[0], bad, spared[1], spared[2]], [bad], spared[3:6], [white(), noise(1)]]
    results = scorer.score_batch(["a cat", "a dog", "a red car", "a fish"], lists)
    assert_scored_like(results[0], clean.score("a cat", [spared[0], spared[1], spared[2]]), {1})
    assert results[1].n_failed == 1 and results[1].results[0].score is None  # every image poisoned: no probs at all
    assert_scored_like(results[2], clean.score("a red car", spared[3:6]), set())
    assert_scored_like(results[3], clean.score("a fish", [noise(1)]), {0})
    streamed = list(scorer.score_many((WorkItem(p, imgs, key=k) for k, (p, imgs) in
                                       enumerate(zip(["a cat", "a dog"], lists[:2]))), batch_size=2))
    assert [r.key for r in streamed] == [0, 1]
    assert_scored_like(streamed[0], clean.score("a cat", [spared[0], spared[1], spared[2]]), {1})
    single = scorer.score("a cat", np.stack([noise(2), white(), noise(3)]))  # a tensor batch as one comparison
    assert_scored_like(single, clean.score("a cat", np.stack([noise(2), noise(3)])), {1})
    assert all(r.rank is not None for r in single.ranked()[:2])


def test_embedding_calls_raise_naming_the_item(scorer, picks):
    with pytest.raises(ImageError, match=r"image #1 \(ndarray\): the vision tower returned non-finite") as e:
        scorer.embed_images([noise(1), white()])
    assert e.value.item == "#1 (ndarray)"
    with pytest.raises(ImageError, match=r"#2 \(tensor\): the vision tower returned non-finite"):
        scorer.embed_tensors(np.stack([noise(1), noise(2), white()]))
    with pytest.raises(PromptError, match=rf"prompt #1 \('a {POISONED_WORD}'\): the text tower returned non-finite"):
        scorer.embed_text(["a cat", f"a {POISONED_WORD}"])
    assert np.isfinite(scorer.embed_images([noise(1), *picks["spared"][:2]])).all()


def test_score_tensors_raises_naming_the_items_with_the_partial_scores(scorer, clean):
    batch = np.stack([noise(1), white(), noise(2), noise(3)])
    prompts = ["a cat", "a cat", f"a {POISONED_WORD}", "a dog"]
    with pytest.raises(NonFiniteError) as e:
        scorer.score_tensors(prompts, batch)
    err = e.value
    assert isinstance(err, ImageError) and err.failed == [1, 2]
    assert "#1: the vision tower returned non-finite" in str(err) and "#2: the text tower returned non-finite" in str(err)
    assert err.scores.dtype == np.float32 and err.scores.shape == (4,)
    assert np.isnan(err.scores[[1, 2]]).all() and np.isfinite(err.scores[[0, 3]]).all()
    want = clean.score_tensors(["a cat", "a dog"], batch[[0, 3]])
    np.testing.assert_allclose(err.scores[[0, 3]], want, atol=ATOL)
    np.testing.assert_allclose(scorer.score_tensors("a cat", batch[[0, 2]]), clean.score_tensors("a cat", batch[[0, 2]]),
                               atol=ATOL)  # a batch without a poisoned item is scored as usual


def test_inf_is_caught_like_nan(tiny_artifacts, picks, tmp_path):
    when = pixel_threshold(tiny_artifacts, [white()], [noise(1)])
    with load_quietly(plant_nonfinite(tiny_artifacts, tmp_path / "inf", when=when, value=math.inf)) as s:
        with pytest.raises(NonFiniteError, match="#0: the vision tower") as e:
            s.score_tensors("a cat", np.stack([white(), noise(1)]))
        assert e.value.failed == [0] and np.isfinite(e.value.scores[1])
        row = s.score("a cat", [white(), noise(1)]).results[0]
        assert row.score is None and "vision tower returned non-finite" in row.error


def test_reward_function_raises_or_gives_nan_only_at_the_poisoned_items(scorer, clean, tmp_path):
    torch = pytest.importorskip("torch")
    u8 = np.stack([noise(1), white(), noise(2)])
    ddpo = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255  # what DDPO hands over
    prompts = ["a cat", "a dog", f"a {POISONED_WORD}"]
    with pytest.raises(RewardError, match=r"2 image\(s\).*#1: the vision tower.*#2: the text tower"):
        PickScoreReward(scorer)(ddpo, prompts)
    rewards, info = PickScoreReward(scorer, on_error="nan")(ddpo, prompts)
    assert np.isfinite(rewards[0]) and np.isnan(rewards[1:]).all()
    assert info["errors"][0] is None and "vision tower" in info["errors"][1] and "text tower" in info["errors"][2]
    np.testing.assert_allclose(rewards[0], clean.score_tensors("a cat", u8[:1])[0], atol=ATOL)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    listed = [u8[0], u8[1], str(broken), u8[2]]  # the list path: decoding errors and tower errors together
    with pytest.raises(RewardError, match=r"#1: the vision tower.*#2: cannot decode.*#3: the text tower"):
        PickScoreReward(scorer)(listed, ["a cat", "a dog", "a cat", f"a {POISONED_WORD}"])
    rewards, info = PickScoreReward(scorer, on_error="nan")(listed, ["a cat", "a dog", "a cat", f"a {POISONED_WORD}"])
    assert np.isfinite(rewards[0]) and np.isnan(rewards[1:]).all()
    assert [e is None for e in info["errors"]] == [True, False, False, False]
    assert "cannot decode" in info["errors"][2] and "text tower" in info["errors"][3]


# ---- the text stage and its cache ------------------------------------------------------------------
def test_a_poisoned_prompt_fails_only_its_item_and_is_never_cached(poisoned, picks, tmp_path, clean):
    cache = tmp_path / "text.sqlite"
    spared = picks["spared"][:2]
    items = [("a cat", spared), (f"a {POISONED_WORD} at noon", spared), ("a dog", spared)]
    for run in range(2):  # the second run reads the cache file the first one left
        with load_quietly(poisoned, text_cache_file=cache) as s:
            results = list(s.score_many(items))
        assert results[1].error == "the text tower returned non-finite values (NaN or Inf) for this prompt"
        assert all(r.score is None for r in results[1].results) and results[1].n_failed == 2
        for r, prompt in zip((results[0], results[2]), ("a cat", "a dog")):
            assert r.error is None and np.isfinite(r.scores).all()
            np.testing.assert_allclose(r.scores, clean.score(prompt, spared).scores, atol=ATOL)
        assert [ns["entries"] for ns in cache_stats(cache)["namespaces"]] == [2]  # "a cat", "a dog"; never the NaN


# ---- the server ----------------------------------------------------------------------------------
def test_server_protocols_name_the_poisoned_items(poisoned, picks, tmp_path):
    from test_server import b64, data_url, post, running

    spared = [p.read_bytes() for p in picks["spared"] if p.stat().st_size < 150_000][:3]
    bad = picks["poisoned"][0].read_bytes()
    assert len(spared) == 3
    with running(poisoned, tmp_path, *FP32, "--max-body-mb", "8") as server:
        r = post(server.url + "/v1/score", json={"items": [
            {"prompt": "a cat", "images": [b64(spared[0]), b64(bad), b64(spared[1])]},
            {"prompt": f"a {POISONED_WORD}", "images": [b64(spared[2])]}]})
        assert r.status_code == 200, r.text
        first, second = strict_json(r.text)
        assert first["results"][1]["score"] is None and "vision tower returned non-finite" in first["results"][1]["error"]
        assert first["results"][0]["prob"] + first["results"][2]["prob"] == pytest.approx(1.0, abs=1e-6)
        assert "text tower returned non-finite" in second["error"] and second["results"][0]["score"] is None

        r = post(server.url + "/v1/rewards", content=pickle.dumps(
            {"images": [spared[0], bad, spared[1]], "prompts": ["a cat", "a cat", f"a {POISONED_WORD}"]}))
        assert r.status_code == 200, r.text
        answer = pickle.loads(r.content)  # NaN with its reason: the rewards protocol's documented contract
        assert math.isfinite(answer["scores"][0]) and math.isnan(answer["scores"][1]) and math.isnan(answer["scores"][2])
        assert answer["errors"][0] is None and "vision tower" in answer["errors"][1] and "text tower" in answer["errors"][2]

        r = post(server.url + "/v1/embeddings", json={"input": ["a cat", data_url(spared[0]), data_url(bad)]})
        assert r.status_code == 422 and "input[2]: the vision tower returned non-finite" in r.json()["error"]["message"]
        r = post(server.url + "/v1/embeddings", json={"input": ["a cat", f"a {POISONED_WORD}"]})
        assert r.status_code == 422 and "input[1]: the text tower returned non-finite" in r.json()["error"]["message"]
        r = post(server.url + "/v1/embeddings", json={"input": ["a cat", data_url(spared[0])]})
        assert r.status_code == 200 and all(math.isfinite(x) for d in strict_json(r.text)["data"] for x in d["embedding"])

        r = post(server.url + "/v1/rerank", json={"query": "a cat", "documents": [data_url(spared[0]), data_url(bad)]})
        assert r.status_code == 422 and "documents[1]: the vision tower" in r.json()["error"]["message"]
        r = post(server.url + "/v1/rerank", json={"query": f"a {POISONED_WORD}", "documents": [data_url(spared[0])]})
        assert r.status_code == 422 and "query: the text tower" in r.json()["error"]["message"]


# ---- the Ray job's stages, called in process -------------------------------------------------------
def test_ray_stages_make_nonfinite_scores_image_errors(poisoned, picks, clean):
    pytest.importorskip("ray.data")
    import pyarrow as pa

    from pickscore_runtime import ScorerOptions
    from pickscore_runtime.scale import sources
    from pickscore_runtime.scale.stages import IMAGE_ERROR, SCORE, ImageScorer, mark_rows, prepare_images, rank_comparison

    spared = [str(p) for p in picks["spared"][:2]]
    bad = str(picks["poisoned"][0])
    work = [("a cat", spared[0]), ("a cat", bad), ("a cat", spared[1]), (f"a {POISONED_WORD}", spared[0])]
    rows = [{sources.KEY: sources.row_key(0, k, 0), sources.FILE: 0, sources.LOCAL_ROW: k, sources.IMAGE_INDEX: 0,
             sources.LINE: k + 1, "id": str(k + 1), "prompt": prompt, "group": None,
             sources.COMPARISON: sources.comparison_key(None, prompt), "image": image, sources.IMAGE_BYTES: None,
             "error": None} for k, (prompt, image) in enumerate(work)]
    table = pa.Table.from_pylist(rows, schema=pa.schema([(name, getattr(pa, kind)()) for name, kind in sources.WORK_SCHEMA]))
    manifest = json.loads((poisoned / "manifest.json").read_text())
    prepared = prepare_images(table, manifest["preprocessing"], {}, "/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actor = ImageScorer(str(poisoned), ScorerOptions(backend="onnx-cpu", precision="fp32", hash_check="size"))
    scored = actor(prepared)
    assert scored.column(SCORE).to_pylist()[1] is None and scored.column(SCORE).to_pylist()[3] is None
    reasons = scored.column(IMAGE_ERROR).to_pylist()
    assert reasons[0] is None and "vision tower" in reasons[1] and reasons[2] is None and "text tower" in reasons[3]

    marked = mark_rows(scored, [0], {})
    cats = rank_comparison(marked.slice(0, 3)).to_pylist()
    assert cats[1]["score"] is None and "vision tower returned non-finite" in cats[1]["error"]
    np.testing.assert_allclose([cats[0]["score"], cats[2]["score"]], clean.score("a cat", spared).scores, atol=ATOL)
    assert cats[0]["prob"] + cats[2]["prob"] == pytest.approx(1.0, abs=1e-6)
    zebra = rank_comparison(marked.slice(3, 1)).to_pylist()
    assert zebra[0]["score"] is None and "text tower returned non-finite" in zebra[0]["error"]
