"""Labelled JSONL text sets: {"text": ..., "label": 0 or 1} per line, with line-numbered errors."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from auditor.errors import InvalidInputError


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    source: str

    @property
    def n_positive(self) -> int:
        return sum(self.labels)


def read_labelled_jsonl(path: str | Path, flip: bool = False, limit: int | None = None) -> LabelledTexts:
    """Read and validate a labelled set. `flip` inverts labels (e.g. negative sentiment as the
    concept). Raises InvalidInputError naming the file and line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"file not found: {path}")
    texts, labels = [], []
    with path.open(encoding="utf-8", errors="strict") as handle:
        try:
            lines = list(handle)
        except UnicodeDecodeError as exc:
            raise InvalidInputError(f"{path} is not valid UTF-8: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or "text" not in row or "label" not in row:
            raise InvalidInputError(f'{path}:{number}: expected an object with "text" and "label"')
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError(f"{path}:{number}: text must be a non-empty string")
        if label not in (0, 1) or isinstance(label, bool):
            raise InvalidInputError(f"{path}:{number}: label must be 0 or 1, got {label!r}")
        texts.append(text)
        labels.append(1 - label if flip else label)
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise InvalidInputError(f"{path} has no rows")
    if len(set(labels)) < 2:
        raise InvalidInputError(f"{path}: every row has label {labels[0]}; AUROC needs both classes")
    return LabelledTexts(texts, labels, str(path))
