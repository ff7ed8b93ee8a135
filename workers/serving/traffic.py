"""The deployment's own recorded traffic as the null: answers served (or audited) over a baseline
window, replayed exactly as control answers are. Real traffic is what thresholds must hold on.

Only requests whose prompt and completion are stored verbatim can be replayed: `full` privacy
mode, finished, not steered, from the loaded model. Chat prompts are re-encoded from the
messages kept with the request (`params.messages`, stored in `full` mode only).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from auditor.db.models import MonitoredRequest
from auditor.db.store import replayable_requests
from workers.monitoring.control import ControlAnswer
from workers.runtime.generate import encode_prompt
from workers.runtime.model import LoadedModel


def _prompt_ids(model: LoadedModel, request: MonitoredRequest) -> list[int] | None:
    if prompt_ids := (request.params or {}).get("prompt_ids"):
        return list(prompt_ids)  # a prompt sent as token ids (kept in full mode only)
    messages = (request.params or {}).get("messages")
    if messages:
        return encode_prompt(model, messages, chat=True)
    if request.kind == "chat":
        return None  # recorded before messages were kept: its template cannot be rebuilt
    return encode_prompt(model, request.prompt_text, chat=False)


def traffic_answers(
    session: Session, model: LoadedModel, since: datetime, until: datetime, max_tokens: int, limit: int = 20_000
) -> list[ControlAnswer]:
    """Recorded answers in [since, until) as (prompt ids, output ids): the completion's tokens,
    plus the EOS it ended on when it stopped by itself, cut to `max_tokens`."""
    answers = []
    eos = model.tokenizer.eos_token_id
    for request in session.scalars(replayable_requests(since, until, model.fingerprint.hash).limit(limit)):
        prompt_ids = _prompt_ids(model, request)
        output_ids = model.tokenizer(request.completion_text, add_special_tokens=False)["input_ids"]
        if request.kind != "audit" and request.finish_reason == "stop" and eos is not None:
            output_ids = [*output_ids, eos]
        if prompt_ids is None or not output_ids or len(prompt_ids) + len(output_ids) > model.max_context:
            continue
        answers.append(ControlAnswer(prompt_ids, output_ids[:max_tokens]))
    return answers
