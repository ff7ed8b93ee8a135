"""How a concept version is named to people and metrics: `pessimism`, or `pessimism:v2` when
several versions of it are active at once. Formatted and parsed only here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Protocol

VERSION_MARK = ":v"


class Versioned(Protocol):
    name: str
    version: int


def version_label(name: str, version: int) -> str:
    """`name:vN`: one concept version, unambiguously."""
    return f"{name}{VERSION_MARK}{version}"


def display_labels(concepts: Iterable[Versioned]) -> list[str]:
    """The label each concept version is shown under, in order: the bare name when it is the only
    version present, else `name:vN`."""
    concepts = list(concepts)
    count = Counter(c.name for c in concepts)
    return [c.name if count[c.name] == 1 else version_label(c.name, c.version) for c in concepts]


def concept_name(label: str) -> str:
    """The concept name of a label, without its version (bounded metric labels, name filters)."""
    return label.split(VERSION_MARK)[0]


__all__ = ["VERSION_MARK", "concept_name", "display_labels", "version_label"]
