"""Worker processes on the real Postgres: many drain a queue once each, SIGKILL is survived, SIGTERM hands back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.service.db import JobStatus
from charter.service.store import JobStore

from .helpers import make_store, postgres_schema_url, spec
from .test_worker import wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from postgres_schema_url()


class Workers:
    def __init__(self, url: str, tmp: Path):
        self.url, self.tmp = url, tmp
        self.procs: list[subprocess.Popen[str]] = []
        self.store = make_store(url, lease_seconds=2)

    def start(self, **env: str) -> subprocess.Popen[str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
        environ |= {
            "PYTHONPATH": str(REPO),
            "DATABASE_URL": self.url,
            "ARTIFACT_ROOT": str(self.tmp / "artifacts"),
            "CHARTER_HOME": str(self.tmp),
            "CHARTER_LEASE_SECONDS": "2",
            "CHARTER_HEARTBEAT_SECONDS": "0.5",
            "CHARTER_LOG_FORMAT": "json",
            **env,
        }
        log = open(self.tmp / f"worker-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.service.worker_proc"],
            stderr=log,
            stdout=log,
            env=environ,
            cwd=REPO,
            text=True,
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.store.engine.dispose()


@pytest.fixture
def workers(pg_url: str, tmp_path: Path) -> Iterator[Workers]:
    w = Workers(pg_url, tmp_path)
    yield w
    w.close()


def started_events(store: JobStore, job_id: str) -> list[dict]:
    return [e.data for e in store.events(job_id, limit=1000) if "started on worker" in e.data.get("message", "")]


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in "ZX"


def test_three_worker_processes_drain_30_jobs_each_run_once(workers: Workers) -> None:
    store = workers.store
    ids = [store.create_job(spec("ok"), name="ok").id for _ in range(30)]
    procs = [workers.start() for _ in range(3)]
    wait_for(lambda: all(j.status.finished for j in store.list_jobs(100)), timeout=120)
    runners = set()
    for job_id in ids:
        job = store.get_job(job_id)
        assert (job.status, job.attempt) == (JobStatus.SUCCEEDED, 1), job.error
        starts = started_events(store, job_id)
        assert len(starts) == 1  # one claim, one process
        runners.add(starts[0]["worker"])
        log = (workers.tmp / "artifacts" / job_id / "job.log").read_text()
        assert log.count("--- attempt") == 1
    assert len(runners) >= 2  # the queue was shared out
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    assert [proc.wait(20) for proc in procs] == [0, 0, 0]
    lines = [json.loads(line) for line in (workers.tmp / "worker-0.log").read_text().splitlines() if line.strip()]
    assert any(line.get("job_id") in ids for line in lines)  # JSON lines, with the job id


def test_a_sigkilled_workers_job_is_taken_over_after_its_lease_and_finished(workers: Workers) -> None:
    store = workers.store
    job = store.create_job(spec("slow"), name="slow")
    first = workers.start()
    workdir = workers.tmp / "artifacts" / job.id
    wait_for((workdir / "pids-1.json").exists, timeout=60)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    killed_at = time.monotonic()
    workers.start()
    wait_for(lambda: store.get_job(job.id).status.finished, timeout=60)
    done = store.get_job(job.id)
    assert (done.status, done.attempt) == (JobStatus.SUCCEEDED, 2), done.error
    assert time.monotonic() - killed_at >= 2  # not before the lease ran out
    assert (workdir / "done-2").exists() and not (workdir / "done-1").exists()
    # the orphaned first attempt died with its worker's pipe, so it wrote nothing more
    assert not alive(json.loads((workdir / "pids-1.json").read_text())["pid"])
    messages = [e.data.get("message", "") for e in store.events(job.id, limit=1000)]
    assert any("stopped heartbeating" in m and "takes the job over" in m for m in messages)
    assert done.result == {"report": {"attempt": "2"}, "artifacts": {}}


def test_sigterm_hands_the_running_job_back(workers: Workers) -> None:
    store = workers.store
    job = store.create_job(spec("slow"), name="slow")
    proc = workers.start()
    workdir = workers.tmp / "artifacts" / job.id
    wait_for((workdir / "pids-1.json").exists, timeout=60)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    back = store.get_job(job.id)
    assert (back.status, back.attempt, back.lease_owner) == (JobStatus.QUEUED, 1, None)
    assert not alive(json.loads((workdir / "pids-1.json").read_text())["pid"])
    assert "worker stopping; the job goes back to the queue and resumes" in [
        e.data.get("message") for e in store.events(job.id, limit=1000)
    ]
    workers.start()  # the next worker takes it at once, without waiting for a lease
    wait_for(lambda: store.get_job(job.id).status.finished, timeout=60)
    assert (store.get_job(job.id).status, store.get_job(job.id).attempt) == (JobStatus.SUCCEEDED, 2)


def test_labelled_jobs_wait_for_a_worker_with_those_labels(workers: Workers) -> None:
    store = workers.store
    gpu = store.create_job(spec("ok"), name="ok", labels=["gpu"])
    anywhere = store.create_job(spec("ok"), name="ok")
    workers.start()  # no labels
    wait_for(lambda: store.get_job(anywhere.id).status.finished, timeout=60)
    time.sleep(1.5)  # a few more claim rounds
    assert store.get_job(gpu.id).status == JobStatus.QUEUED
    workers.start(CHARTER_WORKER_LABELS="gpu,a100")
    wait_for(lambda: store.get_job(gpu.id).status.finished, timeout=60)
    runner = started_events(store, gpu.id)[0]["worker"]
    assert runner != started_events(store, anywhere.id)[0]["worker"]


def test_a_job_process_dies_with_its_worker(workers: Workers) -> None:
    store = workers.store
    job = store.create_job(spec("sleep"), name="sleep")  # prints once, then sleeps ten minutes
    proc = workers.start()
    pids_file = workers.tmp / "artifacts" / job.id / "pids.json"
    wait_for(pids_file.exists, timeout=60)
    pids = json.loads(pids_file.read_text())
    assert alive(pids["pid"]) and alive(pids["child"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    # the job and what it started (a child that ignores SIGTERM) are not left beside the next attempt
    wait_for(lambda: not alive(pids["pid"]) and not alive(pids["child"]), timeout=5)


def test_cancel_stops_a_worker_process_job_within_10_s(workers: Workers) -> None:
    store = workers.store
    job = store.create_job(spec("sleep"), name="sleep")
    workers.start()
    pids_file = workers.tmp / "artifacts" / job.id / "pids.json"
    wait_for(pids_file.exists, timeout=60)
    pids = json.loads(pids_file.read_text())
    store.request_cancel(job.id)
    took = wait_for(lambda: store.get_job(job.id).status == JobStatus.CANCELLED, timeout=10)
    assert took < 10 and not alive(pids["pid"]) and not alive(pids["child"])  # the whole process group
