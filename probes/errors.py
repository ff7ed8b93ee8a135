"""The root of Auditor's error hierarchy for bad input.

Lives in the lowest layer so that pure math can raise it and every caller (CLI, API, workers)
can map it to a clear message or a 4xx without knowing which layer noticed the problem.
"""


class InvalidInputError(ValueError):
    """Input that cannot be processed. The message says what was wrong and what was expected."""
