"""Stop sequences: generation ends at the first occurrence of any of them in the decoded text,
and what is returned (and monitored) is the text before it, as OpenAI does.

A stop string rarely falls on a token boundary (" 5," is one token; the stop is "5"), so the
answer keeps the longest run of whole tokens whose text lies before the match: the returned
text is exactly those tokens' text, and the monitored span is exactly those tokens. A piece of a
token before the match (here the space of " 5,") is dropped with it.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Checks a growing answer for the stop strings. Decoding the whole answer each step costs
    O(length) per step; answers are at most a few thousand tokens, a decode is microseconds."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]

    def _text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def cut(self, output_ids: Sequence[int]) -> int | None:
        """None while no stop string appears; else how many leading tokens to keep."""
        if not self.stops:
            return None
        text = self._text(output_ids)
        starts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if not starts:
            return None
        before = text[: min(starts)]
        keep = len(output_ids)
        while keep > 0:
            kept = self._text(output_ids[:keep])
            if len(kept) <= len(before) and before.startswith(kept):
                break
            keep -= 1
        return keep


def cut_at_stop(generation_output: list[int], keep: int) -> tuple[list[int], int | None]:
    """(tokens kept, text_end) for a stop matched after `keep` whole tokens. A match inside the
    very first token keeps that token (a response span is never empty: it is what was scored)
    with an empty text."""
    if keep == 0:
        return generation_output[:1], 0
    return generation_output[:keep], None
