"""Flags: one row per (request, concept, layer, kind) the monitor raised."""

from __future__ import annotations

from sqlalchemy.orm import Session

from auditor.db.enums import FlagKind
from auditor.db.models import Flag
from auditor.db.store.codecs import optional_float
from auditor.db.store.validation import check_choice


def add_flag(
    session: Session,
    *,
    request_id: str,
    concept_id: int,
    layer: int,
    kind: str,
    residual_signal: float,
    threshold: float,
    reason: str,
    text_signal: float | None = None,
) -> Flag:
    check_choice("kind", kind, FlagKind.values())
    flag = Flag(
        request_id=request_id,
        concept_id=concept_id,
        layer=layer,
        kind=kind,
        residual_signal=float(residual_signal),
        text_signal=optional_float(text_signal),
        threshold=float(threshold),
        reason=reason,
    )
    session.add(flag)
    session.flush()
    return flag
