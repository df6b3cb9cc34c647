"""The HTTP API through FastAPI's TestClient, on SQLite, with the real validator (TRL's parser included)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from charter.service.api import build_app
from charter.service.db import JobStatus

from .helpers import make_settings, spec

MISSING = "job-000000000000"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    # One app for the module: the validator's warm-up (a TRL subprocess) is paid once.
    tmp = tmp_path_factory.mktemp("api")
    with TestClient(build_app(make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}"), start_worker=False)) as c:
        yield c


def count(client: TestClient) -> int:
    return client.get("/v1/jobs", params={"limit": 1000}).json()["count"]


def test_health_and_docs(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs/{job_id}/events" in client.get("/openapi.json").json()["paths"]


def test_create_list_get_events_cancel(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=spec("api-job"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("job-") and job["status"] == "queued" and job["attempt"] == 0
    assert job["spec"]["data"]["samples_per_prompt"] == 2  # stored as validated, defaults filled in
    assert (job["report"], job["artifacts"], job["stage"]) == (None, {}, None)

    assert client.get(f"/v1/jobs/{job['id']}").json() == job
    listed = client.get("/v1/jobs").json()
    assert listed["object"] == "list" and listed["count"] == len(listed["data"]) >= 1
    assert listed["data"][0]["id"] == job["id"]  # newest first
    assert job["id"] in [j["id"] for j in client.get("/v1/jobs", params={"status": "queued"}).json()["data"]]
    assert client.get("/v1/jobs", params={"status": "succeeded"}).json()["count"] == 0

    store = client.app.state.store
    ids = [store.append_event(job["id"], "stage", {"stage": "generate", "state": "started"}) for _ in range(3)]
    events = client.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["id"] for e in events["data"]] == ids and events["last_id"] == ids[-1]
    assert set(events["data"][0]) == {"id", "job_id", "time", "level", "type", "data"}
    page = client.get(f"/v1/jobs/{job['id']}/events", params={"after": ids[0], "limit": 1}).json()
    assert [e["id"] for e in page["data"]] == [ids[1]] and page["last_id"] == ids[1]
    assert client.get(f"/v1/jobs/{job['id']}/events", params={"after": ids[-1]}).json() == {
        "object": "list",
        "data": [],
        "last_id": ids[-1],
    }

    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and "already finished" in again.json()["detail"]


def test_report_and_artifacts_come_from_the_result(client: TestClient) -> None:
    store = client.app.state.store
    job = client.post("/v1/jobs", json=spec("finished")).json()
    while (claimed := store.claim("w")) is not None and claimed.id != job["id"]:
        store.finish(claimed.id, "w", claimed.attempt, JobStatus.FAILED, error="not this test's job")
    result = {"report": {"win_rate": 0.6}, "artifacts": {"adapter": "/a/adapter"}}
    store.finish(job["id"], "w", 1, JobStatus.SUCCEEDED, result=result)
    shown = client.get(f"/v1/jobs/{job['id']}").json()
    assert (shown["status"], shown["report"], shown["artifacts"]) == (
        "succeeded",
        result["report"],
        result["artifacts"],
    )
    assert shown["finished_at"] is not None and shown["created_at"].endswith("Z")


def test_resources_labels_go_with_the_job(client: TestClient) -> None:
    r = client.post("/v1/jobs", json=spec("gpu-job", resources={"labels": ["gpu"]}))
    assert r.status_code == 201 and r.json()["spec"]["resources"] == {"labels": ["gpu"]}
    assert client.app.state.store.get_job(r.json()["id"]).labels == "gpu"
    bad = client.post("/v1/jobs", json=spec("x", resources={"labels": ["GPU A"]}))
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["resources", "labels", 0]


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/v1/jobs/{}"),
        ("GET", "/v1/jobs/{}/events"),
        ("POST", "/v1/jobs/{}/cancel"),
        ("GET", "/v1/jobs/{}/artifacts"),
        ("GET", "/v1/jobs/{}/artifacts/log"),
    ],
)
def test_unknown_job_is_404(client: TestClient, method: str, path: str) -> None:
    r = client.request(method, path.format(MISSING))
    assert r.status_code == 404
    assert r.json() == {"detail": f"job {MISSING} not found; list jobs with GET /v1/jobs"}


def _json(body: Any) -> dict[str, Any]:
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


BAD_REQUESTS: list[tuple[str, dict[str, Any], list[Any], str]] = [
    # (case, request kwargs, loc expected in one error, text expected in that error's msg)
    ("unknown top-level key", _json(spec(colour="red")), ["colour"], "unknown key"),
    ("train.method telepathy", _json(spec(train={"method": "telepathy"})), ["train", "method"], "telepathy"),
    ("samples_per_prompt 0", _json(spec(data={"samples_per_prompt": 0})), ["data", "samples_per_prompt"], "1"),
    ("ai labels need two samples", _json(spec(data={"samples_per_prompt": 1})), ["data"], "samples_per_prompt: 2"),
    ("missing policy", _json({k: v for k, v in spec().items() if k != "policy"}), ["policy"], "required"),
    ("body is a list", _json([spec()]), ["body"], "JSON object"),
    ("body is a string", _json("name: x"), ["body"], "JSON object"),
    (
        "malformed JSON",
        {"content": b'{"name": "x", ', "headers": {"content-type": "application/json"}},
        ["body"],
        "not valid JSON",
    ),
    ("empty body", {"content": b"", "headers": {"content-type": "application/json"}}, ["body"], "no body"),
    (
        "not sent as JSON",
        {"content": json.dumps(spec()).encode(), "headers": {"content-type": "text/plain"}},
        ["body"],
        "content-type",
    ),
    ("unknown model", _json(spec(policy={"model": "no-such-model-xyz"})), ["policy", "model"], "no-such-model-xyz"),
    (
        "unknown TRL key",
        _json(spec(train={"method": "dpo", "args": {"betta": 0.1}})),
        ["train", "args", "betta"],
        "betta",
    ),
    (
        "service-owned TRL key",
        _json(spec(train={"method": "dpo", "args": {"output_dir": "/tmp/x"}})),
        ["train", "args", "output_dir"],
        "charter",
    ),
]


@pytest.mark.parametrize("case,request_kwargs,loc,text", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_is_422_naming_the_field(
    client: TestClient, case: str, request_kwargs: dict[str, Any], loc: list[Any], text: str
) -> None:
    before = count(client)
    r = client.post("/v1/jobs", **request_kwargs)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert isinstance(errors, list) and all(set(e) == {"loc", "msg"} for e in errors)
    matching = [e for e in errors if e["loc"] == loc]
    assert matching, f"no error at {loc}: {errors}"
    assert any(text in e["msg"] for e in matching), errors
    assert client.get("/healthz").json() == {"status": "ok"}
    assert count(client) == before  # nothing was queued


@pytest.mark.parametrize("params", [{"status": "done"}, {"limit": 0}, {"limit": "many"}])
def test_bad_list_query_is_422(client: TestClient, params: dict[str, Any]) -> None:
    r = client.get("/v1/jobs", params=params)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query"


def png_size(body: bytes) -> tuple[int, int]:
    assert body[:8] == b"\x89PNG\r\n\x1a\n", body[:40]
    return int.from_bytes(body[16:20], "big"), int.from_bytes(body[20:24], "big")


def test_plot_png_draws_the_training_metrics_logged_so_far(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=spec("plot-job")).json()
    url = f"/v1/jobs/{job['id']}/plot.png"
    r = client.get(url)
    assert r.status_code == 404 and "no training metrics yet" in r.json()["detail"], r.text
    assert client.get(f"/v1/jobs/{MISSING}/plot.png").status_code == 404

    store = client.app.state.store
    store.append_event(job["id"], "metrics", {"stage": "train", "step": 1, "loss": 0.7})
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    one_panel = png_size(r.content)

    # GRPO-like lines add reward (per source), KL and length panels: one panel each, side by side.
    for step in (2, 3):
        store.append_event(
            job["id"],
            "metrics",
            {
                "stage": "train",
                "step": step,
                "loss": 0.5,
                "reward": 0.4,
                "reward/judge/mean": 0.3,
                "kl": 0.01,
                "completion_length": 30.0,
            },
        )
    store.append_event(job["id"], "metrics", {"stage": "evaluate", "win_rate": 0.6})  # not a training step
    four_panels = png_size(client.get(url).content)
    assert four_panels[1] == one_panel[1] and four_panels[0] == 4 * one_panel[0], (one_panel, four_panels)
