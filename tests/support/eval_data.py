"""The labelled public text in ../shared/eval (see its README): probe tests read it, never build
vectors from it."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

EVAL_DIR = Path(__file__).resolve().parents[3] / "shared" / "eval"
if not EVAL_DIR.is_dir():  # CI clones the repo with shared/ beside it; allow an override
    EVAL_DIR = Path(os.environ.get("AUDITOR_EVAL_DIR", "../shared/eval")).resolve()


def eval_rows(name: str, n: int, seed: int = 0) -> list[dict]:
    path = EVAL_DIR / name
    if not path.is_file():
        pytest.skip(f"labelled eval set {path} not present")
    rows = [json.loads(line) for line in path.open()]
    random.Random(seed).shuffle(rows)
    return rows[:n]
