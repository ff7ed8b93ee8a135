"""Load a causal LM (bundled GGUF, HF name, local dir or .gguf file) and wrap it in a
TransformerLens bridge, with a fingerprint that names the basis its vectors live in."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from auditor.errors import ModelLoadError
from auditor.model_identity import (
    HOOK_POINT,
    LOADER_GGUF,
    ModelFingerprint,
    file_sha256,
    local_revision,
    resolve_source,
)
from auditor.settings import DEFAULT_MODEL

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    bridge: object  # transformer_lens TransformerBridge
    tokenizer: object
    fingerprint: ModelFingerprint
    device: torch.device
    eos_token_ids: frozenset[int]
    is_chat: bool
    max_context: int
    load_seconds: float

    @property
    def n_layers(self) -> int:
        return self.fingerprint.n_layers

    @property
    def d_model(self) -> int:
        return self.fingerprint.d_model

    @property
    def hf_model(self):
        return self.bridge.original_model

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the token ids a prompt may hold."""
        return self.hf_model.get_input_embeddings().num_embeddings

    def hook_name(self, layer: int) -> str:
        return f"blocks.{layer}.{HOOK_POINT}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _load_hf(spec: str, dtype: torch.dtype, cache_dir: Path | None):
    """-> (hf_model, tokenizer, model_id, revision, loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    path = Path(source.location)
    try:
        if source.loader == LOADER_GGUF:
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            revision = file_sha256(path)
            hf_model, tokenizer = _load_gguf(path, revision, dtype, cache_dir)
            return hf_model, tokenizer, source.model_id, revision, source.loader
        tokenizer = AutoTokenizer.from_pretrained(source.location)
        hf_model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {spec!r}: {exc}") from exc
    revision = getattr(hf_model.config, "_commit_hash", None) or (local_revision(path) if path.is_dir() else "unknown")
    return hf_model, tokenizer, source.model_id, revision, source.loader


def _load_gguf(path: Path, revision: str, dtype: torch.dtype, cache_dir: Path | None):
    """Dequantising a GGUF file takes ~15 s on CPU; the float weights are kept as safetensors
    under `cache_dir`, keyed by the file's hash, so later loads take about a second."""
    import safetensors.torch as safetensors_torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_name = str(dtype).removeprefix("torch.")
    converted = Path(cache_dir) / f"{path.stem}-{revision[:16]}-{dtype_name}" if cache_dir else None
    if converted is not None and (converted / WEIGHTS_FILE).exists():
        hf_model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
        return hf_model, AutoTokenizer.from_pretrained(converted)
    _silence_gguf_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    if converted is not None:
        staging = converted.with_name(converted.name + f".tmp-{os.getpid()}")
        staging.mkdir(parents=True, exist_ok=True)
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
        # floats by now, so write them (tied tensors once) with their config and tokenizer.
        config = hf_model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        hf_model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        safetensors_torch.save_model(hf_model, staging / WEIGHTS_FILE)
        try:
            staging.rename(converted)  # atomic: a concurrent loader sees all or nothing
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return hf_model, tokenizer


def _silence_gguf_progress_bar() -> None:
    """transformers draws a raw tqdm bar while dequantising GGUF tensors (it ignores its own
    disable_progress_bar); the CLI shows its own progress, so mute that one bar only."""
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if not isinstance(gguf_utils.tqdm, functools.partial):
        gguf_utils.tqdm = functools.partial(gguf_utils.tqdm, disable=True)


def load_model(
    spec: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", cache_dir: Path | None = None
) -> LoadedModel:
    """Load once per process. Never call this in a prefork parent (DESIGN.md).

    `cache_dir` keeps dequantised copies of GGUF weights (None: convert on every load)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers.utils import logging as hf_logging

    started = time.perf_counter()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hf_model, tokenizer, model_id, revision, loader = _load_hf(spec, torch_dtype, cache_dir)
    hf_model = hf_model.to(torch_device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(model_id, hf_model=hf_model, tokenizer=tokenizer)
    config = hf_model.config
    fingerprint = ModelFingerprint(
        model_id=model_id,
        revision=revision,
        loader=loader,
        hook_point=HOOK_POINT,
        n_layers=int(config.num_hidden_layers),
        d_model=int(config.hidden_size),
    )
    eos = getattr(hf_model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, (list, tuple)) else [eos])
    seconds = time.perf_counter() - started
    log.info("loaded %s (%s) on %s in %.1fs", model_id, loader, torch_device, seconds)
    return LoadedModel(
        bridge=bridge,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
        device=torch_device,
        eos_token_ids=eos_ids,
        is_chat=bool(getattr(tokenizer, "chat_template", None)),
        max_context=int(getattr(config, "max_position_embeddings", 2048)),
        load_seconds=seconds,
    )
