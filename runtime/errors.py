"""Errors a user can act on. Each message names the item or file at fault and, where there is one, the fix."""


class PickScoreError(Exception):
    """Base class: the CLI prints these as one line and exits 2, without a traceback."""


class ArtifactError(PickScoreError):
    """An artifacts directory is missing, incomplete, tampered with or of an unknown format."""


class ModelSourceError(PickScoreError):
    """The model (weights, config or tokenizer files) cannot be loaded from the given source."""


class BackendUnavailableError(PickScoreError):
    """The requested backend cannot run here (library missing, no GPU, precision not exported)."""


class ImageError(PickScoreError):
    """One input image cannot be decoded or used; `item` names it."""

    def __init__(self, item: str, reason: str):
        super().__init__(f"image {item}: {reason}")
        self.item = item
        self.reason = reason


class PromptError(PickScoreError):
    """One prompt cannot be used (empty, not a string)."""
