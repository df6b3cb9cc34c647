"""The same loop as test_integration_api, on the real SmolLM2-135M-Instruct (minutes on a CPU)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from charter.pipelines.servers import free_port

from .test_integration_api import TINY_JOB, run_job, serve, stop

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_smollm2_job_through_rest(smollm2_model, tmp_path):
    spec = copy.deepcopy(TINY_JOB)
    spec.update(
        name="smollm2-sft",
        policy={"model": "smollm2-135m"},
        judge={"model": "smollm2-135m", "max_tokens": 48, "max_concurrency": 16},
    )
    spec["data"].update(max_new_tokens=48, labels="revision")
    spec["train"] = {
        "method": "sft",
        "lora": {"r": 8, "alpha": 16},
        "args": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-4},
    }
    spec["evaluate"]["max_new_tokens"] = 48
    port = free_port()
    proc = serve(tmp_path, port)
    try:
        job, events = run_job(f"http://127.0.0.1:{port}", spec, timeout_s=1500)
    finally:
        stop(proc)
    assert job["status"] == "succeeded", (job["error"], (tmp_path / "serve.log").read_text()[-3000:])
    report = job["report"]
    assert report["sft_rows"] >= 1 and report["train"]["steps"] == 2
    assert report["wins"] + report["losses"] + report["ties"] + report["dropped"] == 4
    sft = [json.loads(x) for x in Path(job["artifacts"]["sft_jsonl"]).read_text().splitlines()]
    assert sft and all(r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"] for r in sft)
    # a real instruct model writes real words: the revisions are not empty noise
    assert sum(len(r["messages"][-1]["content"].split()) for r in sft) / len(sft) >= 3
    tps = [e["data"].get("tokens_per_s") for e in events if e["type"] == "stage" and e["data"].get("tokens_per_s")]
    assert tps and max(tps) > 0
