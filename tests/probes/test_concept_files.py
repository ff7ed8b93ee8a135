"""User-supplied concept files: every malformed shape is a clear InvalidInputError."""

import json

import pytest

from auditor.errors import InvalidInputError
from probes.concepts import builtin_concepts, load_concept, load_concept_file


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"pairs": []}', "'name' must be a non-empty string"),
        ('{"name": "x", "pairs": [{"positive": "a"}]}', "must be a list of"),
        ('{"name": "x", "pairs": []}', "no contrastive pairs"),
        ('{"name": "x", "pairs": [{"positive": "a", "negative": " "}]}', "negative text #0 is empty"),
    ],
)
def test_malformed_concept_files_are_rejected(tmp_path, content, message):
    path = tmp_path / "concept.json"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        load_concept_file(path)


def test_missing_file_and_unknown_builtin():
    with pytest.raises(InvalidInputError, match="concept file not found"):
        load_concept_file("/nonexistent/concept.json")
    with pytest.raises(InvalidInputError, match="unknown concept 'nope'"):
        load_concept("nope")


def test_builtin_library_meets_its_minimum_sizes_and_hashes_are_stable(tmp_path):
    sizes = {name: load_concept(name).n_pairs for name in builtin_concepts()}
    assert sizes["pessimism"] >= 65 and sizes["python_bias"] >= 65
    assert len(sizes) >= 5 and min(sizes.values()) >= 45
    pessimism = load_concept("pessimism")
    assert pessimism.positives[0] == "I know this won't work but let me try anyway"  # the article's first pair
    copy = tmp_path / "copy.json"
    copy.write_text(
        json.dumps(
            {
                "name": "copy",
                "pairs": [{"positive": p, "negative": n} for p, n in zip(pessimism.positives, pessimism.negatives)],
            }
        )
    )
    assert load_concept_file(copy).pairs_hash == pessimism.pairs_hash  # same pairs, same provenance hash


def test_a_concept_declares_whether_it_is_experimental(tmp_path):
    path = tmp_path / "concept.json"
    pairs = [{"positive": "a b", "negative": "c d"}]
    path.write_text(json.dumps({"name": "x", "pairs": pairs}))
    assert load_concept_file(path).status == "stable"
    path.write_text(json.dumps({"name": "x", "pairs": pairs, "status": "experimental", "status_note": "why"}))
    assert (load_concept_file(path).status, load_concept_file(path).status_note) == ("experimental", "why")
    path.write_text(json.dumps({"name": "x", "pairs": pairs, "status": "beta"}))
    with pytest.raises(InvalidInputError, match="'status' must be one of stable, experimental"):
        load_concept_file(path)
    # Built-ins without a probe that beats its keyword baseline on real text say so.
    assert load_concept("flattery").status == "experimental" and load_concept("flattery").status_note
