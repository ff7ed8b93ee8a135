"""Auditor's errors. Bad input anywhere derives from probes' InvalidInputError (a ValueError)."""

from probes.errors import InvalidInputError


class AuditorError(Exception):
    """Base for failures that are not the caller's input (model, storage, broker)."""


class ModelLoadError(AuditorError):
    """The configured model could not be found or loaded."""


class FingerprintMismatchError(InvalidInputError):
    """A vector extracted in one model's basis was offered to a different model."""


__all__ = ["AuditorError", "FingerprintMismatchError", "InvalidInputError", "ModelLoadError"]
