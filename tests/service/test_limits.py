"""Request limits: body size (413) and jobs queued per tenant (429), each naming its setting."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from charter.service.api import build_app
from charter.service.store import JobStore, TooManyQueued

from .helpers import make_settings, make_store, spec


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("limits")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}", max_body_bytes=4000, max_queued_jobs=2)
    with TestClient(build_app(settings, start_worker=False)) as c:
        yield c


def test_a_body_over_the_limit_is_413_and_nothing_is_queued(client: TestClient) -> None:
    store: JobStore = client.app.state.store
    before = store.count_jobs()
    big = spec("big", constitution={"name": "x" * 5000})
    r = client.post("/v1/jobs", json=big)
    assert r.status_code == 413
    detail = r.json()["detail"]
    assert "4000 bytes" in detail and "CHARTER_MAX_BODY_BYTES" in detail

    def chunks() -> Iterator[bytes]:  # no content-length: counted while it is read
        body = json.dumps(big).encode()
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "CHARTER_MAX_BODY_BYTES" in r.json()["detail"]
    assert store.count_jobs() == before
    assert client.get("/healthz").status_code == 200


def test_queued_jobs_per_tenant_are_limited_with_429(client: TestClient) -> None:
    store: JobStore = client.app.state.store
    first = [client.post("/v1/jobs", json=spec(f"q{i}")) for i in range(2)]
    assert [r.status_code for r in first] == [201, 201]
    r = client.post("/v1/jobs", json=spec("q3"))
    assert r.status_code == 429 and r.headers["retry-after"] == "30"
    assert "CHARTER_MAX_QUEUED_JOBS=2" in r.json()["detail"] and "tenant default" in r.json()["detail"]
    # another tenant is not held back by this one's queue
    assert store.create_job(spec("other"), name="other", tenant="team-b", max_queued=2).tenant == "team-b"
    # a queued job that starts or is cancelled frees its place
    client.post(f"/v1/jobs/{first[0].json()['id']}/cancel")
    assert client.post("/v1/jobs", json=spec("q4")).status_code == 201


def test_the_queue_limit_holds_under_concurrent_submits(db_url: str) -> None:
    import threading

    store = make_store(db_url)
    try:
        results: list[str] = []
        barrier = threading.Barrier(8)

        def submit(i: int) -> None:
            barrier.wait()
            try:
                store.create_job(spec(f"c{i}"), name=f"c{i}", tenant="t", max_queued=3)
                results.append("ok")
            except TooManyQueued:
                results.append("429")

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == ["429"] * 5 + ["ok"] * 3
        assert len(store.list_jobs(100, scope="t")) == 3
    finally:
        store.engine.dispose()
