"""Stable metric names and the reward-hacking monitors (KL bound, completion-length drift)."""

import io
import json
from types import SimpleNamespace

import pytest

from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.monitors import MonitorStop, normalize
from charter.pipelines.monitors import callback as _callback
from charter.pipelines.train import train
from charter.spec import MonitorsSpec, TrainSpec


def test_trl_log_keys_become_stable_names():
    grpo = {
        "loss": 0.1,
        "reward": 1.5,
        "reward_std": 0.2,
        "rewards/judge/mean": 0.7,
        "rewards/judge/std": 0.1,
        "kl": 0.01,
        "entropy": 3.2,
        "completions/mean_length": 40.0,
        "clip_ratio/region_mean": 0.05,
        "learning_rate": 1e-5,
        "rewards/chosen": float("nan"),
    }
    m = normalize(grpo)
    assert m["reward/judge/mean"] == 0.7 and m["reward/judge/std"] == 0.1
    assert (m["kl"], m["entropy"], m["completion_length"], m["clip_fraction"]) == (0.01, 3.2, 40.0, 0.05)
    assert "rewards/chosen" not in m and "completions/mean_length" not in m  # NaN dropped, renamed key not repeated
    ppo = {
        "objective/scores": 0.3,
        "objective/kl": 0.2,
        "objective/entropy": 5.0,
        "policy/clipfrac_avg": 0.1,
        "lr": 3e-6,
    }
    m = normalize(ppo)
    assert (m["reward"], m["kl"], m["entropy"], m["clip_fraction"], m["learning_rate"]) == (0.3, 0.2, 5.0, 0.1, 3e-6)
    dpo = {"loss": 0.6, "rewards/margins": 0.1, "rewards/accuracies": 0.5}
    assert normalize(dpo) == dpo  # DPO's implicit-reward stats keep TRL's names


def fire(monitors, logs):
    out, history = io.StringIO(), []
    cb = _callback(Reporter(out), monitors, history)
    state = SimpleNamespace(global_step=0, max_steps=10, epoch=0.0)
    for i, log in enumerate(logs, 1):
        state.global_step = i
        cb.on_log(None, state, None, logs=log)
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines()]
    return [e["data"] for e in events if e["level"] == "warning"]


def test_kl_bound_warns_once():
    warnings = fire(MonitorsSpec(max_kl=0.1), [{"kl": 0.05}, {"kl": 0.2}, {"kl": 0.3}])
    assert len(warnings) == 1 and warnings[0]["monitor"] == "max_kl" and warnings[0]["step"] == 2


def test_length_drift_warns_both_ways():
    up = fire(MonitorsSpec(max_length_factor=2), [{"completions/mean_length": 10}, {"completions/mean_length": 19}])
    assert up == []
    up = fire(MonitorsSpec(max_length_factor=2), [{"completions/mean_length": 10}, {"completions/mean_length": 25}])
    assert up[0]["monitor"] == "max_length_factor" and "25.0" in up[0]["message"]
    down = fire(MonitorsSpec(max_length_factor=2), [{"completions/mean_length": 10}, {"completions/mean_length": 4}])
    assert down[0]["monitor"] == "max_length_factor"


def test_stop_raises():
    with pytest.raises(MonitorStop, match="max_kl"):
        fire(MonitorsSpec(max_kl=0.1, stop=True), [{"kl": 0.5}])


def test_kl_monitor_stops_a_real_grpo_run(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARTER_REWARD_MODULES", "tests.pipelines.reward_fns")
    spec = TrainSpec.model_validate(
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [{"type": "python", "function": "tests.pipelines.reward_fns:brevity"}],
            "monitors": {"max_kl": 1e-12, "stop": True},
            "args": {
                "max_steps": 3,
                "learning_rate": 5e-2,
                "num_generations": 4,
                "per_device_train_batch_size": 4,
                "max_completion_length": 8,
                "beta": 0.1,
            },
        }
    )
    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in ("hi", "yes", "no", "ok")]
    out = io.StringIO()
    with pytest.raises(MonitorStop, match="KL to the reference"):
        train(spec, rows, tiny_model, tmp_path, 0, Reporter(out))
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines() if line.startswith(PREFIX)]
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps and max(steps) < 3  # stopped before max_steps
    assert any(e["level"] == "warning" and e["data"].get("monitor") == "max_kl" for e in events)
