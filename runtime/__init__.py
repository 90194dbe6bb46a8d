"""PickScore lean runtime: tokenizer, preprocessing, backends and scorer. Imports neither torch nor transformers."""

from .errors import ArtifactError, BackendUnavailableError, ImageError, PickScoreError, PromptError
from .scorer import ImageScore, PickScorer, PromptResult

__all__ = [
    "ArtifactError",
    "BackendUnavailableError",
    "ImageError",
    "ImageScore",
    "PickScoreError",
    "PickScorer",
    "PromptError",
    "PromptResult",
]
__version__ = "0.1.0"
