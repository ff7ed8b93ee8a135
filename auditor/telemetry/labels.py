"""Label values kept bounded: the fixed enumerations a label may take, and how a free-form
value (model id, concept name) is made safe and short.

Every distinct label value is a time series that Prometheus keeps for its whole retention, so an
unexpected enumeration value is counted as "other" and free text is cut and sanitised; a request
id, a prompt or other free text is never a label.
"""

from __future__ import annotations

import re

from auditor.db.enums import FlagKind, RequestKind, RequestStatus

REQUEST_KINDS = RequestKind.values()  # = auditor.db.models.REQUEST_KINDS (tested)
# done/failed: the worker finished or failed the request; cancelled: its streaming client left;
# timeout: the API stopped waiting; unavailable: it never reached a worker (broker down);
# rejected: refused before queueing.
REQUEST_STATUSES = (
    RequestStatus.DONE.value,
    RequestStatus.FAILED.value,
    RequestStatus.CANCELLED.value,
    "timeout",
    "unavailable",
    "rejected",
)
FLAG_KINDS = FlagKind.values()  # = auditor.db.models.FLAG_KINDS (tested)
# Flags that say the output text and the residual stream disagree (the divergence alert).
DIVERGENCE_FLAG_KINDS = (FlagKind.HIDDEN.value, FlagKind.SURFACE.value)
TOKEN_DIRECTIONS = ("prompt", "completion")
OTHER = "other"  # what an unexpected enumeration value is counted as
UNKNOWN = "unknown"  # what an empty free-form value (model, concept) is counted as

LABEL_MAX_CHARS = 128
# Concept names are already [A-Za-z0-9_.-]{1,128}; model ids add "/" (HF names) and ":".
_UNSAFE_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_.:/-]")


def label_value(value: object) -> str:
    """A free-form label value (model id, concept name) made safe and short.

    Characters outside [A-Za-z0-9_.:/-] become "_" and the value is cut to 128 characters, so
    a stray path or message can never mint an unbounded family of series."""
    text = _UNSAFE_LABEL_CHARS.sub("_", str(value))[:LABEL_MAX_CHARS]
    return text or UNKNOWN


def one_of(value: str, allowed: tuple[str, ...]) -> str:
    """`value` if it is one of `allowed`, else "other"."""
    return value if value in allowed else OTHER


def layer_label(layer: int) -> str:
    return str(int(layer))
