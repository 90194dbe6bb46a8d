"""PickScore lean runtime: tokenizer, preprocessing, backends, stages and the scorer facade.

Imports neither torch nor transformers (nor ray, tensorrt or a server framework) unless the feature
that needs them is used.
"""

from .errors import (ArtifactError, BackendUnavailableError, ImageError, InputError, MissingExtraError, NonFiniteError,
                     PickScoreError, PromptError)
from .image_preparer import ImagePreparer, PreparedImage
from .options import DecodeOptions, ScorerOptions
from .pipeline import ScoringPipeline, WorkItem
from .results import ImageScore, PromptResult, RandomWeightsWarning, ResultAssembler
from .scorer import PickScorer
from .text_encoder import EncodedPrompts, TextEncoder

__all__ = [
    "ArtifactError", "BackendUnavailableError", "DecodeOptions", "EncodedPrompts", "ImageError", "ImagePreparer", "ImageScore",
    "InputError", "MissingExtraError", "NonFiniteError", "PickScoreError", "PickScorer", "PreparedImage", "PromptError",
    "PromptResult", "RandomWeightsWarning", "ResultAssembler", "ScorerOptions", "ScoringPipeline", "TextEncoder", "WorkItem",
]
__version__ = "0.2.0"  # the one version: pyproject.toml reads it ([tool.setuptools.dynamic])
