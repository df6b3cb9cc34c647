"""Each new method from a job spec, end to end through `python -m charter.pipelines.run`'s
entry point, against the real tiny vLLM server: reward (data stages → pairs → held-out
accuracy), ppo naming that reward job by id, kto on the same kind of pairs, and grpo whose
reward is the judge plus a grader (no data stages: online methods sample as they train)."""

import contextlib
import io
import json

import pytest

from charter.pipelines import run
from charter.pipelines.events import PREFIX

pytestmark = pytest.mark.integration


def job(tiny_server, train, **extra):
    return {
        "name": f"tiny-{train['method']}",
        "policy": {"model": "tiny"},
        "judge": {"base_url": tiny_server, "max_tokens": 16, "max_concurrency": 16, "retries": 1},
        "prompts": {"source": "builtin:red-team", "limit": 4},
        "data": {"samples_per_prompt": 2, "revision_rounds": 1, "labels": "ai", "max_new_tokens": 16},
        "train": train,
        **extra,
    }


def run_spec(root, job_id, spec):
    workdir = root / job_id
    workdir.mkdir(parents=True)
    (workdir / "spec.json").write_text(json.dumps(spec))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the job's @@event lines, as the worker would read them
        rc = run.main(["--spec", str(workdir / "spec.json"), "--workdir", str(workdir)])
    out = buf.getvalue()
    assert rc == 0, out[-3000:]
    events = [json.loads(line[len(PREFIX) :]) for line in out.splitlines() if line.startswith(PREFIX)]
    return json.loads((workdir / "result.json").read_text()), events


def stages(events):
    return {e["data"]["stage"] for e in events if e["type"] == "stage" and e["data"]["state"] == "started"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def reward_job(tiny_server, root):
    spec = job(
        tiny_server,
        {"method": "reward", "lora": {"r": 4, "alpha": 8}, "heldout_fraction": 0.25, "args": {"max_steps": 2}},
        evaluate={"prompts": "builtin:red-team-heldout", "limit": 2},
    )
    return run_spec(root, "job-reward", spec)


def test_reward_job_reports_heldout_accuracy(reward_job):
    result, events = reward_job
    assert {"generate", "critique", "revise", "label", "train"} <= stages(events)
    held = result["report"]["train"]["heldout"]
    assert held["pairs"] >= 1 and 0.0 <= held["accuracy"] <= 1.0 and held["mean_margin"] is not None
    assert "adapter" in result["artifacts"] and "evaluate" not in stages(events)


def test_ppo_job_names_the_reward_job_by_id(tiny_server, root, reward_job):
    spec = job(
        tiny_server,
        {
            "method": "ppo",
            "reward_model": "job-reward",
            "lora": {"r": 4, "alpha": 8},
            "args": {"total_episodes": 4, "per_device_train_batch_size": 2, "response_length": 8, "kl_coef": 0.05},
        },
    )
    result, events = run_spec(root, "job-ppo", spec)
    assert "generate" not in stages(events) and "train" in stages(events)
    assert result["report"]["train"]["steps"] == 2
    assert [e for e in events if e["type"] == "metrics" and "kl" in e["data"] and "reward" in e["data"]]


def test_grpo_job_with_judge_and_grader_rewards(tiny_server, root):
    spec = job(
        tiny_server,
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [{"type": "judge", "weight": 1.0}, {"type": "length", "max": 6, "weight": 0.5}],
            "args": {
                "max_steps": 2,
                "num_generations": 2,  # 2 completions x 4 dimensions = 8 judge requests a step
                "per_device_train_batch_size": 2,
                "max_completion_length": 8,
            },
        },
    )
    result, events = run_spec(root, "job-grpo", spec)
    assert "generate" not in stages(events)
    logged = [e["data"] for e in events if e["type"] == "metrics" and "reward" in e["data"]]
    assert len(logged) == 2
    for m in logged:
        assert 0.0 <= m["reward/judge/mean"] <= 1.0 and "reward/length/mean" in m
        assert m["reward"] == pytest.approx(m["reward/judge/mean"] + 0.5 * m["reward/length/mean"], rel=1e-4)
    assert (root / "job-grpo" / "train" / "curve.png").stat().st_size > 1000


def test_kto_job_trains_on_the_pairs(tiny_server, root):
    spec = job(tiny_server, {"method": "kto", "lora": {"r": 4, "alpha": 8}, "args": {"max_steps": 1}})
    result, events = run_spec(root, "job-kto", spec)
    assert "label" in stages(events) and result["report"]["train"]["steps"] == 1


def test_grpo_job_on_a_dataset_with_openai_graders(tiny_server, root, tmp_path, monkeypatch):
    """OpenAI graders in a job: a score_model answered by the real judge server (structured
    outputs hold even the tiny model to a number) and a string_check, both reading each row's
    `answer`; the rows come from the user's dataset, so no data stage runs."""
    monkeypatch.setenv("CHARTER_DATA_ROOTS", str(tmp_path))  # as the worker passes the operator's roots on
    data = tmp_path / "rft.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}], "answer": str(2 * i)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    score = {
        "type": "score_model",
        "model": "tiny",
        "range": [0, 10],
        "input": [{"role": "user", "content": "Reference: {{item.answer}}\nAnswer: {{sample.output_text}}\nScore it."}],
    }
    check = {
        "type": "string_check",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    spec = job(
        tiny_server,
        {
            "method": "grpo",
            "lora": {"r": 4, "alpha": 8},
            "rewards": [
                {"type": "grader", "name": "score", "grader": score, "weight": 0.1},
                {"type": "grader", "name": "check", "grader": check},
            ],
            "args": {
                "max_steps": 2,
                "num_generations": 2,
                "per_device_train_batch_size": 4,
                "max_completion_length": 8,
            },
        },
    )
    del spec["prompts"]
    spec["dataset"] = {"source": str(data)}
    result, events = run_spec(root, "job-graders", spec)
    assert not {"generate", "label"} & stages(events)
    logged = [e["data"] for e in events if e["type"] == "metrics" and "reward" in e["data"]]
    assert len(logged) == 2
    for m in logged:
        assert 0.0 <= m["reward/score/mean"] <= 10.0 and 0.0 <= m["reward/check/mean"] <= 1.0
        assert m["reward"] == pytest.approx(0.1 * m["reward/score/mean"] + m["reward/check/mean"], rel=1e-4)
