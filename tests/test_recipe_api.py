"""`recipe: constitutional-ai` end to end through the REST API on the tiny model: SL-CAI, two
rounds of RL-CAI (ppo, the default: a reward model trained each round), and an evaluation
against the base and against the SFT policy; then the same job picked up again after its
last stages' manifests are gone resumes there, skipping every finished stage."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import httpx
import pytest

from charter.pipelines import run
from charter.pipelines.events import PREFIX
from tests.test_integration_api import run_job, serving

pytestmark = pytest.mark.integration

RECIPE = {
    "name": "tiny-cai-recipe",
    "recipe": "constitutional-ai",
    "rounds": 2,
    "policy": {"model": "tiny"},
    "judge": {"model": "tiny", "max_tokens": 16, "max_concurrency": 8},
    "prompts": {"source": "builtin:red-team", "limit": 4},
    "data": {"samples_per_prompt": 2, "revision_rounds": 1, "max_new_tokens": 8},
    "sft": {"args": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3}},
    "reward": {"args": {"max_steps": 2, "per_device_train_batch_size": 2}},
    "train": {  # no method: the recipe's RL step is ppo
        "lora": {"r": 4, "alpha": 8},
        "args": {"total_episodes": 4, "per_device_train_batch_size": 2, "response_length": 8, "kl_coef": 0.05},
    },
    "evaluate": {"prompts": "builtin:red-team-heldout", "limit": 3, "max_new_tokens": 8},
}
STAGES = [
    "generate",
    "critique.r1",
    "revise.r1",
    "sl.sft",
    *[f"rl.k{k}.{s}" for k in (1, 2) for s in ("sample", "label", "reward", "train")],
    "evaluate",
]


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("charter-home"))


@pytest.fixture(scope="module")
def recipe_job(service):
    base, home = service
    job, events = run_job(base, RECIPE, timeout_s=1500)
    assert job["status"] == "succeeded", (job["error"], (home / "serve.log").read_text()[-3000:])
    return job, events


def finished(events, state="done"):
    return [e["data"]["stage"] for e in events if e["type"] == "stage" and e["data"]["state"] == state]


def test_recipe_runs_sl_then_rl_rounds_then_evaluates_against_base_and_sft(service, recipe_job):
    base, _ = service
    job, events = recipe_job
    # Every step in order; label runs after its round's samples (nothing beside it in a recipe)
    assert [s for s in finished(events) if s in STAGES or s in ("critique", "revise")] == [
        "generate",
        "critique",
        "revise",
        *STAGES[3:],
    ]
    assert "label" not in finished(events) and "train" not in finished(events)
    train_metrics = {e["data"]["stage"] for e in events if e["type"] == "metrics" and "loss" in e["data"]}
    assert {"sl.sft", "rl.k1.reward", "rl.k2.reward"} <= train_metrics
    assert [e for e in events if e["type"] == "metrics" and e["data"]["stage"] == "rl.k2.train" and "kl" in e["data"]]

    report = job["report"]
    assert report["recipe"] == "constitutional-ai" and report["method"] == "ppo" and report["rounds"] == 2
    assert [r["round"] for r in report["rl"]] == [1, 2]
    k1, k2 = report["rl"]
    assert k1["policy"] == job["artifacts"]["sft_model"] and k2["policy"] != k1["policy"]  # newest policy
    for r in report["rl"]:
        assert r["pairs"] >= 1 and r["reward"]["steps"] == 2 and r["train"]["steps"] == 2
    assert report["sft"]["steps"] == 2 and report["sft"]["rows"] >= 1
    versus = report["versus"]
    assert set(versus) == {"base", "sft"}
    for v in versus.values():
        assert v["wins"] + v["losses"] + v["ties"] + v["dropped"] == 3
        assert v["win_rate"] is None or 0.0 <= v["win_rate"] <= 1.0
    assert report["win_rate"] == versus["base"]["win_rate"]
    assert set(report["mean_length"]) == {"trained", "base", "sft"}

    arts = job["artifacts"]
    for name in ("sft_model", "merged_model"):  # merged policies: full model folders in safetensors
        assert (Path(arts[name]) / "model.safetensors").exists() and (Path(arts[name]) / "config.json").exists()
    assert (Path(arts["adapter"]) / "adapter_model.safetensors").exists()
    cfg = json.loads((Path(arts["adapter"]) / "charter_train_config.json").read_text())
    assert cfg["method"] == "ppo" and cfg["base_model"] == k2["policy"]
    rm = json.loads((Path(arts["reward_model"]) / "charter_train_config.json").read_text())
    assert rm["method"] == "reward" and rm["base_model"] == k2["policy"]
    sft_rows = [json.loads(x) for x in Path(arts["sft_jsonl"]).read_text().splitlines()]
    assert len(sft_rows) == report["sft"]["rows"] and sft_rows[0]["messages"][-1]["role"] == "assistant"
    pairs = [json.loads(x) for x in Path(arts["pairs_jsonl"]).read_text().splitlines()]
    assert len(pairs) == k2["pairs"] and all({"prompt", "chosen", "rejected"} <= set(p) for p in pairs)

    workdir = Path(arts["report"]).parent
    for stage in STAGES:
        m = json.loads((workdir / stage / "manifest.json").read_text())
        assert m["job_id"] == job["id"] and m["stage"] == stage
    parents = {s: json.loads((workdir / s / "manifest.json").read_text())["parents"] for s in STAGES}
    assert parents["sl.sft"] == ["revise.r1"] and parents["rl.k1.sample"] == ["sl.sft"]
    assert parents["rl.k2.sample"] == ["rl.k1.train"] and parents["rl.k2.train"] == ["rl.k2.reward"]
    assert parents["evaluate"] == ["rl.k2.train", "sl.sft"]

    listed = {a["name"] for a in httpx.get(f"{base}/v1/jobs/{job['id']}/artifacts", timeout=10).json()["data"]}
    assert {"sft_model", "reward_model", "adapter", "merged_model", "report", "plot"} <= listed


def test_recipe_picked_up_again_skips_its_finished_stages(recipe_job, monkeypatch):
    job, _ = recipe_job
    workdir = Path(job["artifacts"]["report"]).parent
    judge_url = json.loads((workdir / "evaluate" / "manifest.json").read_text())["judge"]["url"]
    # As if killed during round 2's training: its manifest and everything after it are gone.
    (workdir / "rl.k2.train" / "manifest.json").unlink()
    shutil.rmtree(workdir / "evaluate")
    monkeypatch.setenv("CHARTER_JUDGE_URL", judge_url)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the @@event lines, as the worker would read them
        rc = run.main(["--spec", str(workdir / "spec.json"), "--workdir", str(workdir)])
    assert rc == 0, buf.getvalue()[-3000:]
    events = [json.loads(line[len(PREFIX) :]) for line in buf.getvalue().splitlines() if line.startswith(PREFIX)]
    assert finished(events, "skipped") == STAGES[:-2]
    assert finished(events, "done") == ["rl.k2.train", "evaluate"]
    report = json.loads((workdir / "result.json").read_text())["report"]
    assert report["rounds"] == 2 and set(report["versus"]) == {"base", "sft"}
