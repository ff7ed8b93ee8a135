"""Auditor: monitor what a served language model represents internally."""

__version__ = "0.1.0"
