"""Real TRL on the tiny model for the methods beyond SFT/DPO: reward, kto, grpo/rloo, ppo.

Each run is a few steps on a handful of rows; each shows that every trainable tensor moved and
that the method's own signal (held-out accuracy, per-source rewards, KL) reached the events.
"""

import io
import json

import pytest

from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.train import pair_scores, split_heldout, train
from charter.spec import TrainSpec
from tests.pipelines.test_train import ParamWatch

KIND = "A kind, careful answer."
RUDE = "Go away, idiot."
TOPICS = [
    "a secret",
    "bread",
    "sums",
    "rudeness",
    "the sea",
    "trains",
    "maps",
    "tea",
    "birds",
    "rain",
    "snow",
    "clocks",
]


def separable_pairs(n=12):
    return [
        {
            "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
            "chosen": [{"role": "assistant", "content": KIND}],
            "rejected": [{"role": "assistant", "content": RUDE}],
        }
        for t in TOPICS[:n]
    ]


def prompt_rows(n=4):
    return [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}]} for t in TOPICS[:n]]


def events(out):
    return [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines() if line.startswith(PREFIX)]


def metrics(out):
    return [e["data"] for e in events(out) if e["type"] == "metrics"]


class MarginAtStart(ParamWatch):
    """Also scores the held-out pairs with the untrained reward model, to compare with the end."""

    def __init__(self, heldout):
        self.heldout = heldout

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
        super().on_train_begin(args, state, control, model=model, **kw)
        scores = pair_scores(model, processing_class, self.heldout)
        self.margin = sum(c - r for c, r in scores) / len(scores)


def run(tmp_path, rows, tiny_model, lora, watch=None, **spec):
    spec = TrainSpec.model_validate({"lora": {"r": 4, "alpha": 8} if lora else None, **spec})
    out, watch = io.StringIO(), watch or ParamWatch()
    info = train(spec, rows, tiny_model, tmp_path, 0, Reporter(out), [watch], rewards={"artifact_root": tmp_path})
    assert watch.before, "nothing was trainable"
    assert watch.unchanged == []
    return info, out


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reward_model_ranks_heldout_pairs(tiny_model, tmp_path, lora):
    start = MarginAtStart(split_heldout(separable_pairs(), 0.25, 0)[1])
    info, out = run(
        tmp_path,
        separable_pairs(),
        tiny_model,
        lora,
        start,
        method="reward",
        heldout_fraction=0.25,
        args={"max_steps": 3, "learning_rate": 5e-3 if lora else 1e-3, "per_device_train_batch_size": 3},
    )
    held = info["heldout"]
    assert held["pairs"] == 3
    assert held["accuracy"] > 0.5 and held["mean_margin"] > 0
    assert held["mean_margin"] > start.margin  # training moved the held-out pairs apart, not the random head
    assert any("heldout_accuracy" in m for m in metrics(out))
    assert json.loads((tmp_path / info["kind"] / "charter_train_config.json").read_text())["method"] == "reward"
    if lora:
        cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert cfg["task_type"] == "SEQ_CLS"
