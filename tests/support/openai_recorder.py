"""A stand-in OpenAI server on a loopback port that records every request body and answers with a
minimal well-formed reply (chat, text completion with `echo` log-probabilities, or an SSE stream),
so a third-party client runs to completion and what it *sent* can be checked: no model needed.

Echoed prompt log-probabilities are one entry per whitespace-separated piece (never the real
model's tokens): enough for a client to parse, not to score."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USAGE = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
ANSWER = "5"


def _chat(body: dict) -> dict:
    message = {"role": "assistant", "content": ANSWER, "refusal": None}
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}
    return {"id": "chatcmpl-rec", "object": "chat.completion", "created": 1, "model": body.get("model") or "m",
            "choices": [choice], "usage": USAGE}  # fmt: skip


def _completion(body: dict) -> dict:
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    choices = []
    for index, prompt in enumerate(prompts):
        logprobs, text = None, ANSWER
        if body.get("echo"):
            pieces = (prompt.split(" ") if isinstance(prompt, str) else [str(t) for t in prompt]) + [ANSWER]
            logprobs = {
                "tokens": pieces,
                "token_logprobs": [None] + [-1.0] * (len(pieces) - 1),
                "top_logprobs": [None] + [{piece: -1.0} for piece in pieces[1:]],
                "text_offset": list(range(len(pieces))),
            }
            text = f"{prompt}{ANSWER}" if isinstance(prompt, str) else ANSWER
        choices.append({"index": index, "text": text, "finish_reason": "length", "logprobs": logprobs})
    return {"id": "cmpl-rec", "object": "text_completion", "created": 1, "model": body.get("model") or "m",
            "choices": choices, "usage": USAGE}  # fmt: skip


def _stream(body: dict) -> Iterator[bytes]:
    base = {"id": "chatcmpl-rec", "object": "chat.completion.chunk", "created": 1, "model": body.get("model") or "m"}
    deltas = [({"role": "assistant", "content": ""}, None), ({"content": ANSWER}, None), ({}, "stop")]
    for delta, finish in deltas:
        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n".encode()
    if (body.get("stream_options") or {}).get("include_usage"):
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': USAGE})}\n\n".encode()
    yield b"data: [DONE]\n\n"


class Recorder:
    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []  # (path, body) in arrival order

    def bodies(self, path_suffix: str) -> list[dict]:
        return [body for path, body in self.requests if path.endswith(path_suffix)]

    def clear(self) -> None:
        self.requests.clear()


@contextmanager
def recording_openai_server() -> Iterator[tuple[str, Recorder]]:
    """Yields (base URL without /v1, recorder). GETs (lm-eval's /tokenizer_info probe) are 404s."""
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(404)
            self.send_header("content-length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            recorder.requests.append((self.path, body))
            if body.get("stream"):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                for event in _stream(body):
                    self.wfile.write(event)
                self.close_connection = True
                return
            chat = self.path.endswith("/chat/completions")
            if chat and "model" not in body:
                status, reply = 422, {"error": {"message": "model is required", "type": "invalid_request_error"}}
            else:
                status, reply = 200, (_chat(body) if chat else _completion(body))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
