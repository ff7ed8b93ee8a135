"""Requester-controlled text (prompts, completions) made safe to show an operator.

A terminal runs what it is sent: ESC and the C1 CSI (\\x9b) start escape sequences that recolour,
move the cursor, retitle the window or rewrite the screen; BEL rings; bidi overrides reorder what
is shown, so a prompt can read as something it is not. Each such character is replaced by its
escape (`\\x1b`, `\\u202e`): the operator sees that it was there, and the terminal never gets it.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls; the bidi embeddings, overrides (U+202A-E) and isolates (U+2066-9).
_BIDI = "\u202a-\u202e\u2066-\u2069"
_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}]")
# The same, but tab, line feed and carriage return kept: ordinary text in a quoted CSV cell.
_CONTROLS_BUT_LINE_BREAKS = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{_BIDI}]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible_controls(text: str, *, keep_line_breaks: bool = False) -> str:
    """`text` with every control character (and bidi control) spelled as its escape."""
    pattern = _CONTROLS_BUT_LINE_BREAKS if keep_line_breaks else _CONTROLS
    return pattern.sub(_escape, text)
