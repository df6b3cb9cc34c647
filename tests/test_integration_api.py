"""The whole loop through the REST API: `charter serve` in its own process, its embedded
worker starting a real vLLM server for the tiny judge, a real job from submit to report."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from charter.pipelines.servers import free_port

pytestmark = pytest.mark.integration

TINY_JOB = {
    "name": "tiny-dpo",
    "policy": {"model": "tiny"},
    "judge": {"model": "tiny", "max_tokens": 16, "max_concurrency": 8},
    "constitution": "default",
    "prompts": {"source": "builtin:red-team", "limit": 4},
    "data": {"samples_per_prompt": 2, "revision_rounds": 1, "labels": "ai", "max_new_tokens": 16},
    "train": {
        "method": "dpo",
        "lora": {"r": 4, "alpha": 8},
        "args": {"beta": 0.1, "learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 2},
    },
    "evaluate": {"prompts": "builtin:red-team-heldout", "limit": 4, "max_new_tokens": 16},
}
TERMINAL = {"succeeded", "failed", "cancelled"}


def serve(home: Path, port: int, *args: str) -> subprocess.Popen:
    """`charter serve` (plus `args`, e.g. --no-worker) as its own process; returns once healthy."""
    env = {**os.environ, "CHARTER_HOME": str(home), "CHARTER_VLLM_KVCACHE_GIB": "1", "CHARTER_HEARTBEAT_SECONDS": "2"}
    log = open(home / "serve.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "charter.cli", "serve", "--port", str(port), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("charter serve did not come up:\n" + (home / "serve.log").read_text()[-3000:])


def stop(proc: subprocess.Popen) -> None:
    import signal

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def run_job(base: str, spec: dict, timeout_s: float) -> tuple[dict, list[dict]]:
    r = httpx.post(f"{base}/v1/jobs", json=spec, timeout=120)
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    events, after = [], 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        page = httpx.get(f"{base}/v1/jobs/{job_id}/events", params={"after": after}, timeout=10).json()
        events += page["data"]
        after = page["last_id"] or after
        job = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if job["status"] in TERMINAL:
            page = httpx.get(f"{base}/v1/jobs/{job_id}/events", params={"after": after, "limit": 1000}, timeout=10)
            return job, events + page.json()["data"]
        time.sleep(2)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s; last state {job}")


def serving(home: Path):
    """(URL, home) of `charter serve` on a free port for as long as the generator is open: a
    module-scoped fixture's body (`yield from serving(home)`)."""
    port = free_port()
    proc = serve(home, port)
    try:
        yield f"http://127.0.0.1:{port}", home
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("charter-home"))


def test_tiny_job_end_to_end_through_rest(service):
    base, home = service
    job, events = run_job(base, TINY_JOB, timeout_s=900)
    assert job["status"] == "succeeded", (job["error"], (home / "serve.log").read_text()[-3000:])

    started = {e["data"]["stage"] for e in events if e["type"] == "stage" and e["data"]["state"] == "started"}
    assert {"generate", "critique", "revise", "label", "train", "evaluate"} <= started
    assert [e for e in events if e["type"] == "metrics" and "loss" in e["data"]], "training loss became events"
    # AI labels need only the samples: the label stage runs beside critique/revise, not after
    at = {(e["data"]["stage"], e["data"]["state"]): e["id"] for e in events if e["type"] == "stage"}
    assert at[("label", "started")] < at[("revise", "done")]

    report, artifacts = job["report"], job["artifacts"]
    assert report["pairs"] >= 1 and 0.0 <= report["position_agreement"] <= 1.0
    assert report["wins"] + report["losses"] + report["ties"] + report["dropped"] == 4
    lo, hi = report["win_rate_ci95"]
    assert 0.0 <= lo <= report["win_rate"] <= hi <= 1.0
    assert set(report["mean_length"]) == {"trained", "base"}

    pairs = [json.loads(x) for x in Path(artifacts["dataset_jsonl"]).read_text().splitlines()]
    assert len(pairs) == report["pairs"] and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)
    adapter = Path(artifacts["adapter"])
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert Path(artifacts["plot"]).read_bytes()[:4] == b"\x89PNG"
    workdir = adapter.parent.parent
    for stage in ("generate", "critique.r1", "revise.r1", "label", "dataset", "train", "evaluate"):
        m = json.loads((workdir / stage / "manifest.json").read_text())
        assert m["job_id"] == job["id"] and m["constitution"]["sha256"]
        assert m["judge"]["engine"].startswith("vllm ")
    assert json.loads((workdir / "label" / "manifest.json").read_text())["parents"] == ["generate"]

    # The same job's artifacts and events as a client elsewhere gets them: over HTTP.
    listed = {a["name"]: a for a in httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts", timeout=10).json()["data"]}
    assert {"dataset_jsonl", "adapter", "plot", "report", "log"} <= set(listed) and listed["adapter"]["kind"] == "dir"
    r = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts/adapter", timeout=60)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        assert tar.extractfile("adapter/adapter_config.json").read() == (adapter / "adapter_config.json").read_bytes()
    r = httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts/dataset_jsonl", timeout=10)
    assert [json.loads(x) for x in r.text.splitlines()] == pairs
    with httpx.stream(
        "GET", f"{base}/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}, timeout=30
    ) as stream:
        ids = [int(line[4:]) for line in stream.iter_lines() if line.startswith("id: ")]
    assert ids == [e["id"] for e in events]


def test_bad_requests_are_422_and_the_service_keeps_serving(service):
    base, _ = service
    before = httpx.get(f"{base}/v1/jobs", timeout=10).json()["count"]
    bad = [
        ({**TINY_JOB, "polcy": {}}, "polcy"),
        ({**TINY_JOB, "policy": {"model": "no-such-model"}}, "policy"),
        ({**TINY_JOB, "train": {"method": "dpo", "args": {"betta": 0.1}}}, "beta"),
        ({**TINY_JOB, "train": {"method": "dpo", "args": {"beta": "high"}}}, "beta"),
        ({**TINY_JOB, "constitution": "nope"}, "constitution"),
        ({**TINY_JOB, "prompts": {"source": "builtin:nope"}}, "builtin:red-team"),
    ]
    for spec, needle in bad:
        r = httpx.post(f"{base}/v1/jobs", json=spec, timeout=60)
        assert r.status_code == 422, (spec, r.text)
        assert needle in r.text
    r = httpx.post(f"{base}/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 422
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{base}/v1/jobs", timeout=10).json()["count"] == before
