"""Pure tensor math for concept vectors: extraction, pooling, scoring, calibration, steering.

Imports torch and numpy only: no I/O beyond reading the concept data files shipped beside it,
no settings, no logging, no database.
"""

from probes.errors import InvalidInputError

__all__ = ["InvalidInputError"]
