"""The recipe's other RL steps, one round each, through `python -m charter.pipelines.run`'s entry
point against the real tiny vLLM server: dpo trains on the round's labelled pairs (no reward
model), grpo is rewarded by the round's reward model. (ppo, the default, runs through the REST
API in tests/test_recipe_api.py.)"""

import pytest

from tests.pipelines.test_run_methods import run_spec

pytestmark = pytest.mark.integration


def recipe(tiny_server, train, **extra):
    return {
        "name": f"tiny-recipe-{train['method']}",
        "recipe": "constitutional-ai",
        "policy": {"model": "tiny"},
        "judge": {"base_url": tiny_server, "max_tokens": 16, "max_concurrency": 16, "retries": 1},
        "prompts": {"source": "builtin:red-team", "limit": 4},
        "data": {"samples_per_prompt": 2, "max_new_tokens": 8},
        "sft": {"args": {"max_steps": 1, "per_device_train_batch_size": 2}},
        "train": train,
        "evaluate": {"prompts": "builtin:red-team-heldout", "limit": 2, "max_new_tokens": 8},
        **extra,
    }


def done(events):
    return [e["data"]["stage"] for e in events if e["type"] == "stage" and e["data"]["state"] == "done"]


def test_dpo_recipe_trains_on_the_rounds_pairs(tiny_server, tmp_path):
    spec = recipe(tiny_server, {"method": "dpo", "lora": {"r": 4, "alpha": 8}, "args": {"max_steps": 1}})
    result, events = run_spec(tmp_path, "job-recipe-dpo", spec)
    assert done(events)[-5:] == ["sl.sft", "rl.k1.sample", "rl.k1.label", "rl.k1.train", "evaluate"]
    report = result["report"]
    assert report["method"] == "dpo" and report["rounds"] == 1 and "reward" not in report["rl"][0]
    assert report["rl"][0]["train"]["steps"] == 1 and set(report["versus"]) == {"base", "sft"}
    assert "reward_model" not in result["artifacts"] and "merged_model" in result["artifacts"]


def test_grpo_recipe_is_rewarded_by_the_rounds_reward_model(tiny_server, tmp_path):
    train = {
        "method": "grpo",
        "lora": {"r": 4, "alpha": 8},
        "args": {"max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 8},
    }
    spec = recipe(tiny_server, train, reward={"args": {"max_steps": 1}})
    result, events = run_spec(tmp_path, "job-recipe-grpo", spec)
    assert ["rl.k1.sample", "rl.k1.label", "rl.k1.reward", "rl.k1.train", "evaluate"] == done(events)[-5:]
    logged = [e["data"] for e in events if e["type"] == "metrics" and e["data"].get("stage") == "rl.k1.train"]
    assert any("reward/reward_model/mean" in m for m in logged), logged
    assert result["report"]["rl"][0]["reward"]["steps"] == 1
