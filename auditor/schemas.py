"""The field types and hard ceilings every request body is built from: storable text (`Text`,
`unstorable`), concept names, finite numbers, the size ceilings published in the OpenAPI document
(auditor.settings tightens some per deployment), and the chat message that chat completions and
audits both carry. Below the API on purpose: settings and vector parsing use these too.

The bodies themselves: auditor.api.openai.protocol (the OpenAI wire format) and
auditor.api.schemas (admin, audits, jobs, tokens, errors)."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"

# Hard ceilings on request shapes, published in the OpenAPI document. Settings (auditor/settings.py,
# "input limits") can tighten the last three per deployment; the routes check those.
MAX_D_MODEL = 65536  # values per vector; a vector must still match the served model's d_model
MAX_VECTOR_LAYERS = 512  # layers per vector set; each must still exist in the served model
MAX_TEXT_CHARS = 100_000  # one prompt, chat message or completion
MAX_MESSAGES = 256
MAX_TOKENS = 4096
MAX_PAIRS = 2000
MAX_AUDIT_ITEMS = 64
# JSON numbers are decoded by Python's json, which takes NaN, Infinity and 1e999 (= inf); a request
# body with a float field refuses them (422 "Input should be a finite number"), so none is stored.
FINITE = ConfigDict(allow_inf_nan=False)
# OpenAI's seed is an int64; torch's generator would overflow past it (a 500 from the worker).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Text no database can store: NUL (Postgres text and jsonb refuse it) and unpaired surrogates
# (JSON's "\udXXX" escapes decode to them; they are not Unicode and have no UTF-8 encoding).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def unstorable(value: Any, where: str = "text", *, finite: bool = False) -> str | None:
    """Why `value` (a string, or JSON-like data: dicts, lists, numbers) cannot be stored, or None.
    With `finite`, NaN and infinities count too (Postgres jsonb refuses them)."""
    if isinstance(value, str):
        if (match := _UNSTORABLE.search(value)) is None:
            return None
        char = match.group()
        what = "a NUL character (U+0000)" if char == "\x00" else f"an unpaired surrogate (U+{ord(char):04X})"
        return f"{where} contains {what}, which cannot be stored"
    if isinstance(value, float):
        return f"{where} is {value}, not a finite number" if finite and not math.isfinite(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        inner = f"{where}[{key!r}]"
        if problem := (unstorable(key, f"a key of {where}") or unstorable(item, inner, finite=finite)):
            return problem
    return None


def _storable(text: str) -> str:
    if problem := unstorable(text, "the text"):
        raise ValueError(problem)
    return text


Text = Annotated[str, AfterValidator(_storable)]  # every free text a request body carries


# A conversation turn as OpenAI's chat format has it; /v1/audits items carry the same.
class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_TEXT_CHARS)
