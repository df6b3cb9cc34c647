"""The judge down, too slow, failing or talking nonsense, through the real API, worker and job process.

A fault-injecting HTTP server stands in for the judge (fault_server.py). The job's
`generate` stage is already done (as a resumed job's would be), so the first judge call is
the critique. Each job must fail with an error naming the judge's URL and the cause, after
the retries with backoff, and the API and the worker must carry on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from charter.pipelines.servers import free_port
from charter.service.api import build_app
from charter.service.db import JobStatus
from charter.service.worker import Worker

from ..service.helpers import make_settings
from .fault_server import FaultServer
from .jobs import TINY_SPEC, real_job_command, seed_generate

pytestmark = pytest.mark.integration  # real job processes and the real TRL validator

RETRIES = 2  # so each request is tried 3 times, with backoff 0.5 s then 1 s


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Worker]]:
    tmp = tmp_path_factory.mktemp("judge-faults")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}")
    with TestClient(build_app(settings, start_worker=False)) as client:
        yield client, Worker(client.app.state.store, settings, worker_id="w-faults", job_command=real_job_command)


def run_job(service: tuple[TestClient, Worker], judge_url: str, timeout_s: float, **data: Any) -> dict:
    client, worker = service
    spec = {
        **TINY_SPEC,
        "judge": {**TINY_SPEC["judge"], "base_url": judge_url, "timeout_s": timeout_s, "retries": RETRIES},
        "data": {**TINY_SPEC["data"], **data},
    }
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    seed_generate(worker.settings.artifact_root / job_id)
    job = worker.store.claim(worker.worker_id)
    assert job is not None and job.id == job_id
    status = worker.run_one(job)  # returns, whatever the job did: the worker survives
    assert status == JobStatus.FAILED
    assert client.get("/healthz").status_code == 200
    return client.get(f"/v1/jobs/{job_id}").json()


@pytest.mark.parametrize(
    ("mode", "cause"),
    [("slow", "APITimeoutError"), ("error", "503 - engine overloaded"), ("garbage", "its reply is not JSON")],
)
def test_a_misbehaving_judge_fails_the_job_after_retries_with_backoff(
    service: tuple[TestClient, Worker], tiny_model: str, mode: str, cause: str, fault: Any
) -> None:
    server = FaultServer(mode, delay_s=3.0)
    with server as url:
        # revision labels: no label stage beside critique, whose requests would race for the judge
        job = run_job(service, url, timeout_s=1.0, labels="revision")
    assert job["status"] == "failed"
    assert f"judge at {url} failed after {RETRIES + 1} attempts" in job["error"], job["error"]
    assert cause in job["error"]
    assert job["stage"] == "critique"
    hits = server.completion_hits()
    assert len(hits) == 4 * (RETRIES + 1)  # 4 critiques (2 prompts × 2 samples), each tried 3 times
    assert hits[-1] - hits[0] >= 1.5 * 0.9  # backoff 0.5 s + 1.0 s between the attempts
    fault(judge=mode, requests=len(hits), error=job["error"][:160], lost=0)


def test_an_unreachable_judge_fails_the_job_naming_the_url(
    service: tuple[TestClient, Worker], tiny_model: str, fault: Any
) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    job = run_job(service, url, timeout_s=2.0)
    assert f"judge at {url} failed after {RETRIES + 1} attempts: APIConnectionError" in job["error"]
    assert time.monotonic() - t0 >= 1.5  # it did back off
    fault(judge="down", error=job["error"][:160], lost=0)


def test_a_judge_that_answers_nonsense_is_counted_never_guessed(
    service: tuple[TestClient, Worker], tiny_model: str, tmp_path: Path, fault: Any
) -> None:
    """Well-formed replies with no text and no logprobs: nothing parses, no verdict is invented."""
    server = FaultServer("nonsense")
    with server as url:
        job = run_job(service, url, timeout_s=5.0)
    assert "no preference pairs to train on" in job["error"], job["error"]
    workdir = service[1].settings.artifact_root / job["id"]
    label = json.loads((workdir / "label" / "manifest.json").read_text())["counts"]
    assert label["pairs"] == 0 and label["unparsed"] == label["candidates"] == 2
    critique = json.loads((workdir / "critique.r1" / "manifest.json").read_text())["counts"]
    assert critique["unparsed"] == 4
    fault(judge="nonsense", unparsed=label["unparsed"], lost=0)


def test_the_worker_keeps_taking_jobs_after_judge_faults(service: tuple[TestClient, Worker], fault: Any) -> None:
    """After the failures above, a worker thread still claims and ends the next job."""
    client, worker = service
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{free_port()}/v1"
        spec = {**TINY_SPEC, "judge": {**TINY_SPEC["judge"], "base_url": url, "timeout_s": 1, "retries": 0}}
        job_id = client.post("/v1/jobs", json=spec).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("failed", "succeeded"):
            assert time.monotonic() < deadline, "the worker did not take the next job"
            time.sleep(0.3)
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(30)
    fault(lost=0)
