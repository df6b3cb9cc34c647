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
    [("grpo", True), ("grpo", False), ("rloo", True), ("rloo", False)],
    ids=["grpo-lora", "grpo-full", "rloo-lora", "rloo-full"],
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
    assert all("loss" in m and "loss/policy_avg" not in m for m in logged)  # PPO's policy loss, named `loss`
    stage = [e["data"] for e in events(out) if e["type"] == "stage" and e["data"]["stage"] == "train"]
    assert stage[0]["state"] == "started" and stage[0]["total"] == 2  # its updates, known before it starts
    progress = [d for d in stage if d["state"] == "progress"]
    assert [(d["done"], d["total"], d["unit"]) for d in progress] == [(1, 2, "steps"), (2, 2, "steps")]
    assert all("reward" in d and "loss" in d for d in progress)
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


def test_grpo_grader_reads_each_rows_own_fields(tiny_model, tmp_path):
    """An OpenAI grader's {{item.answer}} is each row's own field: half the rows' answers occur in
    every completion (the empty string), half in none, so every step's mean reward is exactly 0.5.
    (Each prompt's completions then score alike, so no advantage and no update: not tested here.)"""
    rows = [{**r, "answer": "" if i % 2 else "zzqqzz", "n": i} for i, r in enumerate(prompt_rows(4))]
    grader = {
        "type": "string_check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    spec = TrainSpec.model_validate(
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [{"type": "grader", "name": "answer", "grader": grader}],
            # 8 completions, 2 per prompt: every step sees all 4 rows
            "args": {
                "max_steps": 2,
                "per_device_train_batch_size": 8,
                "num_generations": 2,
                "max_completion_length": 8,
            },
        }
    )
    out = io.StringIO()
    train(spec, rows, tiny_model, tmp_path, 0, Reporter(out))
    logged = [m for m in metrics(out) if "reward" in m]
    assert len(logged) == 2 and all(m["reward/answer/mean"] == pytest.approx(0.5) for m in logged)


def test_validation_rows_log_eval_loss_at_the_end(tiny_model, tmp_path):
    from tests.pipelines.test_train import sft_rows

    rows = sft_rows()
    spec = TrainSpec.model_validate({"method": "sft", "lora": {"r": 4, "alpha": 8}, "args": {"max_steps": 3}})
    out = io.StringIO()
    info = train(spec, rows, tiny_model, tmp_path, 0, Reporter(out), validation=rows[:2])
    evals = [m for m in metrics(out) if "eval_loss" in m]
    # eval_steps defaults to 10: the only evaluation is the one after the last step
    assert [m["step"] for m in evals] == [3] and evals[0]["eval_loss"] > 0
    assert info["steps"] == 3
    spec = TrainSpec.model_validate({"method": "sft", "args": {"max_steps": 2, "eval_steps": 1}})
    out = io.StringIO()
    train(spec, rows, tiny_model, tmp_path / "every", 0, Reporter(out), validation=rows[:2])
    assert [m["step"] for m in metrics(out) if "eval_loss" in m] == [1, 2]  # step 2 not evaluated twice
