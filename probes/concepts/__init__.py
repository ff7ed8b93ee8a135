"""Concept definitions as data: contrastive pairs, a neutral reference set, an optional lexicon.

Built-in concepts are the JSON files beside this module; users can load their own file of the
same shape with `load_concept_file`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from probes.errors import InvalidInputError
from probes.validation import check_pairs

NEUTRAL_FILE = "neutral.json"
CONTROL_FILE = "control_prompts.json"  # ordinary requests that alert thresholds are calibrated on
DATA_FILES = (NEUTRAL_FILE, CONTROL_FILE)
STATUSES = ("stable", "experimental")


@dataclass(frozen=True)
class ConceptDefinition:
    name: str
    description: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    neutral: tuple[str, ...] = ()
    lexicon: tuple[str, ...] = ()
    positive_label: str = "present"
    negative_label: str = "absent"
    source: str = ""
    # "experimental": its probe does not beat the keyword count on real text (bench/probe_quality.py);
    # status_note says where it falls short.
    status: str = "stable"
    status_note: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def n_pairs(self) -> int:
        return len(self.positives)

    @property
    def pairs_hash(self) -> str:
        """Content hash of the pairs: a vector's provenance names exactly what it came from."""
        payload = json.dumps([list(self.positives), list(self.negatives)], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()


def concept_from_dict(data: dict, origin: str = "concept") -> ConceptDefinition:
    if not isinstance(data, dict):
        raise InvalidInputError(f"{origin}: expected a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"{origin}: 'name' must be a non-empty string")
    pairs = data.get("pairs")
    if not isinstance(pairs, list) or not all(
        isinstance(p, dict) and {"positive", "negative"} <= p.keys() for p in pairs
    ):
        raise InvalidInputError(f'{origin}: \'pairs\' must be a list of {{"positive": ..., "negative": ...}} objects')
    positives = tuple(p["positive"] for p in pairs)
    negatives = tuple(p["negative"] for p in pairs)
    try:
        check_pairs(positives, negatives)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{origin}: {exc}") from None
    known = {
        "name",
        "description",
        "pairs",
        "neutral",
        "lexicon",
        "positive_label",
        "negative_label",
        "source",
        "status",
        "status_note",
    }
    status = data.get("status", "stable")
    if status not in STATUSES:
        raise InvalidInputError(f"{origin}: 'status' must be one of {', '.join(STATUSES)}, got {status!r}")
    return ConceptDefinition(
        name=name,
        description=data.get("description", ""),
        positives=positives,
        negatives=negatives,
        neutral=tuple(data.get("neutral", ())),
        lexicon=tuple(data.get("lexicon", ())),
        positive_label=data.get("positive_label", "present"),
        negative_label=data.get("negative_label", "absent"),
        source=data.get("source", ""),
        status=status,
        status_note=data.get("status_note", ""),
        extra={k: v for k, v in data.items() if k not in known},
    )


def load_concept_file(path: str | Path) -> ConceptDefinition:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInputError(f"concept file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path} is not valid JSON: {exc}") from None
    return concept_from_dict(data, origin=str(path))


def _builtin_dir():
    return resources.files(__name__)


def builtin_concepts() -> list[str]:
    """Names of the concepts shipped with Auditor."""
    return sorted(
        entry.name.removesuffix(".json")
        for entry in _builtin_dir().iterdir()
        if entry.name.endswith(".json") and entry.name not in DATA_FILES
    )


def load_concept(name: str) -> ConceptDefinition:
    """A built-in concept by name, or a concept file if `name` is a path to one."""
    if name.endswith(".json") or "/" in name:
        return load_concept_file(name)
    if name not in builtin_concepts():
        raise InvalidInputError(f"unknown concept {name!r}; built-in concepts are: {', '.join(builtin_concepts())}")
    data = json.loads(_builtin_dir().joinpath(f"{name}.json").read_text(encoding="utf-8"))
    return concept_from_dict(data, origin=name)


def load_neutral() -> tuple[str, ...]:
    """Ordinary text shared by all concepts as the calibration reference."""
    data = json.loads(_builtin_dir().joinpath(NEUTRAL_FILE).read_text(encoding="utf-8"))
    return tuple(data["texts"])


def reference_texts(concept: ConceptDefinition) -> tuple[str, ...]:
    """Calibration reference for one concept: the shared neutral set plus its own neutral texts."""
    return load_neutral() + concept.neutral


def load_control_set() -> tuple[tuple[str, str], ...]:
    """Ordinary assistant requests with their category (everyday, advice, writing, coding,
    maths, summarising, explain): the control traffic alert thresholds are calibrated on."""
    data = json.loads(_builtin_dir().joinpath(CONTROL_FILE).read_text(encoding="utf-8"))
    return tuple((entry["prompt"], entry["category"]) for entry in data["prompts"])


def load_control_prompts() -> tuple[str, ...]:
    """The control prompts alone, in file order."""
    return tuple(prompt for prompt, _ in load_control_set())
