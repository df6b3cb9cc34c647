"""Out of disk and out of memory: the job fails saying which, and the worker carries on.

Disk: the artifact root is a 1 MiB tmpfs (mounted by the test; skipped where mounting is not
allowed), filled up before the job writes. Memory: the worker's CHARTER_JOB_MEMORY_MB limit
(RLIMIT_AS on the job process) is set where TRL imports but DPO on 3,000-token pairs cannot
allocate its logits. Both run the real job process (`charter.pipelines.run`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.service.db import JobStatus
from charter.service.store import JobStore
from charter.service.worker import Worker

from ..service.helpers import make_settings, make_store
from .fault_server import FaultServer
from .jobs import TINY_SPEC, real_job_command, seed_generate, seed_until_train

pytestmark = pytest.mark.integration


def make_worker(tmp_path: Path, artifact_root: Path, **settings: Any) -> tuple[JobStore, Worker]:
    s = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}", artifact_root=artifact_root, **settings)
    store = make_store(s.database_url)
    return store, Worker(store, s, worker_id="w-resources", job_command=real_job_command)


def run_next(store: JobStore, worker: Worker) -> Any:
    job = store.claim(worker.worker_id)
    assert job is not None
    worker.run_one(job)  # returns whatever the job did: the worker survives it
    return store.get_job(job.id)


def the_worker_carries_on(store: JobStore, worker: Worker) -> None:
    """A next job is claimed and run to its own (here: judge-down) end."""
    spec = {**TINY_SPEC, "judge": {**TINY_SPEC["judge"], "base_url": "http://127.0.0.1:9/v1", "retries": 0}}
    job = store.create_job(spec, name="after")
    seed_generate(worker.settings.artifact_root / job.id)
    after = run_next(store, worker)
    assert after.status == JobStatus.FAILED and "judge at http://127.0.0.1:9/v1" in after.error, after.error


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "artifacts"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); the disk-full case needs one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem until only `leave` bytes are free."""
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def test_disk_full_while_a_stage_writes(tmp_path: Path, small_disk: Path, tiny_model: str, fault: Any) -> None:
    store, worker = make_worker(tmp_path, small_disk)
    with FaultServer("echo") as judge:
        spec = {**TINY_SPEC, "judge": {**TINY_SPEC["judge"], "base_url": judge}}
        job = store.create_job(spec, name="disk-full")
        seed_generate(small_disk / job.id, words=3000)  # critique rows carry ~30 KB responses each
        filler = fill(small_disk, leave=24 * 1024)  # room for spec.json and the log, not for the rows
        failed = run_next(store, worker)
    assert failed.status == JobStatus.FAILED
    assert failed.error.startswith(f"disk full in stage critique: no space left under {small_disk / job.id}"), (
        failed.error
    )
    assert "No space left on device" in failed.error
    assert not (small_disk / job.id / "critique.r1" / "manifest.json").exists()
    filler.unlink()
    the_worker_carries_on(store, worker)
    fault(error=failed.error[:120], lost=0)


def test_disk_full_before_the_job_starts(tmp_path: Path, small_disk: Path, fault: Any) -> None:
    store, worker = make_worker(tmp_path, small_disk)
    job = store.create_job(TINY_SPEC, name="disk-full-at-start")
    filler = fill(small_disk, leave=0)
    failed = run_next(store, worker)
    assert failed.status == JobStatus.FAILED and "No space left on device" in failed.error, failed.error
    filler.unlink()
    the_worker_carries_on(store, worker)
    fault(error=failed.error[:120], lost=0, job=job.id)


def test_out_of_memory_in_training(tmp_path: Path, tiny_model: str, fault: Any) -> None:
    store, worker = make_worker(tmp_path, tmp_path / "artifacts", job_memory_mb=3500)
    spec = {
        **TINY_SPEC,
        "judge": {**TINY_SPEC["judge"], "base_url": "http://127.0.0.1:9/v1"},
        "train": {**TINY_SPEC["train"], "args": {**TINY_SPEC["train"]["args"], "max_length": 4096}},
    }
    job = store.create_job(spec, name="oom")
    seed_until_train(worker.settings.artifact_root / job.id, words=1000)  # ~3,000-token pairs
    failed = run_next(store, worker)
    assert failed.status == JobStatus.FAILED
    assert failed.error.startswith("out of memory in stage train"), failed.error
    assert "CHARTER_JOB_MEMORY_MB=3500" in failed.error
    the_worker_carries_on(store, worker)
    fault(error=failed.error[:160], lost=0)
