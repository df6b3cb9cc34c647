"""kill -9 mid-job, of the job process and of the worker: the job still finishes, and its
dataset has every row exactly once.

A real tiny vLLM server is the policy and the judge; the job processes are the real
`charter.pipelines.run`. A stage writes its rows, then its manifest (written last, atomically),
so a killed attempt leaves either a finished stage or none, and the next attempt resumes
after the last finished one.
"""

from __future__ import annotations

import contextlib
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
from .jobs import TINY_SPEC, real_job_command, seed_until_train

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
    with running_worker(tmp_path, real_job_command) as store_and_worker:
        yield store_and_worker


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


def worker_process(tmp_path: Path, db: str, root: Path, name: str) -> subprocess.Popen:
    """A real worker process (lease 3 s) whose job processes run without a vLLM pool."""
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "worker_process.py"), db, str(root), name, "3"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        stdout=open(tmp_path / f"{name}.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("stage", ["generate", "critique"])
def test_kill_9_of_the_worker_mid_stage(tmp_path: Path, policy_env: str, fault: Any, stage: str) -> None:
    """Worker A dies mid-stage; its job process dies with it; worker B takes the job over after the
    lease runs out and resumes after the last finished stage: killed in generate, it generates
    again from nothing; killed in critique, it keeps generate's rows as they were."""
    db = f"sqlite:///{tmp_path / 'charter.db'}"
    store = make_store(db)
    root = tmp_path / "artifacts"
    job = store.create_job(spec(policy_env, f"kill-worker-{stage}"), name=f"kill-worker-{stage}")
    workdir = root / job.id

    def worker(name: str) -> subprocess.Popen:
        return worker_process(tmp_path, db, root, name)

    a = worker("worker-a")
    try:
        wait_for(lambda: stage_started(store, job.id, stage), 180, f"{stage} starting")
        generated = (workdir / "generate" / "rows.jsonl").read_text() if stage == "critique" else None
        (job_pid,) = wait_for(lambda: job_pids(workdir), 10, "the job process showing up")
        a.kill()
        a.wait()
        killed_mid_stage = not (workdir / stage / "manifest.json").exists()
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
    assert killed_mid_stage, f"the kill came after {stage} had finished; the test proved less than it claims"
    skipped = [e.data["stage"] for e in store.events(job.id, 0, 1000) if e.data.get("state") == "skipped"]
    assert skipped == ([] if stage == "generate" else ["generate"])
    if generated is not None:
        assert (workdir / "generate" / "rows.jsonl").read_text() == generated  # resumed, not generated again
    fault(killed="worker", during=stage, attempts=done.attempt, orphan=job_pid, **check_dataset(workdir))
    store.engine.dispose()


# -- during training ------------------------------------------------------------------------
# These start from finished generate…label stages (seed_until_train), so no server is needed:
# the judge URL is never called once labels exist.

TRAIN_SPEC = {
    **TINY_SPEC,
    "judge": {**TINY_SPEC["judge"], "base_url": "http://127.0.0.1:9/v1"},
    "prompts": {"source": "builtin:red-team", "limit": 4},
    "train": {
        **TINY_SPEC["train"],
        "args": {"max_steps": 40, "save_steps": 5, "per_device_train_batch_size": 2, "learning_rate": 1e-3},
    },
}


@contextlib.contextmanager
def running_worker(tmp_path: Path, job_command: Callable[..., list[str]]) -> Iterator[tuple[JobStore, Worker]]:
    """A real Worker polling a fresh SQLite store in a thread, with the job command given."""
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}")
    store = make_store(settings.database_url)
    worker = Worker(store, settings, worker_id="w-kill", job_command=job_command)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    thread.start()
    try:
        yield store, worker
    finally:
        stop.set()
        thread.join(30)
        store.engine.dispose()


def finished(store: JobStore, job_id: str, timeout: float) -> Any:
    """The job once it has ended; on a timeout, the error shows its last events."""
    try:
        return wait_for(lambda: (j := store.get_job(job_id)).status.finished and j, timeout, "the job finishing")
    except AssertionError as e:
        last = [(e.type, e.data) for e in store.events(job_id, 0, 10_000)][-8:]
        raise AssertionError(f"{e}; status {store.get_job(job_id).status}, last events {last}") from None


def train_steps(store: JobStore, job_id: str) -> list[int]:
    return [
        e.data["step"]
        for e in store.events(job_id, 0, 10_000)
        if e.type == "metrics" and e.data.get("stage") == "train" and "loss" in e.data
    ]


def check_training_dataset(workdir: Path) -> dict[str, int]:
    """The exported pairs are the label stage's, each once."""
    labelled = read_jsonl(workdir / "label" / "rows.jsonl")
    pairs = read_jsonl(workdir / "dataset" / "pairs.jsonl")
    assert pairs == labelled
    used = [i for p in pairs for i in p["source_ids"]]
    assert len(used) == len(set(used))
    return {"pairs": len(pairs), "lost": len(labelled) - len(pairs)}


def complete_checkpoints(workdir: Path) -> list[str]:
    ckpts = workdir / "train" / "checkpoints"
    found = sorted(ckpts.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    for c in found:  # every checkpoint there is whole: weights, optimizer, trainer state
        assert {"optimizer.pt", "trainer_state.json", "adapter_model.safetensors"} <= {p.name for p in c.iterdir()}, c
    assert not list((ckpts / ".staging").glob("checkpoint-*")), "a half-written checkpoint was left in staging"
    return [c.name for c in found]


def test_kill_9_of_the_job_process_during_training(tmp_path: Path, fault: Any) -> None:
    with running_worker(tmp_path, real_job_command) as (store, worker):
        job = store.create_job(TRAIN_SPEC, name="kill-training")
        workdir = worker.settings.artifact_root / job.id
        seed_until_train(workdir)
        wait_for(lambda: any(s >= 7 for s in train_steps(store, job.id)), 300, "training reaching step 7")
        (pid,) = wait_for(lambda: job_pids(workdir), 10, "the job process showing up")
        os.kill(pid, signal.SIGKILL)
        killed_mid_stage = not (workdir / "train" / "manifest.json").exists()
        steps_before = train_steps(store, job.id)
        done = finished(store, job.id, 600)
    assert killed_mid_stage, "the kill came after training had finished; the test proved less than it claims"
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2, done.error
    messages = [e.data.get("message", "") for e in store.events(job.id, 0, 10_000) if e.type == "message"]
    resumed = [m for m in messages if m.startswith("train: resuming from checkpoint-")]
    assert resumed, messages
    resumed_at = int(resumed[0].rsplit("-", 1)[1])
    assert 5 <= resumed_at <= max(steps_before)
    steps_after = train_steps(store, job.id)[len(steps_before) :]
    # The second attempt goes on from the checkpoint, not from zero, and reaches max_steps.
    assert steps_after and min(steps_after) == resumed_at + 1 and max(steps_after) == 40, steps_after
    assert json.loads((workdir / "train" / "manifest.json").read_text())["counts"]["steps"] == 40
    assert "checkpoint-40" in complete_checkpoints(workdir)
    fault(
        killed="job process",
        during="train",
        attempts=done.attempt,
        resumed_at=resumed_at,
        **check_training_dataset(workdir),
    )


def test_kill_9_while_a_checkpoint_is_written(tmp_path: Path, fault: Any) -> None:
    """Killed between a checkpoint's weights and its optimizer state: the half-written folder is
    never taken for a checkpoint; the next attempt resumes from the one before it."""
    marker = tmp_path / "died-in-checkpoint.json"

    def command(job: Any, spec_path: Path, workdir: Path) -> list[str]:
        hook = str(Path(__file__).parent / "die_in_checkpoint.py")
        return [sys.executable, hook, str(marker), "--spec", str(spec_path), "--workdir", str(workdir)]

    with running_worker(tmp_path, command) as (store, worker):
        job = store.create_job(TRAIN_SPEC, name="kill-in-checkpoint")
        workdir = worker.settings.artifact_root / job.id
        seed_until_train(workdir)
        done = finished(store, job.id, 600)
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2, done.error
    died = json.loads(marker.read_text())
    assert "/.staging/checkpoint-10" in died["dir"] and "optimizer.pt" not in died["files"], died
    assert "adapter_model.safetensors" in died["files"]  # it really was half-written
    messages = [e.data.get("message", "") for e in store.events(job.id, 0, 10_000) if e.type == "message"]
    assert "train: resuming from checkpoint-5" in messages, messages
    steps = train_steps(store, job.id)
    assert steps.count(6) == 2 and max(steps) == 40  # steps 6-10 ran again after the resume from 5
    kept = complete_checkpoints(workdir)
    assert "checkpoint-40" in kept
    fault(killed="job process", during="checkpoint write", attempts=done.attempt, **check_training_dataset(workdir))


def test_kill_9_of_the_worker_during_training(tmp_path: Path, fault: Any) -> None:
    """Worker A dies mid-training, its job process with it; worker B takes the job over after the
    lease and resumes from the last complete checkpoint, not from step 0."""
    db = f"sqlite:///{tmp_path / 'charter.db'}"
    store = make_store(db)
    root = tmp_path / "artifacts"
    job = store.create_job(TRAIN_SPEC, name="kill-worker-training")
    workdir = root / job.id
    seed_until_train(workdir)
    a = worker_process(tmp_path, db, root, "worker-a")
    try:
        wait_for(lambda: any(s >= 7 for s in train_steps(store, job.id)), 300, "training reaching step 7")
        a.kill()
        a.wait()
        killed_mid_stage = not (workdir / "train" / "manifest.json").exists()
        wait_for(lambda: not job_pids(workdir), 5, "the orphaned job process ending")
        steps_before = train_steps(store, job.id)
        b = worker_process(tmp_path, db, root, "worker-b")
        try:
            done = finished(store, job.id, 600)
        finally:
            b.terminate()
            b.wait(30)
    finally:
        if a.poll() is None:
            a.kill()
    assert killed_mid_stage, "the kill came after training had finished; the test proved less than it claims"
    assert done.status == JobStatus.SUCCEEDED and done.attempt == 2 and done.lease_owner is None, done.error
    messages = [e.data.get("message", "") for e in store.events(job.id, 0, 10_000) if e.type == "message"]
    resumed = [m for m in messages if m.startswith("train: resuming from checkpoint-")]
    assert resumed, messages
    resumed_at = int(resumed[0].rsplit("-", 1)[1])
    steps_after = train_steps(store, job.id)[len(steps_before) :]
    assert steps_after and min(steps_after) == resumed_at + 1 and max(steps_after) == 40, steps_after
    assert "checkpoint-40" in complete_checkpoints(workdir)
    fault(
        killed="worker", during="train", attempts=done.attempt, resumed_at=resumed_at, **check_training_dataset(workdir)
    )
    store.engine.dispose()
