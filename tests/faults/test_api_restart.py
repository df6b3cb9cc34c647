"""The API restarted during a burst of submissions: every submission answered 201 is in the store.

Real `charter serve --no-worker` processes (uvicorn) on one SQLite file; eight clients submit
as fast as they can while the API is stopped with SIGTERM, restarted, killed with SIGKILL
and restarted again. A submission that got no answer, or an error, may or may not be stored;
one that was answered 201 must be, exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from charter.pipelines.servers import free_port

from ..test_integration_api import serve

pytestmark = pytest.mark.integration

SPEC = {"policy": {"model": "tiny"}, "prompts": {"source": "builtin:red-team", "limit": 2}, "train": {"method": "dpo"}}


def start(home: Path, port: int) -> subprocess.Popen:
    return serve(home, port, "--no-worker")


def test_every_acknowledged_submission_survives_api_restarts(tmp_path: Path, fault: Any) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    acked: dict[str, str] = {}  # job id → the name it was submitted with
    outcomes = {"201": 0, "no_answer": 0, "other": 0}
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                name = f"burst-{k}-{n}"
                try:
                    r = http.post(f"{base}/v1/jobs", json={**SPEC, "name": name})
                except httpx.HTTPError:
                    with lock:
                        outcomes["no_answer"] += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    if r.status_code == 201:
                        outcomes["201"] += 1
                        acked[r.json()["id"]] = name
                    else:
                        outcomes["other"] += 1

    proc = start(tmp_path, port)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(8)]
    for t in threads:
        t.start()
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            before = outcomes["201"]
            deadline = time.monotonic() + 60
            while outcomes["201"] < before + 10:  # the burst is being answered
                assert time.monotonic() < deadline, "no submissions were answered"
                time.sleep(0.05)
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            proc = start(tmp_path, port)
        before = outcomes["201"]
        while outcomes["201"] < before + 10:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    try:
        stored = httpx.get(f"{base}/v1/jobs", params={"limit": 1000}, timeout=30).json()["data"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    names = {j["id"]: j["name"] for j in stored}
    lost = [i for i in acked if names.get(i) != acked[i]]
    duplicated = len(stored) - len(set(j["name"] for j in stored))
    fault(acknowledged=len(acked), stored=len(stored), lost=len(lost), duplicated=duplicated, **outcomes)
    assert len(stored) < 1000, "raise the list limit: the check would miss jobs"
    assert len(acked) >= 30
    assert not lost, f"{len(lost)} submissions answered 201 are missing: {lost[:5]}"
    assert duplicated == 0
