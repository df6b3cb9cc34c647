"""Events as Server-Sent Events, artifact downloads, /metrics and /readyz: a real uvicorn server,
a worker running fake_job.py, and httpx as the client."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from charter.service import metrics
from charter.service.api import build_app
from charter.service.db import Job, JobStatus, schema_status
from charter.service.logs import JsonFormatter
from charter.service.store import JobStore
from charter.service.worker import Worker
from charter.settings import Settings

from .helpers import fake_command, make_settings, serving, spec
from .test_worker import wait_for


class Live:
    def __init__(self, url: str, store: JobStore, settings: Settings):
        self.url, self.store, self.settings = url, store, settings

    def submit(self, mode: str) -> Job:
        return self.store.create_job(spec(mode), name=mode)

    def finished(self, mode: str) -> Job:
        job = self.submit(mode)
        wait_for(lambda: self.store.get_job(job.id).status.finished, timeout=30)
        return self.store.get_job(job.id)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("streams")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}")
    app = build_app(settings, start_worker=False)
    with serving(app) as url:
        stop = threading.Event()
        store = app.state.store
        worker = threading.Thread(
            target=Worker(store, settings, job_command=fake_command).run_forever, args=(stop,), daemon=True
        )
        worker.start()
        yield Live(url, store, settings)
        stop.set()
        worker.join(10)


def sse(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, list[dict[str, Any]]]:
    """GET an SSE stream to its end; returns the status and the frames as {id, event, data}."""
    frames: list[dict[str, Any]] = []
    headers = {"Accept": "text/event-stream"} | (headers or {})
    with httpx.stream("GET", url, headers=headers, timeout=timeout) as r:
        if r.status_code != 200:
            return r.status_code, []
        assert r.headers["content-type"].startswith("text/event-stream")
        frame: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                if "data" in frame:
                    frames.append(frame)
                frame = {}
            elif not line.startswith(":"):
                field, _, value = line.partition(": ")
                frame[field] = json.loads(value) if field == "data" else value
    return 200, frames


def test_sse_follows_a_job_to_its_end_and_resumes_from_last_event_id(live: Live) -> None:
    job = live.submit("ok")  # queued: the stream starts before any event exists
    status, frames = sse(f"{live.url}/v1/jobs/{job.id}/events")
    assert status == 200
    *events, end = frames
    assert end["event"] == "end" and end["data"]["status"] == "succeeded" and "id" not in end
    ids = [int(f["id"]) for f in events]
    assert ids == sorted(set(ids)) and len(ids) >= 6
    assert all(f["event"] == f["data"]["type"] and int(f["id"]) == f["data"]["id"] for f in events)
    stages = [(f["data"]["data"]["stage"], f["data"]["data"]["state"]) for f in events if f["event"] == "stage"]
    assert ("generate", "started") in stages and ("generate", "done") in stages
    # the same events as the JSON pages
    page = httpx.get(f"{live.url}/v1/jobs/{job.id}/events", params={"limit": 1000}).json()
    assert [e["id"] for e in page["data"]] == ids and page["data"][0] == events[0]["data"]

    status, resumed = sse(f"{live.url}/v1/jobs/{job.id}/events", {"Last-Event-ID": str(ids[2])})
    assert [int(f["id"]) for f in resumed[:-1]] == ids[3:] and resumed[-1]["event"] == "end"
    status, _ = sse(f"{live.url}/v1/jobs/{job.id}/events", {"Last-Event-ID": str(ids[-1])})
    assert status == 204  # finished and nothing after: EventSource stops reconnecting
    status, frames = sse(f"{live.url}/v1/jobs/{job.id}/events?after={ids[-2]}")
    assert [int(f["id"]) for f in frames[:-1]] == ids[-1:]
    for bad in ("x", "-1", str(2**64)):
        status, _ = sse(f"{live.url}/v1/jobs/{job.id}/events", {"Last-Event-ID": bad})
        assert status == 422, bad


def test_sse_streams_while_the_job_runs(live: Live) -> None:
    job = live.submit("slow")  # ~4 s of progress
    seen_running = []
    with httpx.stream(
        "GET", f"{live.url}/v1/jobs/{job.id}/events", headers={"Accept": "text/event-stream"}, timeout=30
    ) as r:
        for line in r.iter_lines():
            if line.startswith("event: stage"):
                seen_running.append(live.store.get_job(job.id).status)
    assert JobStatus.RUNNING in seen_running  # events arrived before the job ended
    assert live.store.get_job(job.id).status == JobStatus.SUCCEEDED


def test_artifacts_list_and_download(live: Live) -> None:
    job = live.finished("files")
    assert job.status == JobStatus.SUCCEEDED, job.error
    base = f"{live.url}/v1/jobs/{job.id}/artifacts"
    listed = {a["name"]: a for a in httpx.get(base).json()["data"]}
    assert set(listed) == {"dataset_jsonl", "adapter", "plot", "report", "log"}  # never leak or outside
    assert listed["adapter"] == {"name": "adapter", "kind": "dir", "bytes": 9 + 3072 + 513, "path": "train/adapter"}
    assert listed["dataset_jsonl"]["kind"] == "file" and listed["dataset_jsonl"]["path"] == "dataset/pairs.jsonl"

    workdir = live.settings.artifact_root / job.id
    r = httpx.get(f"{base}/dataset_jsonl")
    assert r.status_code == 200 and r.headers["content-type"] == "application/jsonl"
    assert r.content == (workdir / "dataset" / "pairs.jsonl").read_bytes()
    r = httpx.get(f"{base}/plot")
    assert r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    assert httpx.get(f"{base}/report").json() == {"win_rate": 0.5}
    assert "fake job files starting" in httpx.get(f"{base}/log").text
    inside = httpx.get(f"{base}/dataset/pairs.jsonl")  # a path inside the job folder
    assert inside.status_code == 200 and inside.content == (workdir / "dataset" / "pairs.jsonl").read_bytes()

    r = httpx.get(f"{base}/adapter")
    assert r.headers["content-type"] == "application/x-tar"
    assert 'filename="adapter.tar"' in r.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        names = sorted(tar.getnames())
        assert names == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/sub/note.txt"]
        assert tar.extractfile("adapter/adapter_model.safetensors").read() == bytes(range(256)) * 12
        assert tar.extractfile("adapter/sub/note.txt").read() == b"x" * 513

    for name in ("leak", "leak/hostname", "../../etc/passwd", "dataset/../../x", "%2Fetc%2Fpasswd"):
        r = httpx.get(f"{base}/{name}")
        assert r.status_code in (400, 404), name
        assert "root:" not in r.text
        if r.status_code == 400:
            assert "refused" in r.json()["detail"]
    assert httpx.get(f"{base}/leak").status_code == 400
    assert httpx.get(f"{base}/a%00b").status_code == 400  # a NUL byte
    assert httpx.get(f"{base}/{'x' * 5000}").status_code == 404  # longer than a file name may be
    assert httpx.get(f"{base}/%2Fetc%2Fpasswd").status_code == 400
    missing = httpx.get(f"{base}/nothing-here")
    assert missing.status_code == 404 and "GET /v1/jobs" in missing.json()["detail"]


def test_metrics_from_the_store(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "SETTLE", timedelta(0))
    live.finished("ok")
    live.finished("fail")
    r = httpx.get(f"{live.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    counts = live.store.count_by_status()
    assert samples[("charter_jobs", (("status", "succeeded"),))] == counts[JobStatus.SUCCEEDED] >= 1
    assert samples[("charter_jobs", (("status", "failed"),))] == counts[JobStatus.FAILED] >= 1
    assert samples[("charter_jobs", (("status", "cancelling"),))] == 0
    assert samples[("charter_stage_duration_seconds_count", (("stage", "generate"),))] >= 1
    assert samples[("charter_queue_wait_seconds_count", ())] >= 2
    assert samples[("charter_stage_tokens_per_second_count", (("stage", "generate"),))] >= 1
    assert samples[("charter_stage_tokens_per_second_sum", (("stage", "generate"),))] > 0
    before = samples[("charter_queue_wait_seconds_count", ())]
    again = httpx.get(f"{live.url}/metrics").text  # each event is observed once
    assert f"charter_queue_wait_seconds_count {before}" in again


def test_readyz_checks_the_database_and_its_schema(live: Live, tmp_path: Path) -> None:
    ready = httpx.get(f"{live.url}/readyz")
    _, heads = schema_status(live.store.engine)
    assert ready.status_code == 200 and ready.json() == {"status": "ok", "database": "ok", "migrations": min(heads)}

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'old.db'}")
    app = build_app(settings, start_worker=False)
    client = TestClient(app)  # no lifespan: nothing migrates this database
    r = client.get("/readyz")
    assert r.status_code == 503 and f"charter needs {min(heads)}" in r.json()["migrations"]
    with app.state.store.engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
        conn.execute(sa.text("INSERT INTO alembic_version VALUES ('0001')"))
    assert "at 0001" in client.get("/readyz").json()["migrations"]
    app.state.store.engine.dispose()
    broken = build_app(make_settings(tmp_path, "postgresql+psycopg://postgres@127.0.0.1:9/none"), start_worker=False)
    r = TestClient(broken).get("/readyz")
    assert r.status_code == 503 and r.json()["database"].startswith("unreachable")


def test_json_logs_carry_the_job_id(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    job = live.submit("ok")
    with caplog.at_level(logging.INFO):
        httpx.get(f"{live.url}/v1/jobs/{job.id}")
        wait_for(lambda: live.store.get_job(job.id).status.finished, timeout=30)
    access = [r for r in caplog.records if r.name == "charter.api" and getattr(r, "job_id", None) == job.id]
    assert access and access[0].status == 200 and access[0].method == "GET"
    worker = [r for r in caplog.records if r.name == "charter.worker" and getattr(r, "job_id", None) == job.id]
    assert any("succeeded" in r.getMessage() for r in worker)
    line = json.loads(JsonFormatter().format(access[0]))
    assert line["job_id"] == job.id and line["level"] == "info" and line["status"] == 200 and "time" in line
