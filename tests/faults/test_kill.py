"""kill -9 mid-job, of the job process and of the worker: the job still finishes, and its
dataset has every row exactly once.

A real tiny vLLM server is the policy and the judge; the job processes are the real
`charter.pipelines.run`. A stage writes its rows, then its manifest (written last, atomically),
so a killed attempt leaves either a finished stage or none, and the next attempt resumes
after the last finished one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.pipelines.artifacts import read_jsonl
from charter.service.db import JobStatus
from charter.service.store import JobStore
from charter.service.worker import Worker

from ..service.helpers import make_settings, make_store
from .jobs import TINY_SPEC, real_job_command

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PROMPTS, SAMPLES = 6, 2


def spec(judge_url: str, name: str) -> dict[str, Any]:
    return {
        **TINY_SPEC,
        "name": name,
        "judge": {**TINY_SPEC["judge"], "base_url": judge_url},
        "prompts": {"source": "builtin:red-team", "limit": PROMPTS},
        "data": {**TINY_SPEC["data"], "samples_per_prompt": SAMPLES, "max_new_tokens": 128},
    }


def job_pids(workdir: Path) -> list[int]:
    """Live job processes (charter.pipelines.run) working in this directory, from /proc."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        guard = b"charter.service.jobguard" in args  # the job's parent; the job itself is what dies here
        if b"charter.pipelines.run" in args and str(workdir).encode() in args and state not in "ZX" and not guard:
            pids.append(int(cmdline.parent.name))
    return pids


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.05)
    return value


def stage_started(store: JobStore, job_id: str, stage: str) -> bool:
    return any(
        e.type == "stage" and e.data.get("stage") == stage and e.data.get("state") == "started"
        for e in store.events(job_id, 0, 1000)
    )


def check_dataset(workdir: Path) -> dict[str, int]:
    """Every generated row once, every pair from distinct generated rows, nothing lost on the way."""
    gen = read_jsonl(workdir / "generate" / "rows.jsonl")
    ids = [r["id"] for r in gen]
    assert sorted(ids) == sorted(f"p{i}-s{k}" for i in range(PROMPTS) for k in range(SAMPLES))
    for stage in ("critique.r1", "revise.r1"):
        assert [r["id"] for r in read_jsonl(workdir / stage / "rows.jsonl")] == ids, stage
    pairs = read_jsonl(workdir / "dataset" / "pairs.jsonl")
    used = [i for p in pairs for i in p["source_ids"]]
    assert len(used) == len(set(used)) and set(used) <= set(ids), "a row is in two pairs, or in none it came from"
    counts = json.loads((workdir / "label" / "manifest.json").read_text())["counts"]
    assert counts["candidates"] == PROMPTS * SAMPLES // 2
    assert counts["pairs"] + counts["unparsed"] == counts["candidates"]  # disagreement: keep
    return {"rows": len(gen), "pairs": len(pairs), "lost": counts["candidates"] - counts["pairs"] - counts["unparsed"]}


@pytest.fixture
def policy_env(tiny_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CHARTER_POLICY_URL", tiny_server)
    return tiny_server


@pytest.fixture
def thread_worker(tmp_path: Path, policy_env: str) -> Iterator[tuple[JobStore, Worker]]:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}")
    store = make_store(settings.database_url)
    worker = Worker(store, settings, worker_id="w-kill", job_command=real_job_command)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    yield store, worker
    stop.set()
    thread.join(30)
    store.engine.dispose()


def test_kill_9_of_the_job_process_during_generate(
    thread_worker: tuple[JobStore, Worker], policy_env: str, fault: Any
) -> None:
    store, worker = thread_worker
    job = store.create_job(spec(policy_env, "kill-job-process"), name="kill-job-process")
    workdir = worker.settings.artifact_root / job.id
    wait_for(lambda: stage_started(store, job.id, "generate"), 120, "generate starting")
    (pid,) = wait_for(lambda: job_pids(workdir), 10, "the job process showing up")
    os.kill(pid, signal.SIGKILL)
    killed_mid_stage = not (workdir / "generate" / "manifest.json").exists()
    done = wait_for(lambda: (j := store.get_job(job.id)).status.finished and j, 300, "the job finishing")
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.attempt == 2
    messages = [e.data.get("message", "") for e in store.events(job.id, 0, 1000) if e.type == "message"]
    assert any("signal SIGKILL" in m and "resumes" in m for m in messages), messages
    assert killed_mid_stage, "the kill came after generate had finished; the test proved less than it claims"
    fault(killed="job process", during="generate", attempts=done.attempt, **check_dataset(workdir))


def test_kill_9_of_the_worker_during_critique(tmp_path: Path, policy_env: str, fault: Any) -> None:
    """Worker A dies mid-job; its job process dies with it; worker B takes the job over after the
    lease runs out and resumes after `generate`, whose rows are kept as they were."""
    db = f"sqlite:///{tmp_path / 'charter.db'}"
    store = make_store(db)
    root = tmp_path / "artifacts"
    job = store.create_job(spec(policy_env, "kill-worker"), name="kill-worker")
    workdir = root / job.id

    def worker(name: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "worker_process.py"), db, str(root), name, "3"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
            stdout=open(tmp_path / f"{name}.log", "ab"),
            stderr=subprocess.STDOUT,
        )

    a = worker("worker-a")
    try:
        wait_for(lambda: stage_started(store, job.id, "critique"), 180, "critique starting")
        generated = (workdir / "generate" / "rows.jsonl").read_text()
        (job_pid,) = job_pids(workdir)
        a.kill()
        a.wait()
        # The orphaned job process must not go on writing beside the next attempt.
        wait_for(lambda: not job_pids(workdir), 5, "the orphaned job process ending")
        b = worker("worker-b")
        try:
            done = wait_for(lambda: (j := store.get_job(job.id)).status.finished and j, 300, "the job finishing")
        finally:
            b.terminate()
            b.wait(30)
    finally:
        if a.poll() is None:
            a.kill()
    assert done.status == JobStatus.SUCCEEDED, done.error
    assert done.attempt == 2 and done.lease_owner is None
    skipped = [e.data["stage"] for e in store.events(job.id, 0, 1000) if e.data.get("state") == "skipped"]
    assert skipped == ["generate"]
    assert (workdir / "generate" / "rows.jsonl").read_text() == generated  # resumed, not generated again
    fault(killed="worker", during="critique", attempts=done.attempt, orphan=job_pid, **check_dataset(workdir))
    store.engine.dispose()
