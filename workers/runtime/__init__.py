"""The served model under TransformerLens hooks."""

from workers.runtime.model import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
