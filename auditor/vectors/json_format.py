"""Vector sets as JSON: decoding (strict: duplicate keys, non-numbers and bare lists without a
layer are refused with a message) and encoding.

Accepted shapes: {"vectors": {"<layer>": [...]}, "metadata": {...}}, {"layer": L, "vector": [...]},
or a bare list of numbers for the layer the caller names. Written: the first shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from auditor.errors import InvalidInputError
from auditor.vectors.common import RawVectors, Spec, describe, parse_layer_key
from auditor.vectors.metadata import MAX_ESCAPED_METADATA_BYTES, MAX_METADATA_CHARS, MAX_METADATA_ENTRIES

# A JSON vector file holds at most one vector per layer and its metadata, so its length is bounded
# by the model's shape. The bound is checked before decoding, because decoding is what costs:
# Python's json builds every object before any check sees it (a 64 MiB file of empty lists took
# 8 s and 1.7 GB). A float64 is at most 24 characters; the rest leaves room for indentation.
_CHARS_PER_NUMBER = 64


def json_length_limit(spec: Spec) -> int:
    return spec.n_layers * (spec.d_model + 1) * _CHARS_PER_NUMBER + MAX_ESCAPED_METADATA_BYTES


class _JSONObject(dict):
    """A decoded JSON object that remembers its key/value pairs in order, duplicates included."""

    pairs: list[tuple[str, Any]]


def _json_object(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject(pairs)
    obj.pairs = pairs
    return obj


# Objects are what decoding makes dearest (a _JSONObject is ~500 bytes: 1.8 MB of "{}," took 4 s
# and +300 MiB), and a vector file needs few: the document, "vectors", and the metadata's, which
# are metadata entries. The hook counts them and stops the decoder at the first one too many.
_MAX_OBJECTS = MAX_METADATA_ENTRIES + 3


def _counting_object_hook() -> Callable[[list[tuple[str, Any]]], _JSONObject]:
    made = 0

    def hook(pairs: list[tuple[str, Any]]) -> _JSONObject:
        nonlocal made
        made += 1
        if made > _MAX_OBJECTS:
            raise InvalidInputError(f"a JSON vector file holds more than {_MAX_OBJECTS} objects")
        return _json_object(pairs)

    return hook


def read_json(data: bytes, spec: Spec) -> tuple[RawVectors, dict]:
    limit = json_length_limit(spec)
    if len(data) > limit:
        raise InvalidInputError(
            f"a JSON vector file is {len(data):,} bytes, more than the {limit:,} that {spec.n_layers} vectors "
            f"of dimension {spec.d_model} and their metadata can take"
        )
    # Lists have no decoder hook, so they are bounded by their opening brackets: a vector file's
    # lists are its vectors and its metadata's (entries), and a '[' inside a string is a metadata
    # character. 1.8 MB of "[]," took 1.4 s to decode.
    max_lists = spec.n_layers + 1 + MAX_METADATA_ENTRIES + MAX_METADATA_CHARS
    if data.count(b"[") > max_lists:
        raise InvalidInputError(f"a JSON vector file holds more than {max_lists} lists")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: not UTF-8 (bad byte at offset {exc.start})") from exc
    try:
        doc = json.loads(text, object_pairs_hook=_counting_object_hook())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InvalidInputError("malformed JSON: nested too deeply") from None

    if isinstance(doc, list):
        if spec.layer is None:
            raise InvalidInputError("a bare JSON list is a single vector: pass layer= to say which layer it is for")
        return [(spec.layer, _json_numbers(doc, f"layer {spec.layer}"))], {}
    if not isinstance(doc, dict):
        raise InvalidInputError(f"JSON must be a list of numbers or an object, got {_json_type(doc)}")
    _reject_duplicate_keys(doc, "the top-level JSON object")
    metadata = _json_metadata(doc)
    if "vectors" in doc:
        vectors = doc["vectors"]
        if not isinstance(vectors, dict):
            raise InvalidInputError(
                f'"vectors" must be an object mapping layer to a list of numbers, got {_json_type(vectors)}'
            )
        raw = [
            (parse_layer_key(key, '"vectors"'), _json_numbers(value, f"layer {key}")) for key, value in vectors.pairs
        ]
        return raw, metadata
    if "vector" in doc:
        layer = _json_single_layer(doc, spec)
        return [(layer, _json_numbers(doc["vector"], f"layer {layer}"))], metadata
    raise InvalidInputError('JSON object must have "vectors" ({"<layer>": [...]}) or "layer" and "vector"')


def _json_single_layer(doc: dict, spec: Spec) -> int:
    if "layer" not in doc:
        if spec.layer is None:
            raise InvalidInputError('a JSON "vector" needs a "layer" (or pass layer=)')
        return spec.layer
    layer = doc["layer"]
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise InvalidInputError(f'"layer": {json.dumps(layer)} is not an integer')
    if spec.layer is not None and spec.layer != layer:
        raise InvalidInputError(f"the payload says layer {layer} but layer={spec.layer} was given")
    return layer


def _json_metadata(doc: dict) -> dict:
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise InvalidInputError(f'"metadata" must be an object, got {_json_type(metadata)}')
    return dict(metadata)


def _json_numbers(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise InvalidInputError(f"{where}: expected a list of numbers, got {_json_type(value)}")
    numbers = np.empty(len(value), dtype=np.float64)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InvalidInputError(
                f"{where}: element {i} is {_json_type(item)} {json.dumps(item)[:40]}, expected a number"
            )
        try:
            numbers[i] = item
        except OverflowError:
            numbers[i] = math.inf  # an integer too large for a float; reported as Inf below
    return numbers


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a bool"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _reject_duplicate_keys(obj: _JSONObject, where: str) -> None:
    seen: set[str] = set()
    for key, _ in obj.pairs:
        if key in seen:
            raise InvalidInputError(f"duplicate key {key!r} in {where}")
        seen.add(key)


def write_json(arrays: dict[int, np.ndarray], metadata: dict) -> bytes:
    doc = {
        "vectors": {str(layer): vector.tolist() for layer, vector in arrays.items()},
        "metadata": metadata,
    }
    try:
        return json.dumps(doc, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"metadata cannot be written as JSON: {describe(exc)}") from exc
