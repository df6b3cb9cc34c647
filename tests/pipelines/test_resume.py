"""A training process killed mid-run resumes from its last complete checkpoint, not from zero."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.train import last_checkpoint, train
from charter.spec import TrainSpec

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = {
    "method": "sft",
    "lora": {"r": 4, "alpha": 8},
    "args": {"max_steps": 6, "save_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 2},
}
ROWS = [
    {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "An answer."}]}
    for i in range(8)
]

# The child trains and SIGKILLs itself as step 5 begins, after checkpoint-4 was written.
CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from transformers import TrainerCallback
    from charter.pipelines.events import Reporter
    from charter.pipelines.train import train
    from charter.spec import TrainSpec

    class Die(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)

    spec, rows, model, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    train(TrainSpec.model_validate(spec), rows, model, out, 0, Reporter(), [Die()])
    """
)


def test_killed_training_resumes_from_its_last_checkpoint(tiny_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(SPEC), json.dumps(ROWS), tiny_model, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    steps_before = [
        json.loads(line[len(PREFIX) :])["data"].get("step")
        for line in proc.stdout.splitlines()
        if line.startswith(PREFIX) and '"metrics"' in line
    ]
    assert max(steps_before) == 4
    ckpts = tmp_path / "checkpoints"
    assert last_checkpoint(ckpts).name == "checkpoint-4"
    assert not (tmp_path / "adapter").exists()
    # a save cut off half-way never gets a checkpoint name, and is cleared
    (ckpts / ".staging" / "checkpoint-6").mkdir(parents=True)

    out = io.StringIO()
    info = train(TrainSpec.model_validate(SPEC), ROWS, tiny_model, tmp_path, 0, Reporter(out))
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines()]
    assert any(e["type"] == "message" and "resuming from checkpoint-4" in e["data"]["message"] for e in events)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "loss" in e["data"]]
    assert steps == [5, 6]  # continued from step 4, not from zero
    assert info["steps"] == 6
    whole = json.loads((tmp_path / "metrics.json").read_text())  # the earlier steps come back with the checkpoint
    assert [m["step"] for m in whole if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / ".staging" / "checkpoint-6").exists()
    assert last_checkpoint(ckpts).name == "checkpoint-6"
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


PPO_ARGS = {
    "total_episodes": 8,  # 4 updates of 2 prompts: two passes over the 4 prompts
    "per_device_train_batch_size": 2,
    "response_length": 8,
    "learning_rate": 1e-2,
    "num_ppo_epochs": 1,
    "save_steps": 2,
}
PPO_ROWS = [{"prompt": [{"role": "user", "content": f"Tell me about {t}."}]} for t in ("bread", "tea", "maps", "rain")]

# The child runs PPO and SIGKILLs itself at the end of update 3: checkpoint-2 is the last complete one.
PPO_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    from transformers import TrainerCallback
    from charter.pipelines.events import Reporter
    from charter.pipelines.train import train
    from charter.spec import TrainSpec

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    spec, rows, model, out, root = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    train(TrainSpec.model_validate(spec), rows, model, out, 0, Reporter(), [Die()], rewards={"artifact_root": Path(root)})
    """
)


class AtStart(TrainerCallback):
    """What the trainer holds when its (resumed) run begins: trainable tensors, optimizer state, lr."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
        from charter.pipelines.ppo import trainable_state

        self.params = {n: t.clone() for n, t in trainable_state(model).items()}
        self.adam_steps = {int(s["step"]) for s in optimizer.state_dict()["state"].values()}
        self.lr = lr_scheduler.get_last_lr()[0]
        self.step = state.global_step


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_killed_ppo_resumes_weights_optimizer_and_step(tiny_model, tmp_path, lora):
    """TRL's PPO has no resume: charter's checkpoints carry policy and value model, and a resumed
    run starts from checkpoint-2's tensors, Adam moments and learning rate, and runs updates 3-4."""
    from safetensors.torch import load_file

    from charter.pipelines.ppo import STATE

    root = tmp_path / "artifacts"
    rm = TrainSpec.model_validate({"method": "reward", "args": {"max_steps": 1, "per_device_train_batch_size": 4}})
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"Tell me about {t}."}],
            "chosen": [{"role": "assistant", "content": "A kind answer."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        }
        for t in ("bread", "tea", "maps", "rain")
    ]
    info = train(rm, pairs, tiny_model, root / "job-rm" / "train", 0, Reporter(io.StringIO()))
    (root / "job-rm" / "train" / "manifest.json").write_text(json.dumps({"result": info}))
    spec = {"method": "ppo", "reward_model": "job-rm", "lora": {"r": 4, "alpha": 8} if lora else None, "args": PPO_ARGS}

    out_dir = tmp_path / "ppo"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", PPO_CHILD, json.dumps(spec), json.dumps(PPO_ROWS), tiny_model, str(out_dir), str(root)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    before = [
        json.loads(line[len(PREFIX) :])["data"]
        for line in proc.stdout.splitlines()
        if line.startswith(PREFIX) and '"metrics"' in line
    ]
    lr_by_step = {m["step"]: m["learning_rate"] for m in before if "learning_rate" in m}
    assert sorted(lr_by_step) == [1, 2, 3]
    ckpt = last_checkpoint(out_dir / "checkpoints")
    assert ckpt.name == "checkpoint-2" and (ckpt / STATE).exists()
    saved = load_file(str(ckpt / STATE))
    assert any(n.startswith("value_model.") for n in saved) and any(n.startswith("policy.") for n in saved)

    out, start = io.StringIO(), AtStart()
    info = train(
        TrainSpec.model_validate(spec),
        PPO_ROWS,
        tiny_model,
        out_dir,
        0,
        Reporter(out),
        [start],
        rewards={"artifact_root": root},
    )
    events = [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines()]
    assert any(e["type"] == "message" and "resuming from checkpoint-2" in e["data"]["message"] for e in events)
    assert start.step == 2
    assert set(start.params) == set(saved) and all(torch.equal(start.params[n], saved[n]) for n in saved)
    assert start.adam_steps == {2}  # Adam's moments after two updates, not a fresh optimizer
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "reward" in e["data"]]
    assert steps == [3, 4]
    resumed_lr = next(e["data"]["learning_rate"] for e in events if e["type"] == "metrics" and e["data"]["step"] == 3)
    assert resumed_lr == pytest.approx(lr_by_step[3])  # the schedule went on from step 2
    assert info["steps"] == 4
    whole = json.loads((out_dir / "metrics.json").read_text())
    assert [m["step"] for m in whole if "reward" in m] == [1, 2, 3, 4]
    assert last_checkpoint(out_dir / "checkpoints").name == "checkpoint-4"
    assert (out_dir / info["kind"]).is_dir()
