"""Errors a user can act on. Each message names the item or file at fault and, where there is one, the fix."""

from __future__ import annotations

from typing import Any, Mapping


class PickScoreError(Exception):
    """Base class: the CLI prints these as one line and exits 2, without a traceback."""


class ArtifactError(PickScoreError):
    """An artifacts directory is missing, incomplete, tampered with or of an unknown format."""


class BackendUnavailableError(PickScoreError):
    """The requested backend cannot run here (no GPU, precision not exported, engine for another GPU)."""


class MissingExtraError(BackendUnavailableError):
    """An optional dependency is not installed; the message names the pip extra that brings it."""

    def __init__(self, feature: str, module: str, extra: str, hint: str = ""):
        super().__init__(f"{feature} needs {module}, which is not installed: pip install 'pickscore-runtime[{extra}]'"
                         + (f" ({hint})" if hint else ""))
        self.feature, self.module, self.extra = feature, module, extra


class InputError(PickScoreError):
    """Work given on the command line or in an input file cannot be used as a whole (not one row of it)."""


class ImageError(PickScoreError):
    """One input image cannot be decoded or used; `item` names it."""

    def __init__(self, item: str, reason: str, message: str | None = None):
        super().__init__(message or f"image {item}: {reason}")
        self.item = item
        self.reason = reason


class NonFiniteError(ImageError):
    """A tower (or the score) came out NaN or Inf for some items of a batch scored as a whole
    (PickScorer.score_tensors). Nothing else is lost: `scores` holds the batch's result, NaN only at the
    `failed` indices; `reasons` says per failed index which tower failed."""

    def __init__(self, reasons: Mapping[int, str], scores: Any):
        self.failed = sorted(reasons)
        self.reasons = {i: reasons[i] for i in self.failed}
        self.scores = scores
        items = ", ".join(f"#{i}" for i in self.failed)
        listed = "; ".join(f"#{i}: {why}" for i, why in list(self.reasons.items())[:5])
        super().__init__(items, "; ".join(dict.fromkeys(self.reasons.values())),
                         f"{len(self.failed)} of {len(scores)} item(s) could not be scored: {listed}"
                         + (" ..." if len(self.failed) > 5 else "") + " (the other scores are in .scores)")


class PromptError(PickScoreError):
    """One prompt cannot be used (not a string, empty, invalid Unicode, too long)."""


class RewardError(PickScoreError):
    """Some images could not be scored and the reward function was told to raise: a reward function
    never hands a trainer NaN rewards unless asked to (on_error="nan")."""

    @classmethod
    def raise_for(cls, errors: "list[str | None]", on_error: str) -> None:
        failed = {i: e for i, e in enumerate(errors) if e}
        if failed and on_error == "raise":
            raise cls(f"{len(failed)} image(s) could not be scored: "
                      + "; ".join(f"#{i}: {e}" for i, e in list(failed.items())[:5]))
