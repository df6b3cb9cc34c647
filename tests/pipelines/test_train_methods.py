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


GRADERS = [
    {"type": "length", "max": 12, "unit": "chars", "weight": 0.5},
    {"type": "python", "function": "tests.pipelines.reward_fns:brevity", "name": "brevity", "weight": 2.0},
    {"type": "contains", "values": ["e"], "weight": 1.0},
]


@pytest.mark.parametrize(
    "method,lora",
    [("grpo", True), ("grpo", False), ("rloo", True)],
    ids=["grpo-lora", "grpo-full", "rloo-lora"],
)
def test_grpo_and_rloo_with_graders(tiny_model, tmp_path, monkeypatch, method, lora):
    monkeypatch.setenv("CHARTER_REWARD_MODULES", "tests.pipelines.reward_fns")
    info, out = run(
        tmp_path,
        prompt_rows(4),
        tiny_model,
        lora,
        method=method,
        rewards=GRADERS,
        args={
            "max_steps": 2,
            "learning_rate": 1e-2,
            "per_device_train_batch_size": 4,
            "num_generations": 4,
            "max_completion_length": 12,
            "beta": 0.1,
        },
    )
    assert info["steps"] == 2
    logged = [m for m in metrics(out) if "reward" in m]
    assert len(logged) == 2
    for m in logged:
        for name in ("length", "brevity", "contains"):
            assert f"reward/{name}/mean" in m and f"reward/{name}/std" in m
        # the total is the weighted sum of the sources (no source left a completion unscored)
        want = 0.5 * m["reward/length/mean"] + 2.0 * m["reward/brevity/mean"] + m["reward/contains/mean"]
        assert m["reward"] == pytest.approx(want, rel=1e-4)
        assert "kl" in m and "completion_length" in m and "learning_rate" in m
    assert (tmp_path / "curve.png").stat().st_size > 1000
    cfg = json.loads((tmp_path / info["kind"] / "charter_train_config.json").read_text())
    assert cfg["trl_config"]["reward_weights"] == [0.5, 2.0, 1.0]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kto_on_unpaired_labels(tiny_model, tmp_path, lora):
    info, out = run(
        tmp_path,
        separable_pairs(4),
        tiny_model,
        lora,
        method="kto",
        args={"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4},
    )
    assert info["rows"] == 4 and info["steps"] == 2
    assert all(m["loss"] > 0 for m in metrics(out) if "loss" in m)


@pytest.fixture(scope="module")
def reward_job(tiny_model, tmp_path_factory):
    """A finished `reward` job folder (full fine-tuning, one step), as PPO and reward_model sources name it."""
    root = tmp_path_factory.mktemp("artifacts")
    job = root / "job-reward"
    spec = TrainSpec.model_validate({"method": "reward", "args": {"max_steps": 1, "per_device_train_batch_size": 4}})
    info = train(spec, separable_pairs(8), tiny_model, job / "train", 0, Reporter(io.StringIO()))
    (job / "train" / "manifest.json").write_text(json.dumps({"result": info}))
    return root, "job-reward"


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_ppo_with_a_reward_job(tiny_model, tmp_path, reward_job, lora):
    root, job_id = reward_job
    spec = TrainSpec.model_validate(
        {
            "method": "ppo",
            "reward_model": job_id,
            "lora": {"r": 4, "alpha": 8} if lora else None,
            "args": {
                "total_episodes": 4,
                "per_device_train_batch_size": 2,
                "response_length": 8,
                "learning_rate": 1e-2,
                "kl_coef": 0.05,
                "cliprange": 0.2,
                "vf_coef": 0.1,
                "num_ppo_epochs": 1,
            },
        }
    )
    out, watch = io.StringIO(), ParamWatch()
    info = train(spec, prompt_rows(4), tiny_model, tmp_path, 0, Reporter(out), [watch], rewards={"artifact_root": root})
    assert watch.before and watch.unchanged == []
    assert info["steps"] == 2
    logged = [m for m in metrics(out) if "reward" in m]
    assert len(logged) == 2 and all("kl" in m and "clip_fraction" in m and "entropy" in m for m in logged)
    assert (tmp_path / info["kind"]).is_dir()


def test_grpo_with_a_reward_model_source(tiny_model, tmp_path, reward_job):
    root, job_id = reward_job
    spec = TrainSpec.model_validate(
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [{"type": "reward_model", "model": job_id, "name": "rm"}],
            "args": {
                "max_steps": 1,
                "num_generations": 4,
                "per_device_train_batch_size": 4,
                "max_completion_length": 8,
            },
        }
    )
    out = io.StringIO()
    train(spec, prompt_rows(4), tiny_model, tmp_path, 0, Reporter(out), rewards={"artifact_root": root})
    (m,) = [m for m in metrics(out) if "reward" in m]
    assert m["reward/rm/std"] > 0  # the reward model told the four completions apart
    assert m["reward"] == pytest.approx(m["reward/rm/mean"], rel=1e-4)
