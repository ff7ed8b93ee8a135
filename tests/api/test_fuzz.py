"""Bad input. Property-based fuzzing of the whole HTTP API from its own OpenAPI schema
(schemathesis), then explicit tests for every input limit, invalid UTF-8 and NaN / Infinity.

The fuzz target is the HTTP validation layer: every generated request, schema-valid or not, must
get an answer below 500, in the documented status codes, content types and body schemas (every
4xx as the app's one error body). The app runs in-process (ASGI) on a fresh Postgres database
(when one is reachable: it refuses text SQLite stores) and a fresh SQLite one, with an
all-scopes token; Hypothesis is derandomized, so every run sends the same requests. Generation
goes to a stub dispatcher, not the real embedded worker:
warming that up extracts and calibrates the built-in concepts (minutes on 2 cores), and the
extraction and calibration jobs the fuzzer queues would load the CPU long after the test. The
stub still makes the worker's first checks (SamplingConfig, the seeded generator), so a request
the API lets through that the worker would choke on fails here. Schema-valid cases also get
time parameters (report windows, the audit log's `since`) as a person types them: the schema
alone says only "a string" or a zoned date-time.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydantic import ValidationError
from schemathesis import GenerationMode
from sqlalchemy import func, select

from auditor.access import tokens
from auditor.api.main import create_app
from auditor.api.schemas import ErrorBody
from auditor.db.models import Concept, Job, MonitoredRequest
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.databases import Databases, _postgres_reachable

D_MODEL, N_LAYERS = 576, 30
MAX_EXAMPLES = 25  # per operation and mode: ~1,200 generated requests per database
FUZZ: dict[tuple[str, str], tuple[int, float]] = {}  # (backend, mode) -> (generated requests, seconds)


class StubDispatcher:
    """Answers like a worker, without a model (see the module docstring)."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, list[Any]]] = []
        self.submitted: list[tuple[str, list[Any]]] = []

    def run(self, task: str, args: list[Any], *, task_id: str, timeout: float) -> dict:
        import torch

        from workers.runtime.generate import SamplingConfig

        self.runs.append((task, args))
        if args[1]["sampling"]["max_new_tokens"] == 0:  # echo of the prompt only: nothing sampled
            return {**self._answer(args[0]), "completion_tokens": 0, "text": ""}
        sampling = SamplingConfig(**args[1]["sampling"])
        if sampling.seed is not None:
            torch.Generator(device="cpu").manual_seed(sampling.seed)
        return self._answer(args[0])

    def run_many(self, task: str, arg_lists: list[list[Any]], *, task_ids: list[str], timeout: float) -> list[dict]:
        return [self.run(task, args, task_id=task_id, timeout=timeout) for args, task_id in zip(arg_lists, task_ids)]

    @staticmethod
    def _answer(request_id: str) -> dict:
        return {
            "request_id": request_id,
            "status": "done",
            "text": "stub",
            "finish_reason": "stop",
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "scores": {},
            "flags": [],
        }

    def submit(self, task: str, args: list[Any], *, task_id: str) -> None:
        self.submitted.append((task, args))


class Counted:
    """ASGI wrapper counting responses by status, separately for requests that carry our token
    (schemathesis' ignored_auth check also sends each request without it, or with a fake one)."""

    def __init__(self, app, token: str) -> None:
        self.app, self.ours = app, f"Bearer {token}".encode()
        self.statuses: Counter[int] = Counter()
        self.authenticated: Counter[int] = Counter()

    def __getattr__(self, name: str):
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ours = dict(scope["headers"]).get(b"authorization") == self.ours

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] += 1
                if ours:
                    self.authenticated[message["status"]] += 1
            await send(message)

        await self.app(scope, receive, counted_send)


@dataclass
class Target:
    backend: str
    app: Counted
    token: str
    token_id: int
    decoy_token_id: int
    generated: int = 0


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def fuzz_target(request, tmp_path_factory) -> Iterator[Target]:
    """Postgres as in production (it refuses text SQLite stores: NUL), SQLite as embedded."""
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    databases = Databases(request.param, tmp_path_factory.mktemp("fuzz"))
    url = databases.new_url()
    token, decoy = issue_token(url), issue_token(url, name="decoy")
    app = create_app(
        Settings(
            database_url=url, data_dir=tmp_path_factory.mktemp("fuzz-data"), max_new_tokens=4, divergence_flags=False
        ),
        StubDispatcher(),
    )
    with app.state.sessions() as session:
        token_id, decoy_id = (tokens.authenticate(session, t).token_id for t in (token, decoy))
    yield Target(request.param, Counted(app, token), token, token_id, decoy_id)
    app.state.engine.dispose()
    databases.drop_all()


# Every check schemathesis has, with two exceptions. 413 is a right answer to an oversized
# (schema-violating) body. positive_data_acceptance is off: a schema-valid request may still be
# refused for what only the server knows (a vector of the wrong d_model, an unknown model name).
FUZZ_CONFIG = {
    "checks": {
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {
            "expected-statuses": ["400", "401", "403", "404", "405", "409", "413", "415", "422"]
        },
    },
    "operations": [
        # format=csv answers text/csv, which the report routes do not declare (yet).
        {"include-path-regex": "^/reports/", "checks": {"content_type_conformance": {"enabled": False}}},
        # `since` is a datetime: pydantic also reads a bare number as a Unix time, which the
        # schema (date-time) does not say. Lenient, not wrong.
        {"include-path": "/admin/audit-log", "checks": {"negative_data_rejection": {"enabled": False}}},
    ],
}


def _steer(case, generated: int) -> None:
    """Make every other schema-valid request also valid in what only the server knows, so the
    fuzzer reaches past those checks: the served model's name, a vector of its d_model at one of
    its layers, an audit item with exactly one of prompt / messages. Positive mode only: editing
    a negative case could repair the very violation it was made to carry."""
    body = case.body
    if generated % 2 or not isinstance(body, dict):
        return
    if case.operation.path in ("/v1/completions", "/v1/chat/completions"):
        body["model"] = "auditor"
        if isinstance(body.get("auditor"), dict):
            body["auditor"].pop("concepts", None)
    elif case.operation.path == "/admin/concepts" and case.method == "POST":
        for key in ("vectors", "primary_layer", "model_fingerprint"):
            body.pop(key, None)
        body["layer"] = generated % N_LAYERS
        body["vector"] = [((generated + i) % 7) - 3.0 for i in range(D_MODEL)]
    elif case.operation.path == "/v1/audits":
        for item in body.get("items", []):
            if item.get("prompt") is not None:
                item.pop("messages", None)
            elif item.get("messages"):
                item.pop("prompt", None)
            else:
                item.update(prompt="How are you?", messages=None)


# What a person types for a time, which the schema (a plain string, or date-time always with a
# zone) would never make the fuzzer send: a time without a zone, any offset on any day from year
# 1 to 9999 (the edges overflow once read as UTC), a date alone, `now`, and how long ago with
# counts up to far past what a datetime can hold.
_OFFSETS = st.none() | st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
ISO_TIMES = st.datetimes(timezones=_OFFSETS).map(datetime.isoformat) | st.dates().map(str)
DURATIONS = st.builds(
    "{}{}".format, st.integers(0, 1000) | st.integers(0, 10**15), st.sampled_from(["s", "m", "h", "d", "w"])
)
INSTANTS = ISO_TIMES | DURATIONS | st.just("now")
WINDOW_PARAMETERS = {
    "since": INSTANTS,
    "until": INSTANTS,
    "baseline": DURATIONS | st.builds("{}/{}".format, INSTANTS, INSTANTS),
}


def _times(case, data) -> None:
    """Give the time parameters of /reports/* and the audit log what a person would type, drawn
    by Hypothesis (so a failure shrinks to the offending time); None keeps the generated value."""
    path = case.operation.path
    if path.startswith("/reports/"):
        drawn = {name: data.draw(st.none() | values) for name, values in WINDOW_PARAMETERS.items()}
    elif path == "/admin/audit-log":
        drawn = {"since": data.draw(st.none() | ISO_TIMES)}
    else:
        return
    case.query = {**(case.query or {}), **{name: value for name, value in drawn.items() if value is not None}}


def _fuzz_operation(operation, mode: GenerationMode, target: Target) -> str | None:
    """Run one operation's generated requests; its first failure (shrunk by Hypothesis) as text."""

    # The token is a fixed header: generated or negated, it would only ever test the 401.
    @given(case=operation.as_strategy(generation_mode=mode, headers=bearer(target.token)), data=st.data())
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
    )
    def run(case, data) -> None:
        target.generated += 1
        if mode == GenerationMode.POSITIVE:
            _steer(case, target.generated)
            _times(case, data)
        if (
            operation.label == "DELETE /admin/tokens/{token_id}"
            and case.path_parameters.get("token_id") == target.token_id
        ):
            case.path_parameters["token_id"] = target.decoy_token_id  # revoking our own token would end the run
        case.call_and_validate()

    try:
        run()
    except Unsatisfiable:  # nothing to negate: an operation without parameters or body
        return None
    except (Exception, BaseExceptionGroup) as exc:
        return f"{mode.value} {operation.label}: {type(exc).__name__}: {exc}"[:4000]
    return None


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_the_api_from_its_openapi_schema(fuzz_target, mode):
    before, started = fuzz_target.generated, time.monotonic()
    schema = schemathesis.openapi.from_asgi(
        "/openapi.json", fuzz_target.app, config=schemathesis.Config.from_dict(FUZZ_CONFIG)
    )
    failures = [
        failure
        for result in schema.get_all_operations()
        if (failure := _fuzz_operation(result.ok(), mode, fuzz_target)) is not None
    ]
    key = (fuzz_target.backend, mode.value)
    FUZZ[key] = (fuzz_target.generated - before, time.monotonic() - started)
    print(
        f"\n{key}: {FUZZ[key][0]} generated requests in {FUZZ[key][1]:.0f} s; "
        f"responses so far with our token {dict(fuzz_target.app.authenticated)}, all {dict(fuzz_target.app.statuses)}"
    )
    assert not failures, "\n\n".join(failures)


def test_the_fuzzer_sent_over_1000_requests_and_got_no_server_error(fuzz_target):
    runs = [FUZZ.get((fuzz_target.backend, mode.value)) for mode in GenerationMode]
    if None in runs:
        pytest.skip("sums up the two fuzz runs above")
    assert sum(generated for generated, _ in runs) >= 1000, FUZZ
    assert not [status for status in fuzz_target.app.statuses if status >= 500], fuzz_target.app.statuses
    # Our token stayed valid throughout, so the fuzzer got past authentication to the routes.
    assert fuzz_target.app.authenticated[401] == 0 and fuzz_target.app.authenticated[200] > 100


# ---- every limit, invalid UTF-8, NaN: explicit ----

TIGHT = {
    "max_request_bytes": 4096,
    "max_upload_bytes": 8192,
    "max_prompt_chars": 50,
    "max_tokens_limit": 16,
    "max_pairs": 3,
    "max_audit_items": 2,
}


@dataclass
class Api:
    client: TestClient
    app: Any
    dispatcher: StubDispatcher

    def rows(self, model) -> int:
        with self.app.state.sessions() as session:
            return session.scalar(select(func.count()).select_from(model))


def _api(tmp_path_factory, name: str, **limits) -> Iterator[Api]:
    databases = Databases("sqlite", tmp_path_factory.mktemp(name))
    url = databases.new_url()
    token = issue_token(url)
    dispatcher = StubDispatcher()
    app = create_app(Settings(database_url=url, data_dir=tmp_path_factory.mktemp(f"{name}-data"), **limits), dispatcher)
    with TestClient(app, headers=bearer(token), raise_server_exceptions=False) as client:
        yield Api(client, app, dispatcher)
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def tight(tmp_path_factory) -> Iterator[Api]:
    """Small limits, so that each is cheap to pass."""
    yield from _api(tmp_path_factory, "tight", **TIGHT)


@pytest.fixture(scope="module")
def default(tmp_path_factory) -> Iterator[Api]:
    yield from _api(tmp_path_factory, "default")


def error(response, status: int, *fragments: str, kind: str | None = None) -> dict:
    """The response is `status` in the app's one error shape, and its message says what was wrong."""
    assert response.status_code == status, response.text
    body = ErrorBody.model_validate(response.json())
    text = " ".join(d.msg for d in body.detail) + " " + body.error.message
    for fragment in fragments:
        assert fragment in text, text
    if kind is not None:
        assert kind in {d.type for d in body.detail}, body
    return response.json()


def chat(content: str, **extra) -> dict:
    return {"model": "auditor", "messages": [{"role": "user", "content": content}], **extra}


JSON = {"content-type": "application/json"}


async def _drive(app, scope: dict, chunks: list[bytes]) -> tuple[int, int, dict]:
    """Call the ASGI app with `chunks` as the request body; return (status, chunks it read, body)."""
    pending, read, sent = list(chunks), 0, []

    async def receive():
        nonlocal read
        if not pending:
            return {"type": "http.disconnect"}
        read += 1
        chunk = pending.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, read, json.loads(body)


def _scope(path: str, token: str | None, content_length: int | None) -> dict:
    headers = [(b"content-type", b"application/json")]
    if token:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }


def test_a_declared_oversized_body_is_refused_before_a_byte_is_read(tight):
    import anyio

    chunks = [b"x" * 1024] * 8
    status, read, body = anyio.run(_drive, tight.app, _scope("/v1/completions", None, 8192), chunks)
    assert (status, read) == (413, 0)  # refused before authentication, before reading
    assert "4,096 bytes" in ErrorBody.model_validate(body).error.message


def test_a_chunked_oversized_body_is_refused_once_it_passes_the_limit(tight):
    import anyio

    token = tight.client.headers["authorization"].split()[-1]
    chunks = [b'{"model": "auditor", "prompt": "' + b"x" * 1000] + [b"x" * 1000] * 50
    before = tight.rows(MonitoredRequest)
    status, read, body = anyio.run(_drive, tight.app, _scope("/v1/completions", token, None), chunks)
    assert status == 413 and read == 5  # 5,000 bytes > 4,096: the other 46 chunks were never read
    assert ErrorBody.model_validate(body).detail[0].type == "request_too_large"
    assert tight.rows(MonitoredRequest) == before


def test_body_limits_over_http_and_the_larger_one_for_uploads(tight):
    before = tight.rows(Concept)
    big = {"name": "big", "layer": 1, "vector": [0.5] * 1200}  # ~5 kB: over 4 kB
    error(tight.client.post("/admin/concepts", json=big), 413, "4,096 bytes", kind="request_too_large")
    # The same bytes as an upload pass the body limit (8 kB) and reach the vector checks.
    upload = tight.client.post(
        "/admin/concepts/upload",
        data={"name": "big", "layer": "1"},
        files={"file": ("v.json", json.dumps(big["vector"]).encode())},
    )
    error(upload, 422, "dimension 1200", "d_model=576")
    too_big = tight.client.post("/admin/concepts/upload", data={"name": "big"}, files={"file": ("v.json", b"0" * 9000)})
    error(too_big, 413, "8,192 bytes")
    assert tight.rows(Concept) == before


def test_prompt_characters_are_limited_per_request(tight):
    before = tight.rows(MonitoredRequest)
    error(
        tight.client.post("/v1/completions", json={"model": "auditor", "prompt": "x" * 51}),
        422,
        "the prompt has 51 characters",
        "at most 50",
        kind="too_long",
    )
    messages = [{"role": "user", "content": "x" * 20}] * 3  # each short, 60 together
    response = tight.client.post("/v1/chat/completions", json={"model": "auditor", "messages": messages})
    assert error(response, 422, "messages together has 60")["detail"][0]["loc"] == ["body", "messages"]
    audit = {"items": [{"prompt": "x" * 10, "completion": "ok"}, {"prompt": "x" * 30, "completion": "y" * 30}]}
    response = tight.client.post("/v1/audits", json=audit)
    assert error(response, 422, "items[1]")["detail"][0]["loc"] == ["body", "items", 1]
    assert tight.rows(MonitoredRequest) == before and not tight.dispatcher.runs
    assert tight.client.post("/v1/completions", json={"model": "auditor", "prompt": "x" * 50}).status_code == 200


def test_a_validation_error_names_the_field_and_limit_without_echoing_the_whole_input(default):
    # The schema's ceiling (100,000 characters) refuses it before any setting: the 422 says which
    # field and what limit, and quotes only the start of the input (no prompt in logs or proxies).
    response = default.client.post("/v1/chat/completions", json=chat("secret " + "x" * 200_000))
    body = error(response, 422, "at most 100000 characters", kind="string_too_long")
    assert len(response.content) < 2_000, len(response.content)
    [detail] = body["detail"]
    assert detail["loc"] == ["body", "messages", 0, "content"] and detail["ctx"] == {"max_length": 100_000}
    assert detail["input"].startswith("secret xxx") and detail["input"].endswith("(cut: 200,007 characters)")
    # An input that is not a string is cut as its JSON text: here an object where a list belongs.
    response = default.client.post("/v1/chat/completions", json={"model": "auditor", "messages": {"m": "y" * 150_000}})
    [detail] = error(response, 422, "valid list", kind="list_type")["detail"]
    assert len(response.content) < 2_000 and detail["loc"] == ["body", "messages"], len(response.content)
    assert detail["input"].startswith('{"m": "yyy') and detail["input"].endswith("(cut: 150,009 characters)")
    # A short input is echoed whole, as FastAPI does.
    short = default.client.post("/v1/chat/completions", json=chat("hi", temperature="warm")).json()["detail"]
    assert short[0]["loc"] == ["body", "temperature"] and short[0]["input"] == "warm"


def test_max_tokens_is_bounded_by_the_settings(tight):
    for field in ("max_tokens", "max_completion_tokens"):
        error(
            tight.client.post("/v1/chat/completions", json=chat("hi", **{field: 17})),
            422,
            f"{field} is 17",
            "at most 16",
            kind="less_than_equal",
        )
    assert tight.client.post("/v1/chat/completions", json=chat("hi", max_tokens=16)).status_code == 200
    error(
        tight.client.post("/v1/completions", json={"model": "auditor", "prompt": "hi", "max_tokens": 4097}),
        422,
        "max_tokens",
    )  # the schema's ceiling, whatever the settings
    with pytest.raises(ValidationError):
        Settings(max_tokens_limit=4097)  # settings can only tighten the schema's ceilings


def test_pairs_and_audit_items_are_limited(tight):
    before = (tight.rows(Job), tight.rows(MonitoredRequest))
    pairs = [{"positive": f"good {i}", "negative": f"bad {i}"} for i in range(4)]
    error(
        tight.client.post("/admin/concepts/extract", json={"name": "many", "pairs": pairs}),
        422,
        "4 pairs",
        "at most 3",
        kind="too_long",
    )
    items = [{"prompt": "p", "completion": "c"}] * 3
    error(tight.client.post("/v1/audits", json={"items": items}), 422, "3 items", "at most 2", kind="too_long")
    assert (tight.rows(Job), tight.rows(MonitoredRequest)) == before and not tight.dispatcher.submitted


def test_vector_size_and_layers_are_bounded(default):
    before = default.rows(Concept)
    error(
        default.client.post("/admin/concepts", json={"name": "v", "layer": 1, "vector": [1.0] * 65537}),
        422,
        "at most 65536",
    )
    vectors = {str(layer): [1.0] for layer in range(513)}
    error(default.client.post("/admin/concepts", json={"name": "v", "vectors": vectors}), 422, "at most 512")
    error(
        default.client.post("/admin/concepts", json={"name": "v", "vectors": {"31": [1.0] * D_MODEL}}),
        422,
        "out of range",
    )
    error(
        default.client.post("/admin/concepts", json={"name": "v", "layer": 3, "vector": [1.0] * (D_MODEL + 1)}),
        422,
        "dimension 577",
        "d_model=576",
    )
    assert default.rows(Concept) == before


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", b'{"model": "auditor", "prompt": "caf\xe9"}'),  # Latin-1, not UTF-8
    ("/v1/chat/completions", b'{"model": "auditor", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    ("/admin/concepts", b'{"name": "\xc3\x28", "layer": 1, "vector": [1.0]}'),
    ("/admin/calibrations", b'{"target_fpr": 0.1, "\x80": 1}'),
])  # fmt: skip
def test_invalid_utf8_is_a_422_saying_so(default, path, body):
    before = (default.rows(MonitoredRequest), default.rows(Job), default.rows(Concept))
    response = default.client.post(path, content=body, headers=JSON)
    error(response, 422, "not valid UTF-8", "at offset", kind="json_invalid")
    assert (default.rows(MonitoredRequest), default.rows(Job), default.rows(Concept)) == before


@pytest.mark.parametrize("body, where", [
    (b'{"model": "auditor", "prompt": "a\\u0000b"}', ["body", "prompt"]),  # NUL: Postgres cannot store it
    (b'{"model": "auditor", "prompt": "a\\ud800b"}', ["body", "prompt"]),  # an unpaired surrogate escape
    (b'{"model": "auditor", "prompt": "\xed\xa0\x80"}', ["body", "prompt"]),  # the same, encoded (CESU-8)
    (b'{"model": "auditor", "prompt": "ok", "user": "\\u0000"}', ["body", "user"]),
])  # fmt: skip
def test_text_no_database_can_store_is_a_422(default, body, where):
    runs = len(default.dispatcher.runs)
    detail = error(default.client.post("/v1/completions", content=body, headers=JSON), 422)["detail"]
    assert detail[0]["loc"] == where and detail[0]["type"] in ("value_error", "string_unicode")
    assert len(default.dispatcher.runs) == runs


def test_a_nul_in_a_path_or_query_is_a_422_before_any_route(default):
    error(default.client.get("/admin/concepts?name=a%00"), 422, "query contains a NUL")
    error(default.client.get("/admin/jobs/a%00"), 422, "path contains a NUL")
    error(
        default.client.post(
            "/admin/concepts/upload", data={"name": "x", "description": "a\x00"}, files={"file": ("v.json", b"[1.0]")}
        ),
        422,
        "NUL",
    )


@pytest.mark.parametrize("metadata", ['{"note": "a\\u0000"}', '{"x": NaN}', '{"x": 1e999}', '{"s": "\\udc00"}'])
def test_vector_file_metadata_that_cannot_be_stored_is_a_422(default, metadata):
    before = default.rows(Concept)
    vector = ", ".join(["1.0"] * D_MODEL)
    document = f'{{"vectors": {{"3": [{vector}]}}, "metadata": {metadata}}}'.encode()
    upload = default.client.post("/admin/concepts/upload", data={"name": "meta"}, files={"file": ("v.json", document)})
    error(upload, 422, "metadata")
    assert default.rows(Concept) == before


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", b'{"model": "auditor", "prompt": "hi", "temperature": NaN}', "temperature"),
    ("/v1/completions", b'{"model": "auditor", "prompt": "hi", "top_p": Infinity}', "top_p"),
    ("/v1/chat/completions", b'{"model": "auditor", "messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
     "temperature"),
    ("/v1/chat/completions", b'{"model": "auditor", "messages": [{"role": "user", "content": "hi"}], "top_p": 1e999}', "top_p"),
    ("/admin/calibrations", b'{"target_fpr": NaN}', "target_fpr"),
    ("/admin/concepts", b'{"name": "nan", "layer": 1, "vector": [NaN' + b", 1.0" * (D_MODEL - 1) + b"]}", "vector"),
    ("/admin/concepts", b'{"name": "inf", "vectors": {"2": [1e999' + b", 1.0" * (D_MODEL - 1) + b"]}}", "vectors"),
])  # fmt: skip
def test_nan_and_infinity_are_refused_and_never_stored(default, path, body, field):
    before = (default.rows(MonitoredRequest), default.rows(Job), default.rows(Concept))
    response = default.client.post(path, content=body, headers=JSON)
    detail = error(response, 422, "finite number", kind="finite_number")["detail"]
    assert field in detail[0]["loc"]
    assert (default.rows(MonitoredRequest), default.rows(Job), default.rows(Concept)) == before


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"model": "auditor", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}", "4300 digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_numbers_and_nesting_the_parser_refuses_are_a_422(default, body, message):
    error(default.client.post("/v1/completions", content=body, headers=JSON), 422, message, kind="json_invalid")


def test_a_seed_past_int64_is_refused_before_it_reaches_the_worker(default):
    runs = len(default.dispatcher.runs)
    for seed in (2**63, -(2**63) - 1):
        error(
            default.client.post("/v1/completions", json={"model": "auditor", "prompt": "hi", "seed": seed}), 422, "seed"
        )
    assert len(default.dispatcher.runs) == runs
    ok = default.client.post("/v1/completions", json={"model": "auditor", "prompt": "hi", "seed": 2**63 - 1})
    assert ok.status_code == 200, ok.text


def test_ids_past_int64_and_unknown_routes_get_the_error_shape(default):
    error(default.client.get(f"/admin/concepts/{2**31}"), 422, "concept_id")  # Postgres integer: 32 bits
    error(default.client.delete(f"/admin/tokens/{2**64}"), 422, "token_id")
    error(default.client.get("/admin/concepts/0"), 422, "concept_id")
    error(default.client.get("/no/such/route"), 404, "Not Found", kind="not_found")
    error(default.client.put("/healthz"), 405, "Method Not Allowed", kind="method_not_allowed")


def test_the_openapi_document_declares_the_error_body_and_the_ceilings(default):
    spec = default.client.get("/openapi.json").json()
    assert "ErrorBody" in spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            assert "4XX" in operation["responses"], (method, path)
    completion = spec["components"]["schemas"]["CompletionCreate"]["properties"]
    assert completion["prompt"]["anyOf"][0]["maxLength"] == 100_000 and "maximum" in completion["seed"]["anyOf"][0]
