"""The paper's preference accuracy (runtime/eval/accuracy.py) on pair scores whose expected accuracy is known by
construction, and against the reference script's own per-example functions (eval_preference_predictor.py,
get_label / get_pred / calc_score / calc_acc, re-typed below as they are written there)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pickscore_runtime.eval.accuracy import THRESHOLDS, accuracy, choose_threshold, label_kinds, pair_probs, preference_report


# ---- the reference, as written ----------------------------------------------------------------------
def get_label(example):
    if example["label_0"] == 0.5:
        label = "tie"
    elif example["label_0"] == 1:
        label = "0"
    else:
        label = "1"
    return label


def get_pred(prob_0, prob_1, threshold):
    if abs(prob_1 - prob_0) <= threshold:
        pred = "tie"
    elif prob_0 > prob_1:
        pred = "0"
    else:
        pred = "1"
    return pred


def calc_score(label, pred):
    if label == pred:
        score = 1
    elif "tie" in [label, pred]:
        score = 0.5
    else:
        score = 0
    return score


def calc_acc(probs, ds, threshold):
    res = []
    for example, (prob_0, prob_1) in zip(ds, probs):
        res.append(calc_score(get_label(example), get_pred(prob_0, prob_1, threshold)))
    return sum(res) / len(res)


def softmax_pairs(scores):
    e = np.exp(scores - scores.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ---- a split whose accuracy is known by construction --------------------------------------------------
def planted_split(seed: int, decisive: int, flipped: int, close: int, ties: int):
    """`decisive` pairs scored far apart and labelled as the scores say, `flipped` of them labelled the
    other way, `close` pairs scored within 0.05 of each other (p within ~0.0125) labelled decisively, and
    `ties` decisive-score pairs labelled as ties. Returns scores [N, 2] and label_0."""
    rng = np.random.default_rng(seed)
    n = decisive + close
    base = rng.normal(20, 1, n)
    gap = np.concatenate([rng.uniform(2, 4, decisive), rng.uniform(-0.05, 0.05, close)])
    sign = rng.choice([-1, 1], n)
    scores = np.stack([base, base + sign * gap], 1)
    winner_is_0 = scores[:, 0] > scores[:, 1]
    label_0 = np.where(winner_is_0, 1.0, 0.0)
    label_0[:flipped] = 1 - label_0[:flipped]
    label_0[flipped:flipped + ties] = 0.5
    return scores, label_0


def test_accuracy_equals_the_planted_value_at_every_threshold_and_the_reference():
    decisive, flipped, close, ties = 60, 9, 10, 6
    scores, label_0 = planted_split(0, decisive, flipped, close, ties)
    p0, p1 = pair_probs(scores)
    labels = label_kinds(label_0)
    right = decisive - flipped - ties
    # threshold 0: no predicted ties; close pairs are called one way, each right iff its sign matches its label
    close_right = int(((p0[decisive:] > p1[decisive:]) == (label_0[decisive:] == 1)).sum())
    want_0 = (right + ties * 0.5 + close_right) / (decisive + close)
    # threshold 0.1: close pairs (|p1 - p0| < 0.1) become predicted ties (0.5 each); decisive pairs stay called
    want_01 = (right + ties * 0.5 + close * 0.5) / (decisive + close)
    assert accuracy(p0, p1, labels, 0) == pytest.approx(want_0)
    assert accuracy(p0, p1, labels, 0.1) == pytest.approx(want_01)
    # threshold 1: every pair is a predicted tie: ties score 1, the rest 0.5
    assert accuracy(p0, p1, labels, 1) == pytest.approx((ties + 0.5 * (decisive + close - ties)) / (decisive + close))
    ds = [{"label_0": x} for x in label_0]
    probs = softmax_pairs(scores)
    for t in THRESHOLDS:
        assert accuracy(p0, p1, labels, t) == pytest.approx(calc_acc(probs, ds, t))


def test_the_threshold_is_chosen_on_validation_and_applied_to_test():
    # validation: many near-equal pairs labelled as ties make a positive threshold pay
    val_scores, val_label_0 = planted_split(1, 40, 4, 30, 0)
    val_label_0[40:] = 0.5  # every close pair is a human tie
    threshold, accuracies = choose_threshold(*pair_probs(val_scores), label_kinds(val_label_0))
    probs, ds = softmax_pairs(val_scores), [{"label_0": x} for x in val_label_0]
    reference = [calc_acc(probs, ds, t) for t in THRESHOLDS]
    assert accuracies == pytest.approx(reference) and threshold == THRESHOLDS[int(np.argmax(reference))]
    assert threshold > 0  # the planted ties are found

    test_scores, test_label_0 = planted_split(2, 50, 5, 8, 4)
    report = preference_report(test_scores, test_label_0, validation=(val_scores, val_label_0))
    assert report.tie_threshold == threshold and report.n_evaluated == 58
    assert report.accuracy == pytest.approx(calc_acc(softmax_pairs(test_scores), [{"label_0": x} for x in test_label_0],
                                                     threshold))
    assert report.label_counts == {"0": int((test_label_0 == 1).sum()), "1": int((test_label_0 == 0).sum()), "tie": 4}
    decided = test_label_0 != 0.5
    assert report.accuracy_ties_excluded == pytest.approx(
        calc_acc(softmax_pairs(test_scores[decided]), [{"label_0": x} for x in test_label_0[decided]], 0))
    low, high = report.interval
    assert low <= report.accuracy <= high and 0 < high - low < 0.5
    fixed = preference_report(test_scores, test_label_0, tie_threshold=threshold)
    assert fixed.to_json() == dict(report.to_json(), validation_accuracies=None)  # a seeded bootstrap: the same interval


def test_bad_input_is_named():
    scores, label_0 = planted_split(3, 5, 0, 0, 0)
    label_0[3] = 0.7
    with pytest.raises(ValueError, match="pair #3: label_0 must be 0, 0.5 or 1, got 0.7"):
        preference_report(scores, label_0, tie_threshold=0)
    scores[2, 1] = np.nan
    with pytest.raises(ValueError, match="pair #2 has a non-finite score"):
        pair_probs(scores)
    with pytest.raises(ValueError, match="empty split"):
        preference_report(np.zeros((0, 2)), [], tie_threshold=0)
    with pytest.raises(ValueError, match="not both"):
        preference_report(np.zeros((1, 2)), [1.0])


# ---- the pieces around the metric: rows read, pairs flipped, models compared ---------------------------
def split_scores(scores, label_0, errors=None, precision="fp32"):
    from pickscore_runtime.eval.preference import SplitScores

    n = len(label_0)
    return SplitScores("test", np.arange(1, n + 1), [f"caption {i}" for i in range(n)], np.asarray(scores, float),
                       np.asarray(label_0, float), errors or {}, precision)


def test_flipped_pairs_are_exactly_those_whose_prediction_changes():
    from pickscore_runtime.eval.preference import evaluate_scores, flipped_pairs, preference_json

    base = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.9], [0.0, 3.0], [5.0, 1.0]])
    moved = base.copy()
    moved[1] = [2.0, 0.0]  # row 2 changes side
    moved[2] = [0.0, 1.0]  # row 3: a tie at threshold 0.1 before (|dp| = 0.05), "1" after
    labels = [1, 0, 0.5, 0, 1]
    a = evaluate_scores(split_scores(base, labels), None, 0.1)
    b = evaluate_scores(split_scores(moved, labels, {5: "row 5: broken"}, "int8"), None, 0.1)
    flips = flipped_pairs(a, b)
    assert [f["row"] for f in flips] == [2, 3]
    assert flips[0]["prediction"] == {"fp32": "1", "int8": "0"} and flips[1]["prediction"] == {"fp32": "tie", "int8": "1"}
    doc = preference_json([a, b], "d", None)
    assert doc["accuracy"] == a.report.accuracy and doc["by_precision"][1]["flipped"] == flips
    assert doc["by_precision"][1]["n_errors"] == 1 and doc["by_precision"][1]["n_evaluated"] == 4  # row 5 left out


def test_pickapic_rows_name_what_is_wrong():
    from pickscore_runtime.eval.pickapic import label_of, pair_of

    assert label_of({"label_0": 1.0, "label_1": 0.0}, 3).label_0 == 1.0
    assert label_of({"label_0": 0.5}, 3).error is None
    for values, why in (({"label_0": None}, "no label_0"), ({"label_0": 0.3}, "got 0.3"), ({"label_0": True}, "got True"),
                        ({"label_0": 1.0, "label_1": 1.0}, "label_0 + label_1 must be 1"),
                        ({"label_0": 1.0, "has_label": False}, "has_label is false")):
        assert why in label_of(values, 7).error and label_of(values, 7).error.startswith("row 7: ")
    ok = pair_of({"caption": "c", "jpg_0": b"x", "jpg_1": {"bytes": None, "path": "a.png"}, "image_0_uid": "u"}, 2)
    assert ok.row.error is None and ok.images == [b"x", "a.png"] and ok.row.images == ["u", "a.png"]
    bad = pair_of({"caption": 5, "jpg_0": 7, "jpg_1": None}, 4)
    assert bad.row.error == "row 4: the caption is a int, not text; jpg_0 is not image bytes or a path (int); jpg_1 holds no image"


def test_compare_scores_plants_and_counts():
    from pickscore_runtime.eval.compare import compare_scores

    def row(model, prompt, score, error=None):
        return {"id": f"{model}{prompt}", "row": 0, "group": model, "prompt": prompt, "image": "i", "score": score,
                "prob": None, "error": error}

    rows = [row("a", "p1", 3.0), row("a", "p1", 1.0), row("b", "p1", 2.0), row("a", "p2", 1.0), row("b", "p2", 1.0),
            row("a", "p3", 0.0), row("b", "p3", None, "broken")]
    best = compare_scores(rows, "best")
    win = best["win_rates"][0]
    assert (win["model"], win["versus"], win["n_prompts"], win["win_rate"]) == ("a", "b", 2, 0.75)  # p1 won, p2 tied
    assert compare_scores(rows, "mean")["win_rates"][0]["win_rate"] == 0.5  # p1: mean 2.0 ties b's 2.0
    models = {m["model"]: m for m in best["models"]}
    assert models["a"]["mean_score"] == pytest.approx((2.0 + 1.0 + 0.0) / 3) and models["a"]["n_images"] == 4
    assert models["b"]["missing"] == [{"prompt": "p3", "why": "every image failed"}] and best["n_errors"] == 1


def test_prompt_files_and_ids_match_what_names_mean(tmp_path):
    from pickscore_runtime.eval.compare import match_prompt, read_prompts
    from pathlib import Path

    txt = tmp_path / "p.txt"
    txt.write_bytes("\ufeffa cat\r\nrain\u2028and snow\x0c falling\n\na fox\n".encode())
    assert read_prompts(txt) == {"0": "a cat", "1": "rain\u2028and snow\x0c falling", "3": "a fox"}  # \n only ends a line
    prompts = {"cat": "", "cat_hat": "", "12": "", "dog": "", "dog_1": ""}
    assert match_prompt(Path("cat_hat.png"), prompts) == ("cat_hat", None)
    assert match_prompt(Path("cat_3.png"), prompts) == ("cat", None)
    assert match_prompt(Path("00012_0.png"), prompts) == ("12", None)
    assert match_prompt(Path("cat_hat") / "x.png", prompts) == ("cat_hat", None)
    key, why = match_prompt(Path("dog_1.png"), prompts)
    assert "both prompt ids 'dog_1' and 'dog' match" in why
    assert match_prompt(Path("\u00b2.png"), prompts)[1] == "prompt id '\u00b2' is not in the prompts file"  # no int() crash


def test_unreadable_values_are_named_rows_not_crashes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pickscore_runtime.eval.compare import compare_scores
    from pickscore_runtime.eval.pickapic import Split, label_of
    from pickscore_runtime.work_io.inputs import image_value

    bad_utf8 = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(b"\x00\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00"),
                                                      pa.py_buffer(b"a\xff")])
    table = pa.table({"caption": bad_utf8, "jpg_0": pa.array([b"x", b"y"]), "jpg_1": pa.array([b"x", b"y"]),
                      "label_0": pa.array([1.0, 0.0])})
    pq.write_table(table, tmp_path / "t.parquet")
    split = Split(tmp_path / "t.parquet", "test")
    pairs = list(split.pairs())
    assert pairs[0].row.error is None and "'caption' column holds text that is not valid UTF-8" in pairs[1].row.error
    assert image_value({"bytes": "abc", "path": None}, 0) == ({"bytes": "abc", "path": None}, None)
    assert image_value({"bytes": 2**40, "path": None}, 0)[1] is None  # never bytes(2**40)
    assert "has_label must be true or false" in label_of({"label_0": 1.0, "has_label": "false"}, 1).error
    rows = [{"id": "1", "row": 1, "group": "a", "prompt": "p", "image": "i", "score": float("nan"), "prob": None, "error": None},
            {"id": "2", "row": 2, "group": "b", "prompt": "p", "image": "i", "score": 1.0, "prob": None, "error": None},
            {"id": "3", "row": 3, "group": "", "prompt": "q", "image": "i", "score": None, "prob": None,
             "error": "row 3: no model"}]
    doc = compare_scores(rows)
    assert doc["n_errors"] == 2 and [m["model"] for m in doc["models"]] == ["a", "b"] and doc["n_prompts"] == 1
    assert doc["models"][0]["missing"] == [{"prompt": "p", "why": "every image failed"}]
    json.dumps(doc, allow_nan=False)
