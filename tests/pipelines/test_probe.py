"""The win-rate probe: the judge compares the training policy with its start, and the
reward-hacking rule (reward up, probe win rate down) fires on that and nothing else."""

import io
import json

import pytest

from charter import constitution
from charter.pipelines.engine import Engine
from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.probe import hacking
from charter.pipelines.train import train
from charter.spec import JobSpec, TrainSpec

START = (0, 0.5)


def test_reward_up_and_win_rate_down_is_flagged():
    why = hacking([START, (2, 0.5), (4, 0.25)], [(1, 0.1), (2, 0.2), (3, 0.6), (4, 0.8)], 0.1)
    assert why and "reward rose from 0.15 to 0.7" in why and "fell from 0.50 to 0.25" in why


def test_the_first_probe_compares_with_the_first_reward_logged():
    assert hacking([START, (3, 0.2)], [(1, 0.1), (2, 0.5), (3, 0.9)], 0.1)
    assert hacking([START, (3, 0.2)], [(1, 0.9), (2, 0.5), (3, 0.1)], 0.1) is None  # reward fell too


@pytest.mark.parametrize(
    "probes,rewards",
    [
        ([START, (2, 0.5), (4, 0.45)], [(1, 0.1), (2, 0.2), (3, 0.6), (4, 0.8)]),  # win rate fell less than min_drop
        ([START, (2, 0.5), (4, 0.2)], [(1, 0.8), (2, 0.8), (3, 0.8), (4, 0.8)]),  # reward flat
        ([START, (2, 0.5), (4, 0.9)], [(1, 0.1), (2, 0.2), (3, 0.6), (4, 0.8)]),  # both rose: learning
        ([START, (2, 0.2)], []),  # no reward logged (sft, dpo)
        ([START], [(1, 0.1)]),
    ],
)
def test_nothing_else_is_flagged(probes, rewards):
    assert hacking(probes, rewards, 0.1) is None


def test_probe_is_validated_with_the_job_spec():
    base = {
        "name": "p",
        "policy": {"model": "tiny"},
        "prompts": {"source": "builtin:red-team"},
        "train": {"method": "grpo", "rewards": [{"type": "length", "max": 10}]},
    }
    spec = JobSpec.model_validate({**base, "train": {**base["train"], "monitors": {"probe": {}}}})
    assert spec.train.monitors.probe.every == 10 and spec.train.monitors.probe.prompts == "builtin:red-team-heldout"
    with pytest.raises(ValueError, match="every"):
        JobSpec.model_validate({**base, "train": {**base["train"], "monitors": {"probe": {"every": 0}}}})
    dataset_only = {**base, "prompts": None, "dataset": {"source": "x.jsonl"}}
    assert not JobSpec.model_validate(dataset_only).needs_servers
    probed = {**dataset_only, "train": {**base["train"], "monitors": {"probe": {"limit": 2}}}}
    assert JobSpec.model_validate(probed).needs_servers  # the probe needs the judge


@pytest.mark.integration
def test_a_real_grpo_run_is_probed_by_the_real_judge(tiny_model, tiny_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARTER_REWARD_MODULES", "tests.pipelines.reward_fns")
    spec = TrainSpec.model_validate(
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [{"type": "python", "function": "tests.pipelines.reward_fns:brevity"}],
            "monitors": {"probe": {"limit": 3, "every": 2, "max_new_tokens": 8}},
            "args": {
                "max_steps": 4,
                "learning_rate": 5e-2,
                "num_generations": 4,
                "per_device_train_batch_size": 4,
                "max_completion_length": 8,
            },
        }
    )
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in ("hi", "yes", "no", "ok")]
    ctx = {
        "constitution": constitution.load("default"),
        "judge_engine": lambda: Engine(tiny_server, max_concurrency=16, retries=1),
        "judge_retries": 1,
    }
    out = io.StringIO()
    info = train(spec, rows, tiny_model, tmp_path, 0, Reporter(out), rewards=ctx)
    assert info["steps"] == 4
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines() if line.startswith(PREFIX)]
    probes = [e["data"] for e in events if e["type"] == "metrics" and "probe_win_rate" in e["data"]]
    assert [p["step"] for p in probes] == [2, 4]
    assert all(0.0 <= p["probe_win_rate"] <= 1.0 and p["probe_judged"] >= 1 for p in probes)
    saved = json.loads((tmp_path / "probe_reference.json").read_text())
    assert len(saved["answers"]) == 3 and [s for s, _ in saved["probes"]] == [0, 2, 4]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["step"] for m in metrics if "probe_win_rate" in m] == [2, 4]  # kept in the artifact and the plot
