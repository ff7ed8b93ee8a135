"""How much metadata a vector file may carry: bounded in depth, entries and size while parsing, so
nothing that cannot be stored and served back reaches the database.

Why bounds at all: the metadata becomes the concept's provenance, which every GET of the concept
list serialises. Metadata nested ~300 levels was stored without complaint and then could not be
serialised (pydantic stops at its recursion limit), so `GET /admin/concepts` answered 500 for good.
The limits are far above what real writers emit -- repeng and llama.cpp write three scalar GGUF
keys, our own export six flat keys -- and far below what hurts the API.
"""

from __future__ import annotations

import json
from typing import Any

from auditor.errors import InvalidInputError

MAX_METADATA_DEPTH = 16  # levels of objects and lists; the metadata object itself is level 1
MAX_METADATA_ENTRIES = 1024  # keys of every object plus items of every list, at every level
MAX_METADATA_CHARS = 64 * 1024  # length of the metadata written as JSON
# The most bytes that metadata can take inside a JSON document (a JSON file, a safetensors header):
# an escape writes one character as up to 12 bytes (a surrogate pair, \uD83D\uDE00).
MAX_ESCAPED_METADATA_BYTES = 12 * MAX_METADATA_CHARS


def check_metadata(metadata: dict[str, Any], where: str = "the file's metadata") -> None:
    """Raise InvalidInputError if `metadata` (decoded JSON-like data) is too deep, has too many
    entries, or is too long as JSON text."""
    depth, entries = _depth_and_entries(metadata)
    if depth > MAX_METADATA_DEPTH:
        raise InvalidInputError(f"{where} is nested {depth} levels deep; the limit is {MAX_METADATA_DEPTH}")
    if entries > MAX_METADATA_ENTRIES:
        raise InvalidInputError(f"{where} has {entries} keys and items; the limit is {MAX_METADATA_ENTRIES}")
    # Only now, with depth and entries bounded, is writing it out cheap and free of recursion limits.
    chars = len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), default=str))
    check_metadata_chars(chars, where)


def check_metadata_chars(chars: int, where: str = "the file's metadata") -> None:
    if chars > MAX_METADATA_CHARS:
        raise InvalidInputError(
            f"{where} is {chars:,} characters as JSON, more than the limit of {MAX_METADATA_CHARS:,}"
        )


def _depth_and_entries(value: Any) -> tuple[int, int]:
    """Nesting depth and total entries, walked with an explicit stack (no recursion limit)."""
    deepest = entries = 0
    stack = [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = list(node)
        else:
            continue
        deepest = max(deepest, level)
        entries += len(children)
        stack.extend((child, level + 1) for child in children)
    return deepest, entries
