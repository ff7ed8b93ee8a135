"""Privacy modes (full, redacted, hash) honoured everywhere text can leak: the database, report
outputs (API, HTML, the `auditor report` CLI in every format), error messages and logs.

- pure: the redactor on realistic strings (and what it must leave alone), storage per mode,
  scrubbing of errors that quote a prompt, Celery's argument representation, log records;
- a real Celery worker process at DEBUG on Redis, in hash mode: its log never shows a task's
  payload or result;
- the real stack (API over HTTP, the in-process worker and the real model) in each mode: chat,
  completion and audit requests and a failing request carrying a planted email address; then the
  database dump, every report output and the captured logs are searched for the raw texts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from auditor import privacy
from auditor.db import store
from auditor.db.engine import make_engine, run_migrations, session_factory, writer_engine
from auditor.errors import InvalidInputError
from auditor.privacy import redact, scrub, scrubbed_exception, stored_text, task_argsrepr

# ---- the redactor ----

REDACTED = [
    ("Mail me at dana.smith+work@example.co.uk today", "Mail me at [EMAIL] today"),
    ("Call +44 20 7946 0958 or (415) 555-0132 or 415-555-0132.", "Call [PHONE] or [PHONE] or [PHONE]."),
    ("En France: 06 12 34 56 78, à Londres 020 7946 0958", "En France: [PHONE], à Londres [PHONE]"),
    ("server at 192.168.1.20, then 10.0.0.1.", "server at [IP], then [IP]."),
    ("v6 fe80::1ff:fe23:4567:890a and 2001:db8::1 here", "v6 [IP] and [IP] here"),
    ("Visa 4111 1111 1111 1111 exp 12/27", "Visa [CARD] exp 12/27"),
    ("card 5500-0000-0000-0004 please", "card [CARD] please"),
    ("typo 4111 1111 1111 1112 still a number", "typo [NUMBER] still a number"),
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN [IBAN] thanks"),
    ("pay GB82WEST12345698765432 now", "pay [IBAN] now"),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnop1234567890", "OPENAI_API_KEY=[SECRET]"),
    (
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU",
        "Authorization: Bearer [SECRET]",
    ),
    ("password: hunter2, api_key='AbC123xyz'", "password: [SECRET], api_key=[SECRET]"),
    ("keys AKIAIOSFODNN7EXAMPLE ghp_abcdefghijklmnopqrstuvwxyz0123456789", "keys [SECRET] [SECRET]"),
    ("postgresql://auditor:s3cr3t@db:5432/auditor", "postgresql://[SECRET]@db:5432/auditor"),
    ("unknown vendor key Zx9QmT4LpR7vW2nB8kY5cH3jF6dS1aG0eU end", "unknown vendor key [SECRET] end"),
    ("account 123456789012 and ssn 123-45-6789", "account [NUMBER] and ssn [NUMBER]"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----", "[SECRET]"),
]

UNTOUCHED = [
    "Meet on 2024-05-01 at 10:30:15, ratio 3:2, version 1.2.3, pi 3.14159265358979.",
    "It costs 1,000,000 dollars; 42 people; room 101.",
    "request chatcmpl-0123456789abcdef0123456789abcdef and job 123e4567-e89b-12d3-a456-426614174000",
    "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "a basic understanding of the bearer bonds; the token generation step",
    "Task auditor.generate[cmpl-abc] succeeded in 0.25s",
    "What should I pack for a weekend trip to the coast?",
]


@pytest.mark.parametrize("text, expected", REDACTED)
def test_redact_masks_personal_data_and_secrets(text, expected):
    assert redact(text) == expected
    assert redact(expected) == expected  # idempotent: placeholders are never matched again


@pytest.mark.parametrize("text", UNTOUCHED)
def test_redact_leaves_ordinary_text_ids_and_digests_alone(text):
    assert redact(text) == text


def test_luhn_and_iban_checksums():
    assert privacy.luhn_valid("4111111111111111") and not privacy.luhn_valid("4111111111111112")
    assert privacy.iban_valid("DE89 3704 0044 0532 0130 00") and not privacy.iban_valid("DE88 3704 0044 0532 0130 00")


def test_stored_text_per_mode():
    text = "Reach me at ann@example.org"
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert stored_text(text, "full") == (text, digest)
    assert stored_text(text, "redacted") == ("Reach me at [EMAIL]", digest)
    assert stored_text(text, "hash") == (None, digest)
    assert stored_text(None, "redacted") == (None, None)
    # Reports show no more than the mode promises, even of a row that holds more.
    assert privacy.shown_text("redacted", text, digest) == "Reach me at [EMAIL]"
    assert privacy.shown_text("hash", text, digest) == f"sha256:{digest}"


def test_errors_that_quote_a_prompt_are_scrubbed_outside_full_mode():
    prompt = "my code word is zebra-quartz\nand mail ann@example.org"
    message = f"ValueError: cannot encode {prompt!r} (length {len(prompt)})"
    assert scrub(message, "full", [prompt]) == message
    for mode in ("redacted", "hash"):
        clean = scrub(message, mode, [prompt])
        assert "zebra" not in clean and "ann@example.org" not in clean and "[TEXT]" in clean
    exc = scrubbed_exception(InvalidInputError(f"bad prompt {prompt}"), "hash", [prompt])
    assert type(exc) is InvalidInputError and str(exc) == "bad prompt [TEXT]"
    key_error = scrubbed_exception(KeyError(prompt), "hash", [prompt])  # str() adds quotes: wrapped
    assert "zebra" not in str(key_error) and "KeyError" in str(key_error)
    untouched = ValueError("nothing personal")
    assert scrubbed_exception(untouched, "hash", [prompt]) is untouched


def test_celery_sees_ids_never_payloads():
    payload = {"messages": [{"role": "user", "content": "ann@example.org"}], "sampling": {}}
    assert task_argsrepr(["chatcmpl-1", payload]) == "['chatcmpl-1', <dict hidden>]"
    assert task_argsrepr([["audit-1", "audit-2"], [payload, payload]]) == "[['audit-1', 'audit-2'], <2 items hidden>]"
    assert task_argsrepr(["job-1"]) == "['job-1']"


@pytest.fixture
def log_mode():
    """Set this process's log redaction for one test, then back to full (other tests' default)."""
    yield privacy.install_log_redaction
    privacy.install_log_redaction("full")


def test_log_records_are_redacted_outside_full_mode(log_mode, caplog):
    logger = logging.getLogger("auditor.test_privacy")
    caplog.set_level(logging.DEBUG)
    log_mode("full")
    logger.info("prompt from %s", "ann@example.org")
    log_mode("redacted")
    logger.info("prompt from %s", "bob@example.org")
    try:
        raise ValueError("card 4111 1111 1111 1111 refused")
    except ValueError:
        logger.exception("failed for carol@example.org")
    # Celery's success line quotes the task's return value (a completion); its DEBUG pool line
    # the raw message body.
    logging.getLogger("celery.app.trace").info(
        "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s",
        {"name": "auditor.generate", "id": "x", "runtime": 0.1, "return_value": "{'text': 'zebra-quartz'}"},
    )
    logging.getLogger("celery.pool").debug("TaskPool: Apply %s (args:%s kwargs:%s)", "<fn>", "(zebra-quartz,)", "{}")
    text = caplog.text
    assert "ann@example.org" in text  # full mode: untouched
    assert "bob@example.org" not in text and "prompt from [EMAIL]" in text
    assert "carol@example.org" not in text and "4111 1111" not in text and "[CARD]" in text
    assert "zebra-quartz" not in text and "succeeded in 0.1s: <hidden: privacy mode>" in text
    assert "Traceback" in text  # the traceback is kept, redacted


# ---- a real Celery worker process, in hash mode, at DEBUG ----


def _redis_holdings(client, workdir) -> bytes:
    """Everything a Redis holds, as bytes: every key's serialised value (task messages, results,
    stream entries) and its append-only file on disk."""
    dumped = b"".join(client.dump(key) or b"" for key in client.scan_iter(count=1000))
    client.bgrewriteaof()  # also the rewrite: what a restart would read back
    time.sleep(0.5)
    on_disk = b"".join(path.read_bytes() for path in workdir.rglob("*.aof*") if path.is_file())
    assert on_disk, "the private Redis wrote no append-only file"
    return dumped + on_disk


def test_no_text_crosses_redis_or_the_worker_log_outside_full_mode(tmp_path):
    """A real Celery worker at DEBUG, in hash mode, on a Redis that persists to an append-only
    file (as the compose deployment's does). Two tasks that need no model: a generation whose row
    is already done (its result carries the stored completion: a row written in full mode before
    the deployment moved to hash), and one whose row does not exist (it fails); and a streamed
    event. The planted code word is in no log line, no key (task messages, results, the stream),
    and not in the append-only file: payloads cross Redis sealed with the deployment's key."""
    try:
        from support.private_services import PrivateRedis, Unavailable

        redis_server = PrivateRedis(tmp_path, appendonly=True)
    except Unavailable as exc:
        pytest.skip(str(exc))
    import asyncio

    import redis

    from auditor.queue.dispatch import TASK_GENERATE, CeleryDispatcher
    from auditor.queue.streams import redis_streams
    from auditor.sealing import new_key
    from auditor.settings import Settings

    url = f"sqlite:///{tmp_path / 'auditor.db'}"
    run_migrations(url)
    engine = make_engine(url)
    with session_factory(engine)() as session:
        store.create_request(session, request_id="done-1", kind="chat", prompt_text="old zebra-quartz prompt")
        store.mark_request(session, request_id="done-1", status="running")
        store.mark_request(
            session, request_id="done-1", status="done", completion_text="answer zebra-quartz to ann@example.org"
        )
        session.commit()
    engine.dispose()
    redis_server.start()
    broker, key = redis_server.url(0), new_key()
    env = {
        **os.environ,
        "AUDITOR_DATABASE_URL": url,
        "AUDITOR_BROKER_URL": broker,
        "AUDITOR_DATA_DIR": str(tmp_path),
        "AUDITOR_PRIVACY_MODE": "hash",
        "AUDITOR_PAYLOAD_KEY": key,
        "AUDITOR_WORKER_METRICS_PORT": "0",
        "AUDITOR_RETENTION_DAYS": "0",
    }
    env.pop("AUDITOR_WORKER_POOL", None)  # no model warm-up
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.tasks",
            "worker",
            "--pool=threads",
            "--concurrency=2",
            "--loglevel=DEBUG",
            f"--hostname=privacy-{os.getpid()}@%h",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    settings = Settings(database_url=url, broker_url=broker, privacy_mode="hash", payload_key=key)
    dispatcher = CeleryDispatcher(settings)
    planted = {
        "messages": [{"role": "user", "content": "zebra-quartz, write to ann@example.org"}],
        "sampling": {"max_new_tokens": 2},
    }
    client = redis.Redis.from_url(broker)
    try:
        done = dispatcher.run(TASK_GENERATE, ["done-1", planted], task_id=f"done-{uuid.uuid4().hex}", timeout=60)
        assert done["status"] == "done" and "zebra-quartz" in done["text"]  # the API opens what it sent
        with pytest.raises(InvalidInputError, match="no request"):
            dispatcher.run(TASK_GENERATE, ["missing-1", planted], task_id=f"missing-{uuid.uuid4().hex}", timeout=30)
        streams = redis_streams(settings)
        streams.publish("stream-1", {"type": "done", "answer": {"text": "streamed zebra-quartz"}})

        async def read() -> list[dict]:
            return [event async for event in streams.events("stream-1", timeout=10)]

        assert asyncio.run(read())[0]["answer"]["text"] == "streamed zebra-quartz"
        holdings = _redis_holdings(client, tmp_path)
    finally:
        worker.terminate()
        try:
            output, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
        dispatcher.app.close()
        client.close()
        redis_server.stop()
    assert b"celery-task-meta-" in holdings and b"auditor:stream:stream-1" in holdings  # it did hold them
    assert b"zebra-quartz" not in holdings and b"ann@example.org" not in holdings
    assert "auditor.generate" in output and "succeeded" in output and "raised" in output, output
    assert "zebra-quartz" not in output and "ann@example.org" not in output, output
    assert "<hidden: privacy mode>" in output


def test_outside_full_mode_a_broker_needs_the_payload_key():
    from auditor.errors import ConfigError
    from auditor.queue.dispatch import CeleryDispatcher
    from auditor.sealing import Sealer, new_key
    from auditor.settings import Settings

    with pytest.raises(ConfigError, match="needs AUDITOR_PAYLOAD_KEY"):
        CeleryDispatcher(Settings(broker_url="redis://127.0.0.1:6379/0", privacy_mode="redacted"))
    sealed = Sealer(new_key()).seal({"prompt": "zebra-quartz"})
    assert "zebra-quartz" not in json.dumps(sealed)
    with pytest.raises(ConfigError, match="must share one"):
        Sealer(new_key()).open(sealed)  # another deployment's key
    with pytest.raises(ConfigError, match="not a valid key"):
        Sealer("not-a-fernet-key")


# ---- the real stack, in each mode ----

MODES = ("full", "redacted", "hash")


def _planted(mode: str) -> dict[str, str]:
    """Per mode its own code word and email, so one database holds all three modes' traffic."""
    word, email = f"zebra{mode}quartz", f"dana.{mode}@example.org"
    return {
        "word": word, "email": email,
        "chat": f"My email is {email} and my code word is {word}. Say hello.",
        "completion": f"Code word {word}, reply to {email}:",
        "audit_prompt": f"Remember {word} and write to {email}.",
        "audit_completion": f"Sure, I will write to {email} about {word} tomorrow.",
        "fail": f"FAIL-{mode} please email {email} about {word}.",
    }  # fmt: skip


@pytest.fixture(scope="module")
def stack_db(host, tmp_path_factory):
    """One SQLite database for all three modes, registered and calibrated once (vectors come
    from the session's data dir, extracted there once)."""
    from auditor.settings import Settings
    from support.auth import issue_token
    from workers.serving.inprocess import InProcessDispatcher

    url = f"sqlite:///{tmp_path_factory.mktemp('privacy-db') / 'auditor.db'}"
    run_migrations(url)
    settings = Settings(
        database_url=url, data_dir=host.settings.data_dir, divergence_flags=False, drift_interval_seconds=0
    )
    warm = InProcessDispatcher(settings)
    warm.runtime.host.__dict__["model"] = host.model
    warm.warm_up()
    return {"url": url, "token": issue_token(url), "data_dir": host.settings.data_dir}


def _serve(app):
    """uvicorn without its own logging config, so its records (a 500's traceback) reach caplog."""
    import uvicorn

    from support.http_server import free_port

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "API server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.config.port}"


def _fail_on_marker(monkeypatch, marker: str) -> None:
    """Make the model thread reject prompts (and audit replays) that carry `marker`, with an
    error that quotes them, as a tokenizer or validation error might."""
    import workers.serving.model_thread

    encode_prompt, encode_replay = (
        workers.serving.model_thread.encode_prompt,
        workers.serving.model_thread.encode_replay,
    )

    def failing_encode(model, prompt, chat):
        if marker in str(prompt):
            raise ValueError(f"cannot encode {prompt!r}")
        return encode_prompt(model, prompt, chat)

    def failing_replay(model, item):
        if marker in item["completion"]:
            raise ValueError(f"cannot replay {item['completion']!r}")
        return encode_replay(model, item)

    monkeypatch.setattr(workers.serving.model_thread, "encode_prompt", failing_encode)
    monkeypatch.setattr(workers.serving.model_thread, "encode_replay", failing_replay)


def _dump(url: str) -> str:
    connection = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return "\n".join(connection.iterdump())
    finally:
        connection.close()


def _plant_flags(url: str, request_ids: list[str]) -> None:
    """Divergence flags are off (fast); flag the requests directly so reports list them."""
    from sqlalchemy import select

    from auditor.db.models import Concept

    engine = make_engine(url)
    with session_factory(writer_engine(engine))() as session:  # reads, then writes: BEGIN IMMEDIATE
        concept = session.scalars(select(Concept).where(Concept.name == "pessimism")).first()
        for request_id in request_ids:
            store.add_flag(
                session,
                request_id=request_id,
                concept_id=concept.id,
                layer=concept.primary_layer,
                kind="hidden",
                residual_signal=9.0,
                threshold=1.0,
                reason="planted by test_privacy",
            )
        session.commit()
    engine.dispose()


def _report_outputs(stack_db, base_url: str) -> dict[str, str]:
    """Every report output: the API's sections (JSON and CSV) and HTML page, and the CLI's
    table, CSV, JSON and HTML."""
    import httpx

    headers = {"Authorization": f"Bearer {stack_db['token']}"}
    params = {"since": "2h", "until": "now", "top": 1000}
    outputs = {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as client:
        for path in ("/reports/flagged", "/reports/summary", "/reports/series", "/reports/compare"):
            for fmt in ("json", "csv"):
                response = client.get(path, params={**params, "format": fmt})
                assert response.status_code == 200, response.text
                outputs[f"api {path} {fmt}"] = response.text
        page = client.get("/reports/html", params=params)
        assert page.status_code == 200
        outputs["api html"] = page.text
    env = {**os.environ, "AUDITOR_DATABASE_URL": stack_db["url"], "AUDITOR_DATA_DIR": str(stack_db["data_dir"])}
    for fmt, extra in (("table", []), ("csv", ["--table", "flagged"]), ("json", []), ("html", [])):
        result = subprocess.run(
            [sys.executable, "-m", "auditor.cli", "report", "--since", "2h", "--top", "1000", "--format", fmt, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        outputs[f"cli {fmt}"] = result.stdout + result.stderr
    return outputs


@pytest.mark.model
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_end_to_end(mode, stack_db, host, monkeypatch, caplog):
    from openai import InternalServerError, OpenAI

    from auditor.api.main import create_app
    from auditor.db.models import MonitoredRequest
    from auditor.settings import Settings
    from workers.serving.inprocess import InProcessDispatcher

    planted = _planted(mode)
    _fail_on_marker(monkeypatch, f"FAIL-{mode}")
    caplog.set_level(logging.DEBUG)  # the server's side: the API, the worker, uvicorn
    for client_side in ("openai", "httpx", "httpcore", "httpx2", "httpcore2"):  # the caller's logs of what it sent
        caplog.set_level(logging.WARNING, logger=client_side)
    settings = Settings(
        database_url=stack_db["url"],
        data_dir=stack_db["data_dir"],
        privacy_mode=mode,
        divergence_flags=False,
        drift_interval_seconds=0,
        retention_interval_seconds=0,
    )
    dispatcher = InProcessDispatcher(settings)  # the worker side shares the mode, as in a deployment
    dispatcher.runtime.host.__dict__["model"] = host.model
    dispatcher.warm_up()  # reads the stored calibration
    app = create_app(settings, dispatcher)
    server, thread, base_url = _serve(app)
    try:
        client = OpenAI(base_url=f"{base_url}/v1", api_key=stack_db["token"], max_retries=0, timeout=300)
        chat = client.chat.completions.create(
            model="auditor", max_tokens=8, temperature=0, messages=[{"role": "user", "content": planted["chat"]}]
        )
        completion = client.completions.create(
            model="auditor", prompt=planted["completion"], max_tokens=8, temperature=0
        )
        # Its own client: uvicorn drops the connection after a 500, and a pooled one would go with it.
        with OpenAI(base_url=f"{base_url}/v1", api_key=stack_db["token"], max_retries=0) as failing:
            with pytest.raises(InternalServerError):
                failing.chat.completions.create(
                    model="auditor",
                    max_tokens=4,
                    temperature=0,
                    messages=[{"role": "user", "content": planted["fail"]}],
                )
        audit = client.post(
            "/audits",
            cast_to=dict,
            body={
                "items": [
                    {"prompt": planted["audit_prompt"], "completion": planted["audit_completion"]},
                    {"prompt": planted["audit_prompt"], "completion": planted["fail"]},
                ]
            },
        )
        deadline, audit_reads = time.monotonic() + 120, []
        for audit_id in audit["ids"]:
            while (read := client.get(f"/audits/{audit_id}", cast_to=dict))["status"] not in ("done", "failed"):
                assert time.monotonic() < deadline, "audit not finished"
                time.sleep(0.2)
            audit_reads.append(json.dumps(read))
        served_ids = [chat.id, completion.id, audit["ids"][0]]
        _plant_flags(stack_db["url"], served_ids)
        reports = _report_outputs(stack_db, base_url)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.dispose()
        privacy.install_log_redaction("full")
    # Unique to this mode (the model's answers are not: another mode's request may get the same).
    raw_texts = [planted[k] for k in ("chat", "completion", "audit_prompt", "audit_completion", "fail")]
    generated = {chat.id: chat.choices[0].message.content, completion.id: completion.choices[0].text}
    dump, logs = _dump(stack_db["url"]), caplog.text

    engine_ = make_engine(stack_db["url"])
    with session_factory(engine_)() as session:
        rows = {r.id: r for r in session.query(MonitoredRequest).filter(MonitoredRequest.privacy_mode == mode)}
    engine_.dispose()
    failed = [r for r in rows.values() if r.status == "failed"]
    assert len(rows) == 5 and len(failed) == 2  # chat, completion, failing chat, two audit items
    assert all("cannot" in r.error for r in failed)

    if mode == "full":  # the positive control: everything is there, so the searches below can find it
        assert planted["email"] in dump and planted["chat"] in dump and planted["audit_completion"] in dump
        assert all(planted["email"] in r.error for r in failed)
        assert planted["chat"] in reports["cli json"] and planted["email"] in reports["api html"]
        assert planted["email"] in logs  # the failing request's traceback quotes its prompt
        assert planted["email"] in audit_reads[1]  # so does the failed audit item's error
        return

    for where, text in {"database": dump, **reports, "logs": logs, "GET /v1/audits": "\n".join(audit_reads)}.items():
        for secret in (planted["email"], *raw_texts):
            assert secret not in text, f"{mode}: {secret!r} found in {where}"
    # The generated answers, row by row: as stored, and as the flagged report shows them.
    flagged = {row["request_id"]: row for row in json.loads(reports["cli json"])["flagged"]}
    for request_id, text in generated.items():
        digest_of = hashlib.sha256(text.encode()).hexdigest()
        assert rows[request_id].completion_sha256 == digest_of
        kept = redact(text) if mode == "redacted" else None
        assert rows[request_id].completion_text == kept
        assert flagged[request_id]["completion"] == (kept if mode == "redacted" else f"sha256:{digest_of}")
    assert all("[TEXT]" in r.error for r in failed)
    assert "[TEXT]" in logs  # the 500's traceback was logged, scrubbed
    digest = hashlib.sha256(f"user: {planted['chat']}".encode()).hexdigest()  # chat prompts: "role: content" lines
    assert rows[chat.id].prompt_sha256 == digest
    if mode == "redacted":
        redacted_chat = redact(planted["chat"])
        assert "[EMAIL]" in redacted_chat and rows[chat.id].prompt_text == f"user: {redacted_chat}"
        assert redacted_chat in reports["cli json"] and redacted_chat in reports["api /reports/flagged csv"]
        assert planted["word"] in dump  # redaction masks personal data, not the rest of the text
    else:
        assert planted["word"] not in dump and f"sha256:{digest}" in reports["api html"]
        assert f"sha256:{digest}" in reports["cli json"]
        assert all(r.prompt_text is None and r.completion_text is None for r in rows.values())
