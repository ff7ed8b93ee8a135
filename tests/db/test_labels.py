"""Concept version labels: the bare name while one version is present, `name:vN` once several are."""

from dataclasses import dataclass

from auditor.db.labels import concept_name, display_labels, version_label


@dataclass
class Row:
    name: str
    version: int


def test_a_lone_version_is_shown_by_name_and_siblings_by_version():
    rows = [Row("pessimism", 1), Row("formality", 3), Row("pessimism", 2)]
    assert display_labels(rows) == ["pessimism:v1", "formality", "pessimism:v2"]


def test_a_label_parses_back_to_its_concept_name():
    for name in ("pessimism", "python_bias", "a-b"):
        assert concept_name(version_label(name, 12)) == name
        assert concept_name(name) == name
