"""Submit-time validation: each bad spec is refused with the field named and the fix said."""

import copy
from pathlib import Path

import pytest
import yaml

from charter import validation
from charter.errors import SpecError
from tests.conftest import MODELS  # a data root in the tests: CHARTER_MODELS_DIR always is one

DEMO = yaml.safe_load((Path(__file__).parent.parent / "examples" / "demo.yaml").read_text())


def errors_for(mutate):
    spec = copy.deepcopy(DEMO)
    mutate(spec)
    with pytest.raises(SpecError) as e:
        validation.validate_job_spec(spec)
    return e.value.errors


def test_demo_spec_is_valid():
    spec = validation.validate_job_spec(copy.deepcopy(DEMO))
    assert spec.train.method == "dpo" and spec.train.lora.r == 16 and spec.judge_model == "smollm2-135m"


@pytest.mark.parametrize(
    "mutate, loc, needle",
    [
        (lambda s: s.update(colour="red"), ["colour"], "unknown key"),
        (lambda s: s["data"].update(samples_per_prompt=1), ["data"], "samples_per_prompt: 2"),
        (lambda s: s["train"].update(method="telepathy"), ["train", "method"], "'grpo', 'rloo' or 'ppo'"),
        (lambda s: s.pop("policy"), ["policy"], "required"),
        (lambda s: s["policy"].update(model="org/never-downloaded"), ["policy", "model"], "charter models prepare"),
        (lambda s: s.update(constitution="no-such"), ["constitution"], "shipped name"),
        (lambda s: s["prompts"].update(source="builtin:nope"), ["prompts", "source"], "builtin:red-team"),
        (
            lambda s: s["evaluate"].update(prompts=str(MODELS / "no-such.jsonl")),
            ["evaluate", "prompts"],
            "readable JSONL",
        ),
        (lambda s: s["evaluate"].update(prompts="/etc/passwd"), ["evaluate", "prompts"], "outside the data roots"),
        (lambda s: s["judge"].update(base_url="localhost:8000"), ["judge", "base_url"], "http://"),
        (
            lambda s: s["train"].update(monitors={"probe": {"prompts": "builtin:nope"}}),
            ["train", "monitors", "probe", "prompts"],
            "builtin:red-team",
        ),
        (lambda s: s["train"]["args"].update(betta=0.2), ["train", "args", "betta"], "did you mean beta"),
        (lambda s: s["train"]["args"].update(beta="high"), ["train", "args", "beta"], "invalid float value"),
        (lambda s: s["train"]["args"].update(output_dir="/tmp/x"), ["train", "args", "output_dir"], "set by charter"),
        (
            lambda s: s["train"]["args"].update(lr_scheduler_type="zigzag"),
            ["train", "args", "lr_scheduler_type"],
            "choose from",
        ),
    ],
)
def test_bad_specs_name_the_field(mutate, loc, needle):
    errs = errors_for(mutate)
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] for e in errs), errs


def test_sft_keys_are_checked_against_sftconfig():
    def mutate(s):
        s["train"] = {"method": "sft", "args": {"beta": 0.1}}  # a DPOConfig key, not an SFTConfig one

    errs = errors_for(mutate)
    assert errs[0]["loc"] == ["train", "args", "beta"] and "SFTConfig" in errs[0]["msg"]


def test_several_problems_are_reported_together():
    def mutate(s):
        s["policy"]["model"] = "nope"
        s["constitution"] = "nope"

    locs = [e["loc"] for e in errors_for(mutate)]
    assert ["policy", "model"] in locs and ["constitution"] in locs


def test_body_must_be_an_object():
    with pytest.raises(SpecError, match="JSON object"):
        validation.validate_job_spec(["not", "a", "spec"])
