"""Daily rollups: what retention keeps of requests older than its window."""

from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Date, Double, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from auditor.db.models.base import Base


class DailyRollup(Base):
    """What retention (auditor/db/retention.py) keeps of requests older than its window: per UTC
    day, serving model and concept version, the count, sum, sum of squares, min and max of the
    primary-layer raw score and of the calibrated z (over the rows that have one), and the
    requests flagged for the concept (at any layer), in all and by kind. Sums rather than means,
    so that batches and concurrent runs add up exactly: mean = sum / n, var = sumsq / n − mean²."""

    __tablename__ = "daily_rollups"
    __table_args__ = (Index("ix_daily_rollups_concept_day", "concept_id", "day"),)

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    model_id: Mapped[str] = mapped_column(String(512), primary_key=True)  # "" when unknown
    concept_id: Mapped[int] = mapped_column(ForeignKey("concepts.id"), primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(Integer)  # the concept version's primary layer
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    score_sum: Mapped[float] = mapped_column(Double, default=0.0)
    score_sumsq: Mapped[float] = mapped_column(Double, default=0.0)
    score_min: Mapped[float | None] = mapped_column(Double)
    score_max: Mapped[float | None] = mapped_column(Double)
    z_count: Mapped[int] = mapped_column(BigInteger, default=0)
    z_sum: Mapped[float] = mapped_column(Double, default=0.0)
    z_sumsq: Mapped[float] = mapped_column(Double, default=0.0)
    z_min: Mapped[float | None] = mapped_column(Double)
    z_max: Mapped[float | None] = mapped_column(Double)
    flagged: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_hidden: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_surface: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_threshold: Mapped[int] = mapped_column(BigInteger, default=0)
    flagged_drift: Mapped[int] = mapped_column(BigInteger, default=0)
