"""Submit-time checks of the train section per method: each mistake is refused naming the field."""

import copy
from pathlib import Path

import pytest
import yaml

from charter import validation
from charter.errors import SpecError
from charter.pipelines import trl_args

DEMO = yaml.safe_load((Path(__file__).parent.parent.parent / "examples" / "demo.yaml").read_text())


def errors_for(train):
    spec = copy.deepcopy(DEMO)
    spec["train"] = train
    with pytest.raises(SpecError) as e:
        validation.validate_job_spec(spec)
    return e.value.errors


def ok(train):
    spec = copy.deepcopy(DEMO)
    spec["train"] = train
    return validation.validate_job_spec(spec).train


@pytest.mark.parametrize(
    "train, loc, needle",
    [
        ({"method": "grpo"}, ["train", "rewards"], "at least one reward source"),
        ({"method": "ppo"}, ["train", "reward_model"], "ppo needs a reward model"),
        ({"method": "ppo", "reward_model": "no-such-job"}, ["train", "reward_model"], "train.method: reward first"),
        ({"method": "dpo", "rewards": [{"type": "judge"}]}, ["train", "rewards"], "grpo and rloo only"),
        (
            {"method": "grpo", "rewards": [{"type": "python", "function": "os:system"}]},
            ["train", "rewards", 0, "function"],
            "CHARTER_REWARD_MODULES",
        ),
        (
            {"method": "grpo", "rewards": [{"type": "reward_model", "model": "/no/such/folder"}]},
            ["train", "rewards", 0, "model"],
            "reward",
        ),
        ({"method": "grpo", "rewards": [{"type": "regex", "pattern": "("}]}, ["train", "rewards", 0], "regular expr"),
        ({"method": "grpo", "rewards": [{"type": "judge", "wieght": 2}]}, ["train", "rewards", 0], "unknown key"),
        (
            {"method": "grpo", "rewards": [{"type": "judge"}], "args": {"num_generations": "many"}},
            ["train", "args", "num_generations"],
            "GRPOConfig rejects",
        ),
        (
            {"method": "grpo", "rewards": [{"type": "judge"}], "args": {"reward_weights": [1.0]}},
            ["train", "args", "reward_weights"],
            "set each source's weight",
        ),
        (  # checked against charter's CPU default batch of 4, which is what would run
            {"method": "grpo", "rewards": [{"type": "judge"}], "args": {"num_generations": 8}},
            ["train", "args", "num_generations"],
            "num_generations",
        ),
        ({"method": "kto", "args": {"beta": "x"}}, ["train", "args", "beta"], "KTOConfig rejects"),
        ({"method": "reward", "args": {"beta": 0.1}}, ["train", "args", "beta"], "RewardConfig has no key"),
        (
            {"method": "rloo", "rewards": [{"type": "judge"}], "args": {"nope": 1}},
            ["train", "args", "nope"],
            "RLOOConfig",
        ),
        (
            {"method": "ppo", "reward_model": "x", "args": {"kl_coeff": 0.1}},
            ["train", "reward_model"],
            "reward",
        ),
        ({"method": "grpo", "rewards": [{"type": "judge"}], "monitors": {"max_kl": -1}}, ["train", "monitors"], ""),
        ({"method": "dpo", "launcher": "accelerate", "num_processes": 0}, ["train", "num_processes"], "greater"),
        ({"method": "dpo", "num_processes": 2}, ["train"], "need launcher: accelerate"),
        ({"method": "dpo", "launcher": "torchrun"}, ["train", "launcher"], "accelerate"),
        (
            {"method": "dpo", "launcher": "accelerate", "accelerate_config": "zero3"},
            ["train", "accelerate_config"],
            "deepspeed-zero3",
        ),
    ],
)
def test_train_mistakes_name_the_field(train, loc, needle):
    errs = errors_for(train)
    assert any(e["loc"][: len(loc)] == loc and needle in e["msg"] for e in errs), errs


def test_good_train_sections_pass():
    t = ok(
        {
            "method": "grpo",
            "lora": {"r": 8},
            "rewards": [{"type": "judge", "weight": 0.7}, {"type": "length", "max": 64, "weight": 0.3}],
            "args": {"num_generations": 4, "beta": 0.04, "max_completion_length": 32},
            "monitors": {"max_kl": 0.5, "max_length_factor": 2.0, "stop": True},
        }
    )
    assert [r.type for r in t.rewards] == ["judge", "length"]
    assert ok({"method": "kto", "args": {"desirable_weight": 1.5}}).method == "kto"
    t = ok({"method": "dpo", "launcher": "accelerate", "num_processes": 2, "accelerate_config": "deepspeed-zero2"})
    assert (t.launcher, t.num_processes, t.accelerate_config) == ("accelerate", 2, "deepspeed-zero2")
    assert ok({"method": "reward", "args": {"center_rewards_coefficient": 0.01}}).method == "reward"


def test_the_two_process_example_passes():
    raw = yaml.safe_load((Path(__file__).parent.parent.parent / "examples" / "grpo-two-processes.yaml").read_text())
    t = validation.validate_job_spec(raw).train
    assert (t.launcher, t.num_processes) == ("accelerate", 2)


def test_ppo_args_are_checked_against_ppoconfig():
    errs = trl_args.check("ppo", {"kl_coeff": 0.1})
    assert errs[0]["loc"] == ["train", "args", "kl_coeff"] and "did you mean kl_coef" in errs[0]["msg"]
    assert trl_args.check("ppo", {"kl_coef": 0.05, "cliprange": 0.2, "vf_coef": 0.1, "num_ppo_epochs": 2}) == []


def test_allowed_python_reward_passes(monkeypatch):
    monkeypatch.setenv("CHARTER_REWARD_MODULES", "tests.pipelines.reward_fns")
    train = {"method": "grpo", "rewards": [{"type": "python", "function": "tests.pipelines.reward_fns:brevity"}]}
    assert trl_args.check_train(train) == []
    train["rewards"][0]["function"] = "tests.pipelines.reward_fns:nope"
    (err,) = trl_args.check_train(train)
    assert err["loc"] == ["train", "rewards", 0, "function"] and "nope" in err["msg"]


def test_no_train_args_turn_on_remote_code_or_pickle_weights(tmp_path):
    from charter.pipelines.train import no_remote_code

    for args in ({"trust_remote_code": True}, {"model_init_kwargs": {"trust_remote_code": True}}):
        errs = errors_for({"method": "dpo", "args": args})
        assert errs[0]["loc"][:3] == ["train", "args", next(iter(args))] and "set by charter" in errs[0]["msg"]
    errs = errors_for({"method": "dpo", "args": {"model_init_kwargs": '{"use_safetensors": false}'}})
    assert errs[0]["loc"] == ["train", "args", "model_init_kwargs", "use_safetensors"]
    # TRL builds a full-tuning reference model itself from model_init_kwargs: held to the same rules.
    cfg = trl_args.build("dpo", {"model_init_kwargs": {"dtype": "float32"}}, str(tmp_path), {"bf16": False})
    no_remote_code(cfg)
    assert cfg.trust_remote_code is False
    assert cfg.model_init_kwargs == {"dtype": "float32", "trust_remote_code": False, "use_safetensors": True}


def test_train_args_checks_are_remembered_per_exact_input(monkeypatch):
    """The validator answers a repeated (method, args) without running TRL's parser again, and
    the answer it keeps cannot be changed by a caller; other args are parsed afresh."""
    calls = []
    real = trl_args._parse
    monkeypatch.setattr(trl_args, "_parse", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(trl_args, "_checked", {})
    bad = {"beta": "high"}
    first = trl_args.check("dpo", bad)
    parsed = len(calls)
    assert parsed >= 1 and first and first[0]["loc"] == ["train", "args", "beta"]
    first[0]["loc"].append("mutated")
    assert trl_args.check("dpo", bad) == [{**first[0], "loc": ["train", "args", "beta"]}]
    assert len(calls) == parsed  # not parsed again
    assert trl_args.check("dpo", {"beta": 0.2}) == [] and len(calls) > parsed
    before = len(calls)
    assert trl_args.check("dpo", bad, cpu=False) and len(calls) > before  # cpu is part of the key
