"""A training process killed mid-run resumes from its last complete checkpoint, not from zero."""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
