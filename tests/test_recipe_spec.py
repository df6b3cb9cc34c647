"""`recipe: constitutional-ai` specs: the defaults a user expects, and each mistake refused
at submit with the field named and the fix said."""

import copy
from pathlib import Path

import pytest
import yaml

from charter import validation
from charter.errors import SpecError
from charter.spec import JobSpec, recipe_errors

RECIPE = yaml.safe_load((Path(__file__).parent.parent / "examples" / "recipe.yaml").read_text())


def errors_for(mutate):
    spec = copy.deepcopy(RECIPE)
    mutate(spec)
    with pytest.raises(SpecError) as e:
        validation.validate_job_spec(spec)
    return e.value.errors


def test_example_recipe_is_valid():
    spec = validation.validate_job_spec(copy.deepcopy(RECIPE))
    assert spec.recipe == "constitutional-ai" and spec.rl_rounds == 2 and spec.train.method == "ppo"
    assert spec.sft.args["num_train_epochs"] == 1 and spec.reward.args["learning_rate"] == 1e-4


def test_recipe_rl_step_defaults_to_ppo_and_one_round():
    raw = {k: v for k, v in RECIPE.items() if k not in ("train", "rounds", "sft", "reward")}
    spec = JobSpec.model_validate(raw)
    assert spec.train.method == "ppo" and spec.rl_rounds == 1 and recipe_errors(spec) == []
    assert JobSpec.model_validate({**raw, "train": {"lora": {"r": 4}}}).train.method == "ppo"


def test_train_method_is_still_required_without_recipe():
    raw = {k: v for k, v in RECIPE.items() if k not in ("recipe", "rounds", "sft", "reward")}
    with pytest.raises(SpecError) as e:
        validation.validate_job_spec({**raw, "train": {"lora": {"r": 4}}})
    assert e.value.errors[0]["loc"] == ["train", "method"]


def drop_prompts_add_dataset(s):
    s.pop("prompts")
    s["dataset"] = {"source": "/no/such.jsonl"}


@pytest.mark.parametrize(
    "mutate, loc, needle",
    [
        (lambda s: s.pop("recipe"), ["rounds"], "read by recipe: constitutional-ai only"),
        (lambda s: s.update(recipe="cai"), ["recipe"], "'constitutional-ai'"),
        (lambda s: s.update(rounds=0), ["rounds"], "greater than or equal to 1"),
        (lambda s: s.update(rounds=9), ["rounds"], "less than or equal to 8"),
        (lambda s: s["train"].update(method="sft"), ["train", "method"], "its SFT step is set under sft:"),
        (lambda s: s["train"].update(method="kto"), ["train", "method"], "ppo, dpo, grpo"),
        (lambda s: s["data"].update(labels="revision"), ["data", "labels"], "remove labels: revision"),
        (lambda s: s["train"].update(reward_model="job-x"), ["train", "reward_model"], "trains a reward model"),
        (lambda s: s["train"].update(method="dpo", args={}), ["reward"], "ppo and grpo only"),
        (lambda s: s.pop("evaluate"), ["evaluate"], "builtin:red-team-heldout"),
        (drop_prompts_add_dataset, ["dataset"], "give prompts: instead"),
        (lambda s: s["sft"].update(lora={"r": 4}), ["sft", "lora"], "unknown key"),
        (lambda s: s["sft"]["args"].update(betta=0.1), ["sft", "args", "betta"], "SFTConfig has no key"),
        (lambda s: s["sft"]["args"].update(output_dir="/x"), ["sft", "args", "output_dir"], "set by charter"),
        (lambda s: s["reward"]["args"].update(num_train_epochs="x"), ["reward", "args", "num_train_epochs"], "Reward"),
        (lambda s: s["train"]["args"].update(kl_coeff=0.1), ["train", "args", "kl_coeff"], "did you mean kl_coef"),
    ],
)
def test_bad_recipes_name_the_field(mutate, loc, needle):
    errs = errors_for(mutate)
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] for e in errs), errs


def test_grpo_recipe_needs_no_reward_sources():
    def mutate(s):
        s["train"] = {"method": "grpo", "lora": {"r": 4, "alpha": 8}, "args": {"num_generations": 2}}

    spec = copy.deepcopy(RECIPE)
    mutate(spec)
    assert validation.validate_job_spec(spec).train.rewards == []  # each round's reward model is the reward


def test_recipe_through_the_api_is_stored_resolved_or_refused_with_422(tmp_path):
    from fastapi.testclient import TestClient

    from charter.service.api import build_app
    from tests.service.helpers import make_settings

    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}")
    good = {k: v for k, v in RECIPE.items() if k != "train"}  # the RL step left to its default
    with TestClient(build_app(settings, start_worker=False)) as client:
        r = client.post("/v1/jobs", json=good)
        assert r.status_code == 201, r.text
        stored = r.json()["spec"]
        assert stored["recipe"] == "constitutional-ai" and stored["rounds"] == 2 and stored["train"]["method"] == "ppo"

        r = client.post("/v1/jobs", json={**good, "rounds": 2, "train": {"method": "dpo"}, "evaluate": None})
        assert r.status_code == 422
        errors = {tuple(e["loc"]): e["msg"] for e in r.json()["detail"]}
        assert "ppo and grpo only" in errors[("reward",)] and "add e.g. evaluate" in errors[("evaluate",)]
        assert client.get("/v1/jobs").json()["count"] == 1  # nothing more was queued
