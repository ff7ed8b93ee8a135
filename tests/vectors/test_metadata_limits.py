"""A vector file's metadata is bounded in depth, entries and size, in every format, at parse time;
GGUF metadata arrays are refused; no file is decoded past what the model's shape can need."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from auditor.errors import InvalidInputError
from auditor.vectors import VectorSet, parse_vectors
from auditor.vectors.common import Spec
from auditor.vectors.json_format import json_length_limit
from auditor.vectors.metadata import MAX_METADATA_CHARS, MAX_METADATA_DEPTH, MAX_METADATA_ENTRIES

D_MODEL, N_LAYERS = 64, 12
VECTOR = np.random.default_rng(0).normal(size=D_MODEL).astype(np.float32)


def parse(data: bytes, fmt: str) -> VectorSet:
    return parse_vectors(data, fmt, d_model=D_MODEL, n_layers=N_LAYERS)


def nested(depth: int) -> dict:
    """Metadata `depth` levels deep: the metadata object itself is level 1."""
    metadata: dict = {"leaf": 1}
    for _ in range(depth - 1):
        metadata = {"inner": metadata}
    return metadata


def json_file(metadata) -> bytes:
    return json.dumps({"vectors": {"3": VECTOR.tolist()}, "metadata": metadata}).encode()


def gguf_file(fill=None, *, tensors: int = 1) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        writer = gguf.GGUFWriter(path, "controlvector")
        if fill:
            fill(writer)
        for layer in range(1, tensors + 1):
            writer.add_tensor(f"direction.{layer}", VECTOR)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def with_safetensors_metadata(metadata) -> bytes:
    """A safetensors file whose header carries `metadata` as is (safetensors' writer only takes str -> str)."""
    data = safetensors_save({"direction.3": torch.from_numpy(VECTOR)})
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + header_len :]


# --- the shared bounds, at their edges ---------------------------------------------------------------


def test_json_metadata_at_the_limits_is_kept():
    at_limits = {
        "deep": nested(MAX_METADATA_DEPTH - 1),  # + the metadata object = the limit
        "items": list(range(MAX_METADATA_ENTRIES - (MAX_METADATA_DEPTH - 1) - 3)),  # 3 top-level keys
    }
    at_limits["text"] = ""
    at_limits["text"] = "x" * (MAX_METADATA_CHARS - len(json.dumps(at_limits, separators=(",", ":"))))
    parsed = parse(json_file(at_limits), "json")
    assert parsed.metadata["deep"] == nested(MAX_METADATA_DEPTH - 1)
    assert len(parsed.metadata["text"]) > 60_000


@pytest.mark.parametrize(
    "metadata, fact",
    [
        (nested(MAX_METADATA_DEPTH + 1), f"nested {MAX_METADATA_DEPTH + 1} levels deep; the limit is 16"),
        (nested(300), "nested 300 levels deep"),
        ({"items": [[]] * 10}, None),  # fine: 11 entries, 3 levels
        ({"items": list(range(MAX_METADATA_ENTRIES))}, f"has {MAX_METADATA_ENTRIES + 1} keys and items"),
        ({f"k{i}": i for i in range(MAX_METADATA_ENTRIES + 1)}, f"has {MAX_METADATA_ENTRIES + 1} keys"),
        ({"text": "x" * MAX_METADATA_CHARS}, "65,547 characters as JSON, more than the limit of 65,536"),
    ],
)
def test_json_metadata_past_a_limit_is_refused(metadata, fact):
    if fact is None:
        assert parse(json_file(metadata), "json").metadata["items"] == [[]] * 10
        return
    with pytest.raises(InvalidInputError, match=fact):
        parse(json_file(metadata), "json")


@pytest.mark.parametrize(
    "metadata, fact",
    [
        ({f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)}, f"has {MAX_METADATA_ENTRIES + 1} keys"),
        ({"note": "x" * MAX_METADATA_CHARS}, "characters as JSON, more than the limit"),
        ({"nested": {"a": "b"}}, "__metadata__ 'nested' is not a string"),
        ({"list": ["a"]}, "__metadata__ 'list' is not a string"),
    ],
)
def test_safetensors_metadata_past_a_limit_is_refused(metadata, fact):
    with pytest.raises(InvalidInputError, match=fact):
        parse(with_safetensors_metadata(metadata), "safetensors")


def test_safetensors_header_is_bounded_before_it_is_decoded():
    tensors = {f"direction.{i}": torch.from_numpy(VECTOR.copy()) for i in range(N_LAYERS)}
    assert len(parse(safetensors_save(tensors), "safetensors").vectors) == N_LAYERS
    with pytest.raises(InvalidInputError, match="13 tensors, more than one per layer of a 12-layer model"):
        parse(safetensors_save({**tensors, "direction.12": torch.from_numpy(VECTOR.copy())}), "safetensors")
    # a header of 2 MB of nothing but JSON is refused by its declared length, without decoding it
    bomb = b'{"x":[' + b"[]," * 700_000 + b"[]]}"
    bomb += b" " * (-len(bomb) % 8)
    with pytest.raises(InvalidInputError, match=f"safetensors header is {len(bomb):,} bytes, more than the"):
        parse(len(bomb).to_bytes(8, "little") + bomb, "safetensors")


# --- GGUF: no arrays, bounded keys and text, one tensor per layer ------------------------------------


def test_a_control_vector_as_real_writers_emit_it_is_accepted():
    # llama.cpp's cvector-generator writes layer_count as int32, repeng as uint32; some writers add
    # scalar flags. None writes an array.
    def fill(writer):
        writer.add_string("controlvector.model_hint", "llama")
        writer.add_int32("controlvector.layer_count", 1)
        writer.add_bool("controlvector.normalize", False)

    parsed = parse(gguf_file(fill), "gguf")
    assert parsed.metadata["model_hint"] == "llama" and parsed.metadata["layer_count"] == 1
    assert list(parsed.vectors) == [1]


@pytest.mark.parametrize(
    "fill, fact",
    [
        (lambda w: w.add_array("controlvector.layers", [1]), r"arrays are not accepted \('controlvector.layers'\)"),
        (lambda w: w.add_array("controlvector.tags", ["steering"]), "arrays are not accepted"),
        (lambda w: w.add_string("controlvector.model_hint", "x" * MAX_METADATA_CHARS), "bytes of keys and strings"),
        (
            lambda w: [w.add_bool(f"k{i}", True) for i in range(MAX_METADATA_ENTRIES)],
            f"declares {MAX_METADATA_ENTRIES + 1} metadata keys; the limit is {MAX_METADATA_ENTRIES}",
        ),
    ],
)
def test_gguf_metadata_past_a_limit_is_refused(fill, fact):
    with pytest.raises(InvalidInputError, match=fact):
        parse(gguf_file(fill), "gguf")


def test_gguf_with_more_tensors_than_layers_is_refused_before_it_is_read():
    assert len(parse(gguf_file(tensors=N_LAYERS - 1), "gguf").vectors) == N_LAYERS - 1
    with pytest.raises(InvalidInputError, match="declares 13 tensors, more than one per layer of a 12-layer"):
        parse(gguf_file(tensors=N_LAYERS + 1), "gguf")


@pytest.mark.timeout(20)
def test_gguf_array_of_many_items_fails_fast():
    # a 4 MiB file of arrays took 11 s and +790 MiB in gguf's reader; now the header scan stops at
    # the first array
    items = 1_000_000
    data = (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", 3)
        + b"key"
        + struct.pack("<IIQ", 9, 4, items)
        + bytes(4 * items)
    )
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match="arrays are not accepted"):
        parse(data, "gguf")
    assert time.perf_counter() - start < 0.5


# --- JSON: no longer than one vector per layer and the metadata can be -------------------------------


def test_json_longer_than_the_model_shape_allows_is_refused_before_decoding():
    limit = json_length_limit(Spec(D_MODEL, N_LAYERS, None))
    every_layer = {str(layer): VECTOR.tolist() for layer in range(N_LAYERS)}
    pretty = json.dumps({"vectors": every_layer, "metadata": {"note": "\U0001f600" * 5000}}, indent=8).encode()
    assert len(pretty) < limit and len(parse(pretty, "json").vectors) == N_LAYERS
    bomb = b'{"vectors": {"3": [' + b"[]," * (limit // 3) + b"[]]}}"
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=f"more than the {limit:,} that 12 vectors of dimension 64"):
        parse(bomb, "json")
    assert time.perf_counter() - start < 0.5
