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


def test_smollm2_reward_model_then_ppo_through_rest(smollm2_model, tmp_path):
    """A `reward` job on SmolLM2 learns clearly separable pairs (held-out accuracy above chance),
    and a `ppo` job names it by id and trains the policy against it."""
    import httpx

    topics = ["bake bread", "fix a bike", "learn French", "plant tomatoes", "save money", "write a CV"]
    topics += ["cook rice", "clean a pan", "tie a tie", "paint a wall", "train a dog", "brew tea"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(
            json.dumps(
                {
                    "prompt": f"How do I {t}?",
                    "chosen": f"Happy to help. To {t}, start small, follow a clear guide step by step, and be patient.",
                    "rejected": "Figure it out yourself, idiot. Stop wasting my time.",
                }
            )
            for t in topics * 2
        )
    )
    questions = tmp_path / "prompts.jsonl"
    questions.write_text("\n".join(json.dumps({"prompt": f"How do I {t}?"}) for t in topics[:8]))
    port = free_port()
    proc = serve(tmp_path, port)
    base = f"http://127.0.0.1:{port}"
    try:
        ids = {
            name: httpx.post(
                f"{base}/v1/files", files={"file": (p.name, p.read_bytes())}, data={"purpose": "fine-tune"}, timeout=60
            ).json()["id"]
            for name, p in (("pairs", pairs), ("prompts", questions))
        }
        reward, _ = run_job(
            base,
            {
                "name": "smollm2-reward",
                "policy": {"model": "smollm2-135m"},
                "dataset": {"source": ids["pairs"]},
                "train": {
                    "method": "reward",
                    "lora": {"r": 8, "alpha": 16},
                    "heldout_fraction": 0.25,
                    "args": {"num_train_epochs": 2, "learning_rate": 3e-4, "per_device_train_batch_size": 6},
                },
            },
            timeout_s=1200,
        )
        assert reward["status"] == "succeeded", (reward["error"], (tmp_path / "serve.log").read_text()[-3000:])
        heldout = reward["report"]["train"]["heldout"]
        assert heldout["pairs"] == 6 and heldout["accuracy"] > 0.5 and heldout["mean_margin"] > 0, heldout

        ppo, events = run_job(
            base,
            {
                "name": "smollm2-ppo",
                "policy": {"model": "smollm2-135m"},
                "dataset": {"source": ids["prompts"]},
                "train": {
                    "method": "ppo",
                    "reward_model": reward["id"],
                    "lora": {"r": 8, "alpha": 16},
                    "args": {
                        "total_episodes": 8,
                        "per_device_train_batch_size": 4,
                        "response_length": 16,
                        "num_ppo_epochs": 1,
                        "kl_coef": 0.05,
                    },
                },
            },
            timeout_s=1500,
        )
    finally:
        stop(proc)
    assert ppo["status"] == "succeeded", (ppo["error"], (tmp_path / "serve.log").read_text()[-3000:])
    logged = [e["data"] for e in events if e["type"] == "metrics" and "reward" in e["data"]]
    assert len(logged) == ppo["report"]["train"]["steps"] == 2
    assert all("kl" in m and "entropy" in m for m in logged)
    assert (Path(ppo["artifacts"]["adapter"]) / "adapter_model.safetensors").exists()
