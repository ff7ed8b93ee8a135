"""The admin API over real HTTP (uvicorn on loopback), on real Postgres and on SQLite."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save as save_safetensors

from auditor.api.main import create_app
from auditor.api.routes import concepts as concept_routes
from auditor.db.engine import run_migrations
from auditor.model_identity import describe_model
from auditor.settings import Settings
from support.auth import bearer, issue_token
from support.databases import Databases, _postgres_reachable
from support.http_server import free_port, serving

D_MODEL, N_LAYERS = 576, 30


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def api(request, tmp_path_factory) -> Iterator[httpx.Client]:
    if request.param == "postgres" and (reason := _postgres_reachable()):
        pytest.skip(reason)
    databases = Databases(request.param, tmp_path_factory.mktemp(f"api-{request.param}"))
    url = databases.new_url()
    run_migrations(url)
    app = create_app(Settings(database_url=url, data_dir=tmp_path_factory.mktemp("data")))
    token = issue_token(url, name="admin-tests")
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30, headers=bearer(token)) as client:
        yield client
    databases.drop_all()


def unit(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=D_MODEL)
    return vector / np.linalg.norm(vector)


def count(api: httpx.Client) -> int:
    return len(api.get("/admin/concepts").json())


def test_health_and_the_served_model(api):
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")  # this app has no worker at all: not ready for completions
    assert ready.status_code == 503 and ready.json()["checks"] == {"database": "ok", "workers": "none configured"}
    model = api.get("/v1/model").json()
    expected = describe_model("smollm2")
    assert model["fingerprint"] == expected.hash
    assert (model["n_layers"], model["d_model"]) == (N_LAYERS, D_MODEL)


def test_a_new_vector_under_a_name_is_a_new_version(api):
    first = api.post("/admin/concepts", json={"name": "doom", "layer": 15, "vector": (3 * unit(1)).tolist()})
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["version"], body["layers"], body["primary_layer"], body["active"]) == (1, [15], 15, True)
    assert body["model_fingerprint"] == api.get("/v1/model").json()["fingerprint"]
    assert body["provenance"]["original_norms"]["15"] == pytest.approx(3.0)
    second = api.post(
        "/admin/concepts", json={"name": "doom", "vectors": {"10": unit(2).tolist(), "20": unit(3).tolist()}}
    )
    assert second.status_code == 201 and second.json()["version"] == 2
    assert second.json()["layers"] == [10, 20]
    exported = api.get(f"/admin/concepts/{body['id']}/export", params={"format": "json"})
    stored = np.array(json.loads(exported.content)["vectors"]["15"])
    assert np.allclose(stored / np.linalg.norm(stored), unit(1), atol=1e-6)  # v1 untouched
    versions = [c["version"] for c in api.get("/admin/concepts", params={"name": "doom"}).json()]
    assert versions == [1, 2]


@pytest.mark.parametrize("fmt", ["safetensors", "gguf", "json"])
def test_upload_round_trips_through_every_export_format(api, fmt):
    tensors = {
        "direction.12": torch.from_numpy(unit(12)).float(),
        "direction.18": torch.from_numpy(2 * unit(18)).float(),
    }
    created = api.post(
        "/admin/concepts/upload",
        data={"name": f"upload-{fmt}"},
        files={"file": ("vectors.safetensors", save_safetensors(tensors), "application/octet-stream")},
    )
    assert created.status_code == 201, created.text
    concept = created.json()
    assert concept["layers"] == [12, 18] and concept["source"] == "upload-safetensors"
    exported = api.get(f"/admin/concepts/{concept['id']}/export", params={"format": fmt})
    assert exported.status_code == 200
    again = api.post(
        "/admin/concepts/upload", data={"name": f"upload-{fmt}"}, files={"file": (f"v.{fmt}", exported.content)}
    )
    assert again.status_code == 201, again.text
    assert again.json()["version"] == 2 and again.json()["layers"] == [12, 18]
    assert again.json()["vector_hash"] == concept["vector_hash"]  # the same unit vectors came back


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"name": "bad", "layer": 15, "vector": [1.0] * 10}, "dimension 10"),
        ({"name": "bad", "layer": 15, "vector": [0.0] * D_MODEL}, "norm"),
        ({"name": "bad", "layer": 30, "vector": [1.0] * D_MODEL}, "out of range"),
        ({"name": "bad", "vector": [1.0] * D_MODEL}, "needs `layer`"),
        ({"name": "bad", "layer": 15, "vector": [1.0] * D_MODEL, "model_fingerprint": "0" * 64}, "basis"),
        ({"name": "bad name!", "layer": 15, "vector": [1.0] * D_MODEL}, "pattern"),
        ({"name": "bad", "vectors": {"3": [1.0] * D_MODEL}, "primary_layer": 4}, "primary_layer 4"),
    ],
)
def test_invalid_vectors_get_a_clear_4xx_and_write_nothing(api, payload, message):
    before = count(api)
    response = api.post("/admin/concepts", json=payload)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(message in item["msg"] for item in detail), detail
    assert count(api) == before


def test_nan_and_garbage_uploads_are_rejected(api):
    before = count(api)
    nan = api.post(
        "/admin/concepts",
        content=b'{"name": "nan", "layer": 1, "vector": [NaN' + b", 1.0" * (D_MODEL - 1) + b"]}",
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 422
    garbage = api.post(
        "/admin/concepts/upload", data={"name": "junk"}, files={"file": ("x.gguf", b"GGUF\x03\x00\x00\x00garbage")}
    )
    assert garbage.status_code == 422 and "gguf" in garbage.text.lower()
    assert count(api) == before


def nested(depth: int) -> dict:
    metadata: dict = {"leaf": 1}
    for _ in range(depth - 1):
        metadata = {"inner": metadata}
    return metadata


def json_upload(metadata) -> bytes:
    return json.dumps({"vectors": {"15": unit(15).tolist()}, "metadata": metadata}).encode()


def gguf_upload(**fields) -> bytes:
    """A GGUF control vector for layer 15 with extra metadata: str values as strings, lists as arrays."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        writer = GGUFWriter(path, "controlvector")
        for key, value in fields.items():
            if isinstance(value, list):
                writer.add_array(f"controlvector.{key}", value)
            else:
                writer.add_string(f"controlvector.{key}", value)
        writer.add_tensor("direction.15", unit(15).astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def safetensors_upload(metadata: dict[str, str]) -> bytes:
    return save_safetensors({"direction.15": torch.from_numpy(unit(15)).float()}, metadata=metadata)


@pytest.mark.parametrize(
    "filename, content, fact",
    [
        # ~300 levels: stored, then unserialisable, so GET /admin/concepts was a 500 for good.
        ("deep.json", json_upload(nested(300)), "nested 300 levels deep"),
        ("wide.json", json_upload({f"k{i}": i for i in range(5000)}), "5000 keys"),
        ("big.json", json_upload({"note": "x" * 200_000}), "characters as JSON"),
        ("wide.safetensors", safetensors_upload({f"k{i}": "v" for i in range(5000)}), "5000 keys"),
        ("big.safetensors", safetensors_upload({"note": "x" * 200_000}), "characters as JSON"),
        ("array.gguf", gguf_upload(layers=list(range(10))), "metadata arrays are not accepted"),
        ("big.gguf", gguf_upload(model_hint="x" * 200_000), "bytes of keys and strings"),
        ("wide.gguf", gguf_upload(**{f"k{i}": "v" for i in range(2000)}), "2001 metadata keys"),
    ],
)
def test_hostile_metadata_is_refused_and_the_concept_list_still_works(api, filename, content, fact):
    before = api.get("/admin/concepts")
    assert before.status_code == 200
    response = api.post("/admin/concepts/upload", data={"name": "hostile"}, files={"file": (filename, content)})
    assert response.status_code == 422, response.text
    assert fact in response.json()["detail"][0]["msg"], response.text
    after = api.get("/admin/concepts")
    assert after.status_code == 200, after.text
    assert after.json() == before.json()  # nothing written


def test_metadata_within_the_limits_is_kept(api):
    metadata = {"note": "x" * 1000, "deep": nested(15), **{f"k{i}": i for i in range(100)}}
    response = api.post(
        "/admin/concepts/upload", data={"name": "bounded"}, files={"file": ("ok.json", json_upload(metadata))}
    )
    assert response.status_code == 201, response.text
    assert response.json()["provenance"]["deep"] == nested(15)
    assert api.get("/admin/concepts").status_code == 200


def test_an_upload_is_parsed_off_the_event_loop(api, monkeypatch):
    # The parse is held until /healthz has answered: on the event loop, /healthz would wait for it.
    parsing, release = threading.Event(), threading.Event()
    real_parse = concept_routes.parse_vectors

    def held_parse(*args, **kwargs):
        parsing.set()
        release.wait(timeout=10)
        return real_parse(*args, **kwargs)

    monkeypatch.setattr(concept_routes, "parse_vectors", held_parse)
    results: dict[str, httpx.Response] = {}
    upload = threading.Thread(
        target=lambda: results.update(
            upload=api.post(
                "/admin/concepts/upload", data={"name": "held"}, files={"file": ("v.json", json_upload({}))}
            )
        )
    )
    upload.start()
    try:
        assert parsing.wait(timeout=10)
        health = api.get("/healthz", timeout=3)
        assert health.status_code == 200
    finally:
        release.set()
        upload.join(timeout=30)
    assert results["upload"].status_code == 201, results["upload"].text


def test_activate_deactivate_retire(api):
    concept = api.post("/admin/concepts", json={"name": "lifecycle", "layer": 5, "vector": unit(5).tolist()}).json()
    cid = concept["id"]
    assert api.post(f"/admin/concepts/{cid}/deactivate").json()["active"] is False
    assert api.post(f"/admin/concepts/{cid}/activate").json()["active"] is True
    retired = api.post(f"/admin/concepts/{cid}/retire").json()
    assert retired["active"] is False and retired["retired_at"] is not None
    again = api.post(f"/admin/concepts/{cid}/activate")
    assert again.status_code == 422 and "retired" in again.text
    assert [c["id"] for c in api.get("/admin/concepts", params={"active": True}).json()].count(cid) == 0
    missing = api.get("/admin/concepts/999999")
    assert missing.status_code == 404 and missing.json()["detail"][0]["type"] == "not_found"


def test_completion_requests_are_validated_before_any_worker_is_involved(api):
    bad = api.post(
        "/v1/chat/completions",
        json={"model": "auditor", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
    )
    assert bad.status_code == 422 and "temperature" in bad.json()["error"]["message"]
    empty = api.post("/v1/chat/completions", json={"model": "auditor", "messages": []})
    assert empty.status_code == 422
    unknown = api.post("/v1/completions", json={"model": "gpt-4o", "prompt": "hi"})
    assert unknown.status_code == 404 and "unknown model 'gpt-4o'" in unknown.json()["error"]["message"]
    no_worker = api.post("/v1/completions", json={"model": "auditor", "prompt": "hi"})
    assert no_worker.status_code == 503 and no_worker.json()["detail"][0]["type"] == "worker_unavailable"


# ---- broker down: nothing is accepted that cannot be queued ----


@pytest.fixture(scope="module")
def dead_broker_api(tmp_path_factory) -> Iterator[tuple[httpx.Client, str]]:
    """The API with its broker pointed at a closed port: what a client sees while Redis is down."""
    databases = Databases("sqlite", tmp_path_factory.mktemp("dead-broker"))
    url = databases.new_url()
    run_migrations(url)
    broker = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = create_app(Settings(database_url=url, broker_url=broker, data_dir=tmp_path_factory.mktemp("data")))
    token = issue_token(url, name="dead-broker-tests")
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=60, headers=bearer(token)) as client:
        yield client, url


def _rows(url: str, model) -> list:
    from sqlalchemy import select

    from auditor.db.engine import make_engine, session_factory

    engine = make_engine(url)
    try:
        with session_factory(engine)() as session:
            return list(session.scalars(select(model)))
    finally:
        engine.dispose()


def test_broker_down_gives_503_with_retry_after_and_marks_rows_not_queued(dead_broker_api):
    from auditor.db.models import Job, MonitoredRequest

    client, url = dead_broker_api
    started = time.monotonic()
    chat = client.post(
        "/v1/chat/completions", json={"model": "auditor", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 503 and int(chat.headers["Retry-After"]) > 0
    assert "broker unavailable" in chat.json()["error"]["message"]
    assert time.monotonic() - started < 30  # the client hears back promptly, not after request_timeout
    audit = client.post("/v1/audits", json={"items": [{"prompt": "p", "completion": "c"}]})
    assert audit.status_code == 503 and "Retry-After" in audit.headers
    job = client.post(
        "/admin/concepts/extract",
        json={
            "name": "x",
            "pairs": [
                {"positive": "I love it", "negative": "I hate it"},
                {"positive": "Great day", "negative": "Awful day"},
            ],
        },
    )
    assert job.status_code == 503 and "Retry-After" in job.headers

    requests = _rows(url, MonitoredRequest)
    assert len(requests) == 2 and {r.status for r in requests} == {"failed"}
    assert all(r.error.startswith("not queued") for r in requests)
    (stored_job,) = _rows(url, Job)
    assert stored_job.status == "failed" and stored_job.error.startswith("not queued")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["broker"] != "ok"


@pytest.mark.parametrize("pairs, message", [
    ([{"positive": "only one", "negative": "pair"}], "at least 2"),
    ([{"positive": "same", "negative": "same"}, {"positive": "a", "negative": "b"}], "identical"),
    ([{"positive": "", "negative": "x"}, {"positive": "a", "negative": "b"}], "at least 1 character"),
])  # fmt: skip
def test_invalid_extraction_requests_get_422_and_queue_nothing(dead_broker_api, pairs, message):
    from auditor.db.models import Job

    client, url = dead_broker_api
    before = len(_rows(url, Job))
    response = client.post("/admin/concepts/extract", json={"name": "bad", "pairs": pairs})
    assert response.status_code == 422 and message in response.json()["error"]["message"]
    assert len(_rows(url, Job)) == before
    assert client.get("/admin/jobs/does-not-exist").status_code == 404


def test_bad_calibration_requests_get_422_and_queue_nothing(dead_broker_api):
    from auditor.db.models import Job

    client, url = dead_broker_api
    before = len(_rows(url, Job))
    for body in ({"target_fpr": 1.5}, {"target_fpr": 0}, {"target_fpr": "often"}, {"unknown": 1}):
        response = client.post("/admin/calibrations", json=body)
        assert response.status_code == 422, (body, response.text)
    # Traffic windows: missing, reversed, naive, out of range, or given to the control source.
    for body, message in (
        ({"source": "traffic"}, "needs `since`"),
        ({"source": "traffic", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "before `until`"),
        ({"source": "traffic", "since": "2026-01-01T00:00:00"}, "timezone"),
        ({"source": "traffic", "since": "0001-01-01T00:00:00+05:00"}, "representable"),
        ({"source": "control", "since": "2026-01-01T00:00:00Z"}, "source=traffic only"),
        ({"source": "traffic", "since": "2026-01-01T00:00:00Z"}, "needs at least 230"),  # an empty window
        ({"source": "elsewhere"}, "source"),
    ):
        response = client.post("/admin/calibrations", json=body)
        assert response.status_code == 422 and message in response.text, (body, response.text)
    assert len(_rows(url, Job)) == before
    bad_set = client.get("/admin/calibrations", params={"reference_set": "made-up"})
    assert bad_set.status_code == 422 and "reference_set" in bad_set.text


def test_a_database_that_is_down_gets_503_with_retry_after_not_500(tmp_path):
    """The API's database unreachable (restarting, say): every route that needs it answers 503
    with Retry-After, the way a broker outage does; liveness stays up and readiness says why."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/auditor"  # nothing listens there
    app = create_app(Settings(database_url=url, data_dir=tmp_path))
    with serving(app) as base_url, httpx.Client(base_url=base_url, timeout=30) as client:
        for method, path in (("GET", "/reports/summary"), ("GET", "/admin/concepts"), ("POST", "/v1/audits")):
            answer = client.request(method, path, headers=bearer("aud_0123456789ab_secret"), json={})
            assert answer.status_code == 503, (path, answer.text)
            assert answer.headers["retry-after"] == "5"
            assert answer.json()["error"]["type"] == "database_unavailable"
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("error")


def test_readiness_names_the_failing_dependency_without_its_message(dead_broker_api, caplog):
    """/readyz is public: a broker URL's host, port or user must not reach an anonymous caller;
    the kind of failure does, and the full message goes to the API log."""
    import logging

    client, _ = dead_broker_api
    with caplog.at_level(logging.WARNING, logger="auditor.api.routes.health"):
        ready = httpx.get(f"{client.base_url}/readyz", timeout=30)  # no token
    assert ready.status_code == 503
    broker = ready.json()["checks"]["broker"]
    assert broker.startswith("error: ") and broker.endswith("(details in the API log)"), broker
    assert "127.0.0.1" not in ready.text and "refused" not in ready.text.lower(), ready.text
    assert any("broker check failed" in r.getMessage() for r in caplog.records)
