"""Vector files: JSON, safetensors and GGUF control vectors in and out, with strict validation."""

from __future__ import annotations

import json
import math
import re
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_save

from auditor.errors import InvalidInputError
from auditor.vectors import FORMATS, VectorSet, export_vectors, parse_vectors, sniff_format

D_MODEL = 576
N_LAYERS = 30
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_vectors() -> dict[int, torch.Tensor]:
    """Deliberately far from unit length, as real control vectors are."""
    gen = torch.Generator().manual_seed(0)
    scales = {0: 3.0, 15: 0.02, 29: 40.0}
    return {layer: scale * torch.randn(D_MODEL, generator=gen) for layer, scale in scales.items()}


def parse(data: bytes, fmt: str, **kwargs) -> VectorSet:
    return parse_vectors(data, fmt, d_model=D_MODEL, n_layers=N_LAYERS, **kwargs)


def gguf_bytes(tensors: dict[str, np.ndarray], arch: str = "controlvector", **strings) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        writer = gguf.GGUFWriter(path, arch)
        for key, value in strings.items():
            writer.add_string(f"{arch}.{key}", value)
        for name, values in tensors.items():
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


@contextmanager
def read_gguf(data: bytes) -> Iterator[gguf.GGUFReader]:
    with tempfile.TemporaryFile() as handle:
        handle.write(data)
        handle.flush()
        yield gguf.GGUFReader(handle)


def payload(fmt: str, entries: dict[str, np.ndarray]) -> bytes:
    """One file per format holding `entries` ({layer text: values}) the format's usual way."""
    if fmt == "json":
        body = {key: np.asarray(v, dtype=np.float64).tolist() for key, v in entries.items()}
        return json.dumps({"vectors": body}).encode()  # NaN/Infinity as Python's json writes them
    named = {f"direction.{key}": np.asarray(v, dtype=np.float32) for key, v in entries.items()}
    if fmt == "safetensors":
        return safetensors_save({k: torch.from_numpy(v) for k, v in named.items()})
    return gguf_bytes(named)


def unit(vector: torch.Tensor) -> torch.Tensor:
    return vector / vector.norm()


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_directions_and_original_norms(fmt):
    raw = raw_vectors()
    data = export_vectors(VectorSet(raw, {"model_hint": "llama"}), fmt)
    parsed = parse(data, fmt)

    assert list(parsed.vectors) == [0, 15, 29]
    for layer, vector in raw.items():
        got = parsed.vectors[layer]
        assert got.dtype == torch.float32 and got.shape == (D_MODEL,)
        assert float(got.norm()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(got, unit(vector), atol=1e-6)
        assert parsed.metadata["original_norms"][layer] == pytest.approx(float(vector.norm()), rel=1e-6)
    assert parsed.metadata["model_hint"] == "llama"


@pytest.mark.parametrize("fmt", FORMATS)
def test_parse_export_parse_is_identical(fmt):
    first = parse(export_vectors(VectorSet(raw_vectors(), {}), fmt), fmt)
    second = parse(export_vectors(first, fmt), fmt)
    assert list(second.vectors) == list(first.vectors)
    for layer in first.vectors:
        assert torch.allclose(second.vectors[layer], first.vectors[layer], atol=1e-7)
        assert second.metadata["original_norms"][layer] == pytest.approx(
            first.metadata["original_norms"][layer], rel=1e-6
        )


def test_a_set_survives_every_format_in_turn():
    current = parse(export_vectors(VectorSet(raw_vectors(), {}), "json"), "json")
    for fmt in ("gguf", "safetensors", "json", "gguf"):
        current = parse(export_vectors(current, fmt), fmt)
    for layer, vector in raw_vectors().items():
        assert torch.allclose(current.vectors[layer], unit(vector), atol=1e-6)
        assert current.metadata["original_norms"][layer] == pytest.approx(float(vector.norm()), rel=1e-5)


def test_exported_gguf_is_a_repeng_style_control_vector():
    raw = raw_vectors()
    data = export_vectors(VectorSet(raw, {}), "gguf", model_hint="llama")
    with read_gguf(data) as reader:
        assert reader.get_field("general.architecture").contents() == "controlvector"
        assert reader.get_field("controlvector.model_hint").contents() == "llama"
        count = reader.get_field("controlvector.layer_count")
        assert count.types == [gguf.GGUFValueType.UINT32] and count.contents() == 3
        names = [t.name for t in reader.tensors]
        assert names == ["direction.0", "direction.15", "direction.29"]
        for tensor in reader.tensors:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
            layer = int(tensor.name.split(".")[1])
            # written at the original strength, not unit length
            assert np.allclose(tensor.data, raw[layer].numpy(), rtol=1e-5, atol=1e-6)


# --- GGUF layer numbering ------------------------------------------------------------------------


def repeng_export_gguf(path: Path, model_type: str, directions: dict[int, np.ndarray]) -> None:
    """repeng's ControlVector.export_gguf (vgel/repeng, repeng/extract.py), step for step."""
    arch = "controlvector"
    writer = gguf.GGUFWriter(path, arch)
    writer.add_string(f"{arch}.model_hint", model_type)
    writer.add_uint32(f"{arch}.layer_count", len(directions))
    for layer in directions:
        writer.add_tensor(f"direction.{layer}", directions[layer])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def repeng_directions(hidden_states: list[np.ndarray], num_hidden_layers: int) -> dict:
    """repeng's layer bookkeeping in read_representations / batched_get_hiddens: default layers
    range(-1, -num_hidden_layers, -1), normalised to n_layers + i, read from
    hidden_states[layer + 1] ("account for embedding hiddens")."""
    hidden_layers = range(-1, -num_hidden_layers, -1)
    hidden_layers = [i if i >= 0 else num_hidden_layers + i for i in hidden_layers]
    directions = {}
    for layer in hidden_layers:
        hidden_idx = layer + 1 if layer >= 0 else layer
        directions[layer] = hidden_states[hidden_idx]
    return directions


def test_a_repeng_gguf_is_read_at_the_block_it_was_extracted_from(tmp_path):
    gen = np.random.default_rng(1)
    # HF hidden_states: [0] is the embedding output, [i + 1] the output of block i, i.e. what
    # TransformerLens calls blocks.{i}.hook_resid_post. Plant a distinct direction in each.
    block_outputs = [gen.normal(size=D_MODEL).astype(np.float32) * (i + 1) for i in range(N_LAYERS)]
    embedding = gen.normal(size=D_MODEL).astype(np.float32)
    hidden_states = [embedding, *block_outputs]

    path = tmp_path / "repeng.gguf"
    repeng_export_gguf(path, "llama", repeng_directions(hidden_states, N_LAYERS))
    parsed = parse(path.read_bytes(), "gguf")

    assert list(parsed.vectors) == list(range(1, N_LAYERS))  # repeng never trains block 0
    for layer, vector in parsed.vectors.items():
        expected = torch.from_numpy(block_outputs[layer])
        assert torch.allclose(vector, unit(expected), atol=1e-6), layer
        assert parsed.metadata["original_norms"][layer] == pytest.approx(float(expected.norm()), rel=1e-6)
    assert parsed.metadata["model_hint"] == "llama"
    assert parsed.metadata["layer_count"] == N_LAYERS - 1


def llama_cpp_steered_blocks(data: bytes, n_layer: int) -> dict[int, np.ndarray]:
    """What llama.cpp adds to each block's output for this file, following
    common_control_vector_load_one (common/common.cpp), llama_control_vector_apply
    (src/llama-adapter.cpp) and `cur = build_cvec(cur, il)` at the end of block il."""
    n_embd, buffer = -1, np.zeros(0, dtype=np.float32)
    with read_gguf(data) as reader:
        for tensor in reader.tensors:
            prefix, _, index = tensor.name.partition(".")
            layer_idx = int(index) if prefix == "direction" else -1
            if layer_idx <= 0:
                raise ValueError(f"llama.cpp refuses the file: direction index {layer_idx}")
            n_embd = tensor.n_elements
            if buffer.size < n_embd * layer_idx:
                grow = np.zeros(n_embd * layer_idx - buffer.size, np.float32)
                buffer = np.concatenate([buffer, grow])
            buffer[n_embd * (layer_idx - 1) : n_embd * layer_idx] += tensor.data  # layer 1 at [0]
    steered = {}
    for il in range(1, n_layer):  # there's never a tensor for layer 0
        off = n_embd * (il - 1)
        if off + n_embd <= buffer.size and np.any(buffer[off : off + n_embd]):
            steered[il] = buffer[off : off + n_embd]
    return steered


def test_llama_cpp_adds_each_exported_vector_to_the_same_block():
    raw = {layer: v for layer, v in raw_vectors().items() if layer != 0}
    data = export_vectors(VectorSet(raw, {}), "gguf", for_llama_cpp=True)
    steered = llama_cpp_steered_blocks(data, N_LAYERS)
    assert sorted(steered) == [15, 29]
    for layer, vector in raw.items():
        assert np.allclose(steered[layer], vector.numpy(), rtol=1e-5, atol=1e-6)


def test_layer_0_cannot_be_exported_for_llama_cpp():
    data = export_vectors(VectorSet(raw_vectors(), {}), "gguf")  # fine for repeng and for us
    with pytest.raises(ValueError, match="direction index 0"):
        llama_cpp_steered_blocks(data, N_LAYERS)
    with pytest.raises(InvalidInputError, match="layer 0"):
        export_vectors(VectorSet(raw_vectors(), {}), "gguf", for_llama_cpp=True)


# --- other accepted shapes -----------------------------------------------------------------------


def test_json_shapes():
    vector = raw_vectors()[15]
    values = vector.tolist()
    for data, kwargs in [
        (json.dumps(values), {"layer": 15}),
        (json.dumps({"layer": 15, "vector": values}), {}),
        (json.dumps({"layer": 15, "vector": values}), {"layer": 15}),
        (json.dumps({"vector": values}), {"layer": 15}),
        (json.dumps({"vectors": {"15": values}, "metadata": {"concept": "pessimism"}}), {}),
    ]:
        parsed = parse(data.encode(), "json", **kwargs)
        assert list(parsed.vectors) == [15]
        assert torch.allclose(parsed.vectors[15], unit(vector), atol=1e-6)
    assert parsed.metadata["concept"] == "pessimism"


def test_safetensors_shapes():
    raw = raw_vectors()
    single = parse(safetensors_save({"vector": raw[15]}), "safetensors", layer=15)
    assert list(single.vectors) == [15]
    assert torch.allclose(single.vectors[15], unit(raw[15]), atol=1e-6)

    gen = torch.Generator().manual_seed(3)
    table = torch.randn(N_LAYERS, D_MODEL, generator=gen)
    stacked = parse(safetensors_save({"directions": table}, metadata={"model_hint": "llama"}), "safetensors")
    assert list(stacked.vectors) == list(range(N_LAYERS))
    assert torch.allclose(stacked.vectors[7], unit(table[7]), atol=1e-6)
    assert stacked.metadata["model_hint"] == "llama"


def test_gguf_f16_directions_are_accepted():
    vector = raw_vectors()[15].numpy().astype(np.float16)
    parsed = parse(gguf_bytes({"direction.15": vector}), "gguf")
    expected = torch.from_numpy(vector.astype(np.float32))
    assert torch.allclose(parsed.vectors[15], unit(expected), atol=1e-6)


# --- validation: every format --------------------------------------------------------------------


def good_vector() -> np.ndarray:
    return raw_vectors()[15].numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_payload_over_the_size_limit(fmt):
    data = payload(fmt, {"15": good_vector()})
    with pytest.raises(InvalidInputError, match=f"{len(data)} bytes.*limit of {len(data) - 1}"):
        parse(data, fmt, max_bytes=len(data) - 1)


@pytest.mark.parametrize(
    "fmt, data, fact",
    [
        ("json", b'{"vectors": {"15": [1, 2', "malformed JSON"),
        ("json", b"\xff\xfe{}", "not UTF-8"),
        ("json", b'"just a string"', "got a string"),
        ("safetensors", b"\x10\x00", "malformed safetensors"),
        ("safetensors", struct.pack("<Q", 10**9) + b"{}", "header length 1000000000"),
        ("safetensors", struct.pack("<Q", 2) + b"{}" + b"garbage", "malformed safetensors"),
        ("gguf", b"GGUF", "GGUF magic"),
        ("gguf", b"NOPE" + bytes(40), "GGUF magic"),
        ("gguf", b"GGUF" + struct.pack("<IQQ", 7, 0, 0), "version 7"),
    ],
)
def test_malformed_files(fmt, data, fact):
    with pytest.raises(InvalidInputError, match=fact):
        parse(data, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(fmt):
    data = payload(fmt, {"15": good_vector()})
    for cut in (1, len(data) // 2, len(data) - 3):
        with pytest.raises(InvalidInputError, match="malformed"):
            parse(data[:cut], fmt)


@pytest.mark.parametrize(
    "fmt, data",
    [
        ("json", b'{"vectors": {}}'),
        ("safetensors", safetensors_save({})),
        ("gguf", gguf_bytes({}, model_hint="llama")),
    ],
)
def test_no_vectors(fmt, data):
    with pytest.raises(InvalidInputError, match="no vectors"):
        parse(data, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_dimension(fmt):
    with pytest.raises(InvalidInputError, match=r"layer 15.*dimension 10.*d_model=576"):
        parse(payload(fmt, {"15": np.ones(10)}), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf(fmt, bad):
    values = good_vector().copy()
    values[7] = bad
    with pytest.raises(InvalidInputError, match=r"layer 15.*1 NaN or Inf.*index 7"):
        parse(payload(fmt, {"15": values}), fmt)


def test_value_beyond_float32_range_is_reported_as_inf():
    values = good_vector().astype(np.float64)
    values[3] = 1e300
    with pytest.raises(InvalidInputError, match="NaN or Inf.*index 3"):
        parse(json.dumps({"vectors": {"15": values.tolist()}}).encode(), "json")
    big_int = json.dumps({"vectors": {"15": [10**400] + [1] * (D_MODEL - 1)}}).encode()
    with pytest.raises(InvalidInputError, match="NaN or Inf.*index 0"):
        parse(big_int, "json")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale", [0.0, 1e-12])
def test_zero_or_near_zero_norm(fmt, scale):
    values = np.ones(D_MODEL) * scale
    with pytest.raises(InvalidInputError, match=r"layer 15.*norm .* zero or below 1e-08"):
        parse(payload(fmt, {"15": values}), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layer", ["30", "-1", "1000"])
def test_layer_out_of_range(fmt, layer):
    with pytest.raises(InvalidInputError, match=rf"layer {layer} is out of range \[0, 30\)"):
        parse(payload(fmt, {layer: good_vector()}), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["abc", "1.5", "", "+3", " 3", "3 "])
def test_non_integer_layer_key(fmt, key):
    with pytest.raises(InvalidInputError, match=re.escape(f"layer '{key}' is not an integer")):
        parse(payload(fmt, {key: good_vector()}), fmt)


@pytest.mark.parametrize("fmt", ["safetensors", "gguf"])
def test_duplicate_layers_in_tensor_names(fmt):
    data = payload(fmt, {"15": good_vector(), "015": good_vector()})
    with pytest.raises(InvalidInputError, match="duplicate vectors for layer 15"):
        parse(data, fmt)


def test_duplicate_layers_in_json():
    values = json.dumps(good_vector().tolist())
    data = f'{{"vectors": {{"15": {values}, "3": {values}, "15": {values}}}}}'.encode()
    with pytest.raises(InvalidInputError, match="duplicate vectors for layer 15"):
        parse(data, "json")


def test_duplicate_layers_across_safetensors_directions_and_direction():
    table = torch.randn(N_LAYERS, D_MODEL, generator=torch.Generator().manual_seed(0))
    data = safetensors_save({"directions": table, "direction.15": table[15].clone()})
    with pytest.raises(InvalidInputError, match="duplicate vectors for layer 15"):
        parse(data, "safetensors")


# --- validation: format specific -----------------------------------------------------------------


@pytest.mark.parametrize(
    "element, fact",
    [
        ("true", "element 5 is a bool true"),
        ('"0.5"', 'element 5 is a string "0.5"'),
        ("null", "element 5 is null"),
        ("[1]", "element 5 is a list"),
    ],
)
def test_json_non_numeric_values(element, fact):
    values = [json.dumps(x) for x in good_vector().tolist()]
    values[5] = element
    data = ('{"vectors": {"15": [' + ", ".join(values) + "]}}").encode()
    with pytest.raises(InvalidInputError, match=rf"layer 15: {fact}.*expected a number"):
        parse(data, "json")


@pytest.mark.parametrize(
    "doc, kwargs, fact",
    [
        ([1.0] * D_MODEL, {}, "pass layer="),
        ({"vector": [1.0] * D_MODEL}, {}, 'needs a "layer"'),
        ({"layer": True, "vector": [1.0] * D_MODEL}, {}, '"layer": true is not an integer'),
        ({"layer": 1.5, "vector": [1.0] * D_MODEL}, {}, '"layer": 1.5 is not an integer'),
        ({"layer": "15", "vector": [1.0] * D_MODEL}, {}, '"layer": "15" is not an integer'),
        ({"layer": 15, "vector": [1.0] * D_MODEL}, {"layer": 3}, "says layer 15 but layer=3"),
        ({"vectors": [[1.0] * D_MODEL]}, {}, '"vectors" must be an object'),
        ({"vectors": {"15": [1.0] * D_MODEL}, "metadata": []}, {}, '"metadata" must be an obj'),
        ({"something": 1}, {}, 'must have "vectors"'),
        ({"vectors": {"15": "1, 2, 3"}}, {}, "layer 15: expected a list of numbers"),
    ],
)
def test_json_shape_errors(doc, kwargs, fact):
    with pytest.raises(InvalidInputError, match=fact):
        parse(json.dumps(doc).encode(), "json", **kwargs)


@pytest.mark.parametrize("layer", [True, 1.5, "3", 30, -1])
def test_layer_argument_is_checked(layer):
    with pytest.raises(InvalidInputError, match="layer"):
        parse(json.dumps([1.0] * D_MODEL).encode(), "json", layer=layer)


@pytest.mark.parametrize(
    "tensors, kwargs, fact",
    [
        ({"vector": torch.ones(D_MODEL)}, {}, "needs layer="),
        (
            {"vector": torch.ones(D_MODEL), "direction.3": torch.ones(D_MODEL)},
            {"layer": 3},
            '"vector" must be the only tensor',
        ),
        ({"directions": torch.ones(N_LAYERS - 2, D_MODEL)}, {}, "28 rows.*n_layers=30"),
        ({"directions": torch.ones(N_LAYERS, 10)}, {}, "dimension 10.*d_model=576"),
        ({"direction.3": torch.ones(1, D_MODEL)}, {}, r"shape \[1, 576\], expected 1-D"),
        ({"direction.3": torch.ones(D_MODEL, dtype=torch.int32)}, {}, "dtype torch.int32"),
        ({"model.embed_tokens.weight": torch.ones(4, D_MODEL)}, {}, "unexpected safetensors"),
    ],
)
def test_safetensors_errors(tensors, kwargs, fact):
    with pytest.raises(InvalidInputError, match=fact):
        parse(safetensors_save(tensors), "safetensors", **kwargs)


def test_gguf_errors():
    vector = good_vector()
    with pytest.raises(InvalidInputError, match="architecture is 'llama'"):
        parse(gguf_bytes({"direction.15": vector}, arch="llama"), "gguf")
    with pytest.raises(InvalidInputError, match="unexpected GGUF tensor 'blk.0.attn_q.weight'"):
        parse(gguf_bytes({"blk.0.attn_q.weight": vector}), "gguf")
    with pytest.raises(InvalidInputError, match=r"shape \[576, 2\], expected a 1-D"):
        parse(gguf_bytes({"direction.15": np.ones((2, D_MODEL), np.float32)}), "gguf")
    with pytest.raises(InvalidInputError, match="type I32, expected F32"):
        parse(gguf_bytes({"direction.15": np.ones(D_MODEL, np.int32)}), "gguf")


@pytest.mark.timeout(20)
def test_gguf_header_declaring_a_huge_array_fails_fast():
    # One metadata key holding an array that claims 2**62 uint8 items in a 50-byte file: gguf's
    # reader alone loops over the missing items (it hung for >20 s here).
    data = (
        b"GGUF"
        + struct.pack("<IQQ", 3, 0, 1)
        + struct.pack("<Q", 3)
        + b"key"
        + struct.pack("<I", 9)
        + struct.pack("<IQ", 0, 2**62)
    )
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match="metadata arrays are not accepted"):
        parse(data, "gguf")
    assert time.perf_counter() - start < 1.0


def test_unknown_format_and_non_bytes():
    with pytest.raises(InvalidInputError, match="unknown vector format 'npz'"):
        parse(b"[]", "npz")
    with pytest.raises(InvalidInputError, match="must be bytes, got str"):
        parse("[1, 2]", "json", layer=0)


# --- export validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "vectors, metadata, fact",
    [
        ({}, {}, "no vectors"),
        ({3: torch.zeros(D_MODEL)}, {}, "layer 3: vector norm 0 is zero"),
        ({3: torch.full((D_MODEL,), math.nan)}, {}, "layer 3: vector contains 576 NaN"),
        ({3: torch.ones(D_MODEL), 4: torch.ones(10)}, {}, "layer 4: vector has dimension 10"),
        ({-1: torch.ones(D_MODEL)}, {}, "layer -1 is not a non-negative integer"),
        ({"3": torch.ones(D_MODEL)}, {}, "layer '3' is not a non-negative integer"),
        ({3: torch.ones(D_MODEL)}, {"original_norms": {3: 0.0}}, "original norm 0.0"),
        ({3: "not a vector"}, {}, "layer 3: not a vector"),
    ],
)
def test_export_rejects_bad_sets(vectors, metadata, fact):
    for fmt in FORMATS:
        with pytest.raises(InvalidInputError, match=fact):
            export_vectors(VectorSet(vectors, metadata), fmt)


def test_export_rejects_unwritable_metadata_and_unknown_format():
    good = {3: torch.ones(D_MODEL)}
    with pytest.raises(InvalidInputError, match="metadata"):
        export_vectors(VectorSet(good, {"when": object()}), "json")
    with pytest.raises(InvalidInputError, match="unknown vector format"):
        export_vectors(VectorSet(good, {}), "onnx")


def test_export_uses_original_norms_from_metadata():
    direction = unit(raw_vectors()[15])
    data = export_vectors(VectorSet({15: direction}, {"original_norms": {15: 12.5}}), "json")
    written = np.array(json.loads(data)["vectors"]["15"])
    assert np.linalg.norm(written) == pytest.approx(12.5, rel=1e-6)
    assert parse(data, "json").metadata["original_norms"][15] == pytest.approx(12.5, rel=1e-6)


# --- sniffing ------------------------------------------------------------------------------------


def test_sniff_format():
    exported = {fmt: export_vectors(VectorSet(raw_vectors(), {}), fmt) for fmt in FORMATS}
    for fmt, data in exported.items():
        assert sniff_format(None, data) == fmt
        assert sniff_format("upload.bin", data) == fmt  # unknown extension: magic bytes decide
    assert sniff_format("vec.GGUF", b"") == "gguf"
    assert sniff_format("dir/vec.safetensors", b"[]") == "safetensors"
    assert sniff_format("vec.json", exported["gguf"]) == "json"  # the extension wins
    assert sniff_format(None, b'        {"vectors": {}}') == "json"  # 8 spaces, then '{'
    assert sniff_format(None, b"") == "json"


# --- nothing but InvalidInputError escapes ------------------------------------------------------


def parse_or_invalid(data: bytes, fmt: str) -> None:
    try:
        parsed = parse(data, fmt, layer=3)
    except InvalidInputError:
        return
    for vector in parsed.vectors.values():  # if garbage does parse, it must still be valid
        assert vector.dtype == torch.float32 and vector.shape == (D_MODEL,)
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_invalid_input(fmt, data):
    parse_or_invalid(data, fmt)


_PREFIXES = {
    "json": st.sampled_from([b"", b"[", b'{"vectors": {"3": [', b'{"layer": 3, "vector": [']),
    "safetensors": st.integers(0, 4096).map(lambda n: struct.pack("<Q", n) + b"{"),
    "gguf": st.sampled_from([2, 3]).map(lambda v: b"GGUF" + struct.pack("<I", v)),
}


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data())
def test_garbage_after_a_valid_prefix_raises_only_invalid_input(fmt, data):
    prefix = data.draw(_PREFIXES[fmt])
    parse_or_invalid(prefix + data.draw(st.binary(max_size=4096)), fmt)


_VALID = {fmt: export_vectors(VectorSet(raw_vectors(), {"model_hint": "llama"}), fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(data=st.data())
def test_corrupted_valid_files_raise_only_invalid_input(fmt, data):
    corrupted = bytearray(_VALID[fmt])
    # mostly hit the header, where the structure lives; sometimes anywhere
    limit = data.draw(st.sampled_from([64, 512, len(corrupted)]))
    edits = data.draw(st.lists(st.tuples(st.integers(0, limit - 1), st.integers(0, 255)), min_size=1, max_size=8))
    for pos, value in edits:
        corrupted[pos] = value
    cut = data.draw(st.integers(0, len(corrupted)))
    parse_or_invalid(bytes(corrupted[:cut]) if data.draw(st.booleans()) else bytes(corrupted), fmt)
