"""Typed errors raised by the scoring core.

The tree is small on purpose; the shell maps each class to one HTTP status in a single module::

    ScoringError                 base of everything raised on purpose by scoring/
    ├── SpecInvalid              a pipeline spec failed validation (names the bad field)
    ├── InvalidInput             a value passed in cannot be scored (e.g. a naive datetime)
    │   └── TrainingDataInvalid  rows/labels cannot be trained on (length mismatch, one class...)
    ├── ArtifactIncompatible     an artifact does not fit this installation or this spec
    │                            (sklearn version, feature definitions, format)
    └── ModelNotCompilable       the model kind cannot be compiled for serving (e.g. gradient boosting)
"""

from __future__ import annotations

__all__ = [
    "ArtifactIncompatible",
    "InvalidInput",
    "ModelNotCompilable",
    "ScoringError",
    "SpecInvalid",
    "TrainingDataInvalid",
]


class ScoringError(Exception):
    """Base class of every error the scoring core raises on purpose."""


class SpecInvalid(ScoringError):
    """A pipeline spec failed validation.

    ``errors`` holds one ``{"loc": "rules.fit.rules[0].when.op", "msg": "..."}`` entry per problem,
    so an API can return all of them at once.
    """

    def __init__(self, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.errors: list[dict[str, str]] = errors or []


class InvalidInput(ScoringError):
    """A value handed to the core cannot be scored (naive datetime, wrong shape...)."""


class TrainingDataInvalid(InvalidInput):
    """Rows and labels cannot be trained on (length mismatch, labels not 0/1, a class too small)."""


class ArtifactIncompatible(ScoringError):
    """The artifact cannot be used here: other sklearn version, other features, unknown format."""


class ModelNotCompilable(ScoringError):
    """The trained model cannot be compiled into a scorecard (only linear models can)."""
