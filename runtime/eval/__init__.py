"""Evaluation with PickScore, as `pickscore eval` runs it and as a training script can call it on its own
samples every N steps:

- `evaluate_preference(scorer, data, validation=... | tie_threshold=...)`: the Pick-a-Pic paper's preference
  accuracy (ties, threshold chosen on validation, ties excluded, bootstrap CI) on Pick-a-Pic-format data;
- `compare_generations(scorer, manifest_generations(...) | folder_generations(...) | generations_from(rows))`:
  mean PickScore per model and pairwise win rates with CIs, as `pickscore eval compare`;
- `preference_report` and friends (eval.accuracy) on pair scores the caller already has.
"""

from .accuracy import PreferenceReport, preference_report
from .compare import compare_generations, compare_scores, folder_generations, generations_from, manifest_generations
from .pickapic import Split
from .preference import PreferenceResult, evaluate_preference, preference_json
from .scoring import read_scores, score_work

__all__ = ["PreferenceReport", "PreferenceResult", "Split", "compare_generations", "compare_scores", "evaluate_preference",
           "folder_generations", "generations_from", "manifest_generations", "preference_json", "preference_report",
           "read_scores", "score_work"]
