"""Parse time and peak memory of the worst vector files the upload limits allow.

    python bench/upload_parse.py                          # SmolLM2-135M's shape: 30 layers x 576
    python bench/upload_parse.py --n-layers 32 --d-model 4096

`POST /admin/concepts/upload` runs `parse_vectors` in a threadpool worker; this measures that call
alone, on files built to cost the most while staying inside every limit: the largest files that
are accepted (a vector at every layer, metadata at its depth, entry and size limits), and the
costliest that are refused, each as large as the check that refuses it lets it be (JSON empty
objects and lists up to the decoder's counts, a safetensors header of empty objects up to its
length bound, one tensor filling AUDITOR_MAX_UPLOAD_BYTES, GGUF metadata arrays as the old header
scan allowed them: the issue saw 11 s and +790 MiB for such a file).

Peak RSS is the rise of this process's high-water mark (VmHWM, reset through
/proc/self/clear_refs before each case) over its resident size just before the parse, with the
file already in memory: what parsing one upload adds to an API process. Linux only. Takes ~10 s.

Measured (30 x 576, 2 shared cores): every case under 0.07 s and +64 MiB; the largest rise is a
refused 64 MiB safetensors tensor (safetensors' loader copies it once), the accepted files add
under 3 MiB. The GGUF of metadata arrays (3.75 MiB; before arrays were refused: 8.9 s and +413 MiB)
is refused by the header scan in under a millisecond.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save as safetensors_save

from auditor.errors import InvalidInputError
from auditor.settings import Settings
from auditor.vectors import parse_vectors
from auditor.vectors.common import Spec
from auditor.vectors.json_format import json_length_limit
from auditor.vectors.metadata import MAX_ESCAPED_METADATA_BYTES, MAX_METADATA_CHARS, MAX_METADATA_ENTRIES

MiB = 2**20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(data: bytes, fmt: str, spec: Spec, max_bytes: int) -> dict:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    try:
        parsed = parse_vectors(
            data, fmt, d_model=spec.d_model, n_layers=spec.n_layers, layer=spec.layer, max_bytes=max_bytes
        )
        outcome = f"accepted ({len(parsed.vectors)} layers)"
        del parsed
    except InvalidInputError as exc:
        outcome = f"422: {str(exc)[:90]}"
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return {"seconds": round(seconds, 3), "peak_rss_mib": round((peak - before) / 1024, 1), "outcome": outcome}


# --- the files ---------------------------------------------------------------------------------------


def worst_metadata() -> dict[str, str]:
    """MAX_METADATA_ENTRIES string keys whose JSON is exactly MAX_METADATA_CHARS long."""
    per_entry = MAX_METADATA_CHARS // MAX_METADATA_ENTRIES - len('"k0000":"",')
    metadata = {f"k{i:04d}": "x" * per_entry for i in range(MAX_METADATA_ENTRIES)}
    short = MAX_METADATA_CHARS - len(json.dumps(metadata, separators=(",", ":")))
    metadata["k0000"] = "x" * (per_entry + short)
    return metadata


def layers_of(spec: Spec) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {layer: rng.normal(size=spec.d_model).astype(np.float32) for layer in range(1, spec.n_layers)}


def json_accepted(spec: Spec) -> bytes:
    # float64 values with a long repr (-1.2345678901234567e-05), indented: as long as real files get
    vectors = {str(k): (v.astype(np.float64) * 1e-5 * np.pi).tolist() for k, v in layers_of(spec).items()}
    return json.dumps({"vectors": vectors, "metadata": worst_metadata()}, indent=8).encode()


def json_empty_objects(spec: Spec) -> bytes:
    """As many empty objects as the decoder's object count lets through (the document, "vectors"
    and "metadata" are three)."""
    count = MAX_METADATA_ENTRIES + 3 - 3 - 1
    return b'{"vectors": {}, "metadata": {"x": [' + b"{}," * count + b"{}]}}"


def json_empty_lists(spec: Spec) -> bytes:
    """As many empty lists as the bracket count allows (the length bound comes first otherwise)."""
    allowed = spec.n_layers + 1 + MAX_METADATA_ENTRIES + MAX_METADATA_CHARS
    count = min(allowed, json_length_limit(spec) // 3 - 20) - 2  # "x" and the last one are two
    return b'{"vectors": {}, "metadata": {"x": [' + b"[]," * count + b"[]]}}"


def safetensors_accepted(spec: Spec) -> bytes:
    tensors = {f"direction.{k}": torch.from_numpy(v) for k, v in layers_of(spec).items()}
    return safetensors_save(tensors, metadata=worst_metadata())


def safetensors_empty_objects_header(spec: Spec) -> bytes:
    room = 256 * spec.n_layers + MAX_ESCAPED_METADATA_BYTES
    header = b'{"__metadata__": {"x": [' + b"{}," * ((room - 40) // 3) + b"{}]}}"
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def safetensors_one_huge_tensor(spec: Spec, upload_bytes: int) -> bytes:
    return safetensors_save({"direction.1": torch.ones((upload_bytes - 4096) // 4)})


def gguf_file(tensors: dict[str, np.ndarray], fill: Callable | None = None) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        writer = gguf.GGUFWriter(path, "controlvector")
        if fill:
            fill(writer)
        for name, values in tensors.items():
            writer.add_tensor(name, values)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def gguf_accepted(spec: Spec) -> bytes:
    keys = MAX_METADATA_ENTRIES - 1  # + general.architecture
    value = "x" * (MAX_METADATA_CHARS // keys - len("controlvector.k0000") - 1)

    def fill(writer):
        for i in range(keys):
            writer.add_string(f"controlvector.k{i:04d}", value)

    return gguf_file({f"direction.{k}": v for k, v in layers_of(spec).items()}, fill)


def gguf_one_huge_tensor(spec: Spec, upload_bytes: int) -> bytes:
    return gguf_file({"direction.1": np.ones((upload_bytes - 4096) // 4, np.float32)})


def gguf_arrays(spec: Spec) -> bytes:
    """Metadata arrays as large as the old scan allowed: 8.9 s and +413 MiB before arrays were refused."""
    items, keys = 65_536, 5  # the old per-array limit; each item an empty array (12 bytes)
    array = struct.pack("<IQ", 9, items) + struct.pack("<IQ", 9, 0) * items
    kvs = b"".join(struct.pack("<Q", 5) + f"k{i:04d}".encode() + struct.pack("<I", 9) + array for i in range(keys))
    return b"GGUF" + struct.pack("<IQQ", 3, 0, keys) + kvs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layers", type=int, default=30)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    spec = Spec(args.d_model, args.n_layers, None)
    upload_bytes = Settings().max_upload_bytes
    cases: dict[str, tuple[str, Callable[[], bytes]]] = {
        "json: every layer + metadata at its limits": ("json", lambda: json_accepted(spec)),
        "json: empty objects up to the object count": ("json", lambda: json_empty_objects(spec)),
        "json: empty lists up to the bracket count": ("json", lambda: json_empty_lists(spec)),
        "safetensors: every layer + metadata at its limits": ("safetensors", lambda: safetensors_accepted(spec)),
        "safetensors: header of empty objects up to its bound": (
            "safetensors",
            lambda: safetensors_empty_objects_header(spec),
        ),
        "safetensors: one tensor filling MAX_UPLOAD_BYTES": (
            "safetensors",
            lambda: safetensors_one_huge_tensor(spec, upload_bytes),
        ),
        "gguf: every layer + metadata at its limits": ("gguf", lambda: gguf_accepted(spec)),
        "gguf: one tensor filling MAX_UPLOAD_BYTES": ("gguf", lambda: gguf_one_huge_tensor(spec, upload_bytes)),
        "gguf: metadata arrays (what the old limits allowed)": ("gguf", lambda: gguf_arrays(spec)),
    }
    print(
        f"model shape: {spec.n_layers} layers x d_model {spec.d_model}; MAX_UPLOAD_BYTES {upload_bytes / MiB:.0f} MiB"
    )
    print(f"{'case':<54} {'file':>9} {'parse s':>8} {'+RSS MiB':>9}  outcome")
    results = []
    for name, (fmt, build) in cases.items():
        data = build()
        row = {
            "case": name,
            "format": fmt,
            "file_mib": round(len(data) / MiB, 2),
            **measure(data, fmt, spec, upload_bytes),
        }
        del data
        results.append(row)
        print(
            f"{name:<54} {row['file_mib']:>8.2f}M {row['seconds']:>8.3f} {row['peak_rss_mib']:>9.1f}  {row['outcome']}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"n_layers": spec.n_layers, "d_model": spec.d_model, "cases": results}, indent=2)
        )


if __name__ == "__main__":
    main()
