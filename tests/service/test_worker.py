"""The worker, running fake_job.py (the real stdout protocol) as each job's process, on SQLite."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from charter.service.db import Job, JobStatus, utcnow
from charter.service.store import JobStore
from charter.service.worker import Worker
from charter.settings import Settings

from .helpers import fake_command, make_settings, make_store, spec


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str) -> Settings:
    return make_settings(tmp_path, sqlite_url)


@pytest.fixture
def store(settings: Settings) -> Iterator[JobStore]:
    s = make_store(settings.database_url, lease_seconds=settings.lease_seconds)
    yield s
    s.engine.dispose()


@pytest.fixture
def worker(store: JobStore, settings: Settings) -> Worker:
    return Worker(store, settings, worker_id="w-test", job_command=fake_command)


@pytest.fixture
def running_worker(worker: Worker) -> Iterator[tuple[Worker, threading.Event, threading.Thread]]:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    yield worker, stop, thread
    stop.set()
    thread.join(15)


def run(store: JobStore, worker: Worker, mode: str) -> Job:
    job = store.create_job(spec(mode), name=mode)
    claimed = store.claim(worker.worker_id)
    assert claimed is not None and claimed.id == job.id
    worker.run_one(claimed)
    return store.get_job(job.id)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)
    return time.monotonic() - start


def group_alive(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group, read from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in "ZX":
            alive.append(int(stat.parent.name))
    return alive


def test_success_stores_result_events_progress_and_log(store: JobStore, worker: Worker, settings: Settings) -> None:
    job = run(store, worker, "ok")
    workdir = settings.artifact_root / job.id
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result == json.loads((workdir / "result.json").read_text())
    assert job.result["report"]["win_rate"] == 0.75
    assert json.loads((workdir / "spec.json").read_text()) == spec("ok")
    assert job.stage == "critique" and job.progress == {"stage": "critique", "state": "skipped"}

    events = store.events(job.id, limit=1000)
    stages = [(e.data["stage"], e.data["state"]) for e in events if e.type == "stage"]
    assert ("generate", "started") in stages and ("generate", "done") in stages
    assert {e.type for e in events} == {"message", "stage", "metrics", "artifact"}
    assert next(e for e in events if e.type == "metrics").data == {"step": 1, "loss": 0.693}

    log = (workdir / "job.log").read_text()
    assert "fake job ok starting" in log and "@@event {not json" in log
    assert '"type": "stage"' not in log  # events go to the store, not the log


def test_progress_events_are_throttled_but_start_and_done_kept(store: JobStore, worker: Worker) -> None:
    job = run(store, worker, "flood")  # 400 progress events in a burst
    assert job.status == JobStatus.SUCCEEDED
    states = [e.data["state"] for e in store.events(job.id, limit=1000) if e.type == "stage"]
    assert states.count("started") == 1 and states.count("done") == 1
    assert 1 <= states.count("progress") <= 10


def test_error_event_becomes_the_job_error(store: JobStore, worker: Worker) -> None:
    job = run(store, worker, "fail")
    assert job.status == JobStatus.FAILED
    assert job.error == "judge at http://127.0.0.1:9/v1 unreachable after 3 retries"
    errors = [e for e in store.events(job.id) if e.level == "error"]
    assert len(errors) == 1  # the job's own error event, not repeated by the worker


def test_exit_code_and_log_tail_without_an_error_event(store: JobStore, worker: Worker) -> None:
    job = run(store, worker, "exit")
    assert job.status == JobStatus.FAILED
    assert job.error.startswith("job process exited with code 5;")
    assert "log line 29" in job.error and "log line 5\n" not in job.error  # only the last 20 lines


def test_exit_zero_without_result_fails(store: JobStore, worker: Worker) -> None:
    job = run(store, worker, "noresult")
    assert job.status == JobStatus.FAILED and "result.json" in job.error


def test_worker_survives_a_crashing_job(store: JobStore, running_worker: tuple) -> None:
    _, _, thread = running_worker
    crash = store.create_job(spec("crash"), name="crash")
    ok = store.create_job(spec("ok"), name="ok")
    wait_for(lambda: store.get_job(ok.id).status.finished, timeout=20)
    crashed = store.get_job(crash.id)
    assert crashed.status == JobStatus.FAILED and "signal SIGKILL" in crashed.error
    assert store.get_job(ok.id).status == JobStatus.SUCCEEDED
    assert thread.is_alive()


def test_cancel_stops_a_running_job_within_10_s(store: JobStore, running_worker: tuple, settings: Settings) -> None:
    job = store.create_job(spec("sleep"), name="sleep")
    pids_file = settings.artifact_root / job.id / "pids.json"
    wait_for(pids_file.exists)
    pids = json.loads(pids_file.read_text())
    assert set(group_alive(pids["pgid"])) >= {pids["pid"], pids["child"]}

    store.request_cancel(job.id)
    took = wait_for(lambda: store.get_job(job.id).status == JobStatus.CANCELLED, timeout=10)
    assert took < 10
    assert group_alive(pids["pgid"]) == []  # the child that ignored SIGTERM is gone too
    assert "cancelled by request" in [e.data.get("message") for e in store.events(job.id)]


def test_graceful_stop_requeues_the_running_job(store: JobStore, worker: Worker, settings: Settings) -> None:
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    job = store.create_job(spec("sleep"), name="sleep")
    pids_file = settings.artifact_root / job.id / "pids.json"
    wait_for(pids_file.exists)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    again = store.get_job(job.id)
    assert (again.status, again.lease_owner, again.lease_expires_at, again.attempt) == (JobStatus.QUEUED, None, None, 1)
    assert group_alive(json.loads(pids_file.read_text())["pgid"]) == []
    assert store.claim("next").attempt == 2


def test_a_worker_that_lost_its_lease_stops_and_writes_nothing(
    store: JobStore, worker: Worker, settings: Settings
) -> None:
    job = store.create_job(spec("sleep"), name="sleep")
    claimed = store.claim(worker.worker_id)
    result: list[JobStatus | None] = []
    thread = threading.Thread(target=lambda: result.append(worker.run_one(claimed)), daemon=True)
    thread.start()
    wait_for((settings.artifact_root / job.id / "pids.json").exists)
    with store.engine.begin() as conn:  # as if this worker had missed its heartbeats
        conn.execute(sa.update(Job).where(Job.id == job.id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert store.claim("w-new").attempt == 2
    thread.join(10)
    assert result == [None]
    now = store.get_job(job.id)
    assert (now.status, now.lease_owner, now.attempt) == (JobStatus.RUNNING, "w-new", 2)


def fake_servers(monkeypatch: pytest.MonkeyPatch, job_endpoints: Callable[..., dict[str, str]]) -> list[bool]:
    """charter.pipelines.servers' interface, minus the vLLM servers; returns a list that records close()."""
    closed: list[bool] = []

    class VLLMServerPool:
        def __init__(self, settings: Settings) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    servers = types.ModuleType("charter.pipelines.servers")
    servers.VLLMServerPool, servers.job_endpoints = VLLMServerPool, job_endpoints  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "charter.pipelines.servers", servers)
    return closed


def test_server_start_failure_fails_the_job_and_not_the_worker(
    store: JobStore, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def job_endpoints(spec: object, pool: object, notify: object = None) -> dict[str, str]:
        raise RuntimeError("vLLM server for smollm2-135m failed to start: port 8000 in use")

    closed = fake_servers(monkeypatch, job_endpoints)
    worker = Worker(store, settings, worker_id="w-real")
    job = run(store, worker, "ok")
    assert job.status == JobStatus.FAILED
    assert "vLLM server for smollm2-135m failed to start" in job.error
    assert run(store, worker, "ok").status == JobStatus.FAILED  # the same worker goes on
    worker.close()
    assert closed == [True]


def test_the_lease_is_kept_while_servers_start_and_a_cancel_then_spawns_nothing(
    tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path, sqlite_url, heartbeat_seconds=0.1, lease_seconds=0.5)
    store = make_store(sqlite_url, lease_seconds=0.5)
    starting, started = threading.Event(), threading.Event()

    def job_endpoints(spec: object, pool: object, notify: object = None) -> dict[str, str]:  # a slow vLLM start
        starting.set()
        started.wait(10)
        return {"CHARTER_JUDGE_URL": "http://127.0.0.1:9/v1"}

    fake_servers(monkeypatch, job_endpoints)
    worker = Worker(store, settings, worker_id="w-real")
    job = store.create_job(spec(), name="ok")
    claimed = store.claim(worker.worker_id)
    thread = threading.Thread(target=worker.run_one, args=(claimed,), daemon=True)
    thread.start()
    assert starting.wait(5)
    time.sleep(1.0)  # twice the lease
    assert store.claim("w-other") is None  # heartbeats kept it
    store.request_cancel(job.id)
    started.set()  # the servers are up just after the cancel: no beat has seen it yet
    thread.join(10)
    assert store.get_job(job.id).status == JobStatus.CANCELLED
    assert not (settings.artifact_root / job.id / "job.log").exists()  # no process was started
    store.engine.dispose()


def test_jobs_run_to_their_end_on_each_database(db_url: str, tmp_path: Path) -> None:
    settings = make_settings(tmp_path, db_url)
    store = make_store(db_url)
    worker = Worker(store, settings, worker_id="w-db", job_command=fake_command)
    try:
        ok, fail = run(store, worker, "ok"), run(store, worker, "fail")
        assert ok.status == JobStatus.SUCCEEDED and ok.result["report"]["pairs"] == 4
        assert fail.status == JobStatus.FAILED and "unreachable" in fail.error
        assert [e.type for e in store.events(ok.id)].count("stage") >= 3
    finally:
        store.engine.dispose()
