"""charter's job process, killed with SIGKILL halfway through writing a checkpoint.

    python die_in_checkpoint.py MARKER --spec SPEC --workdir WORKDIR

On the second checkpoint save, after the weights are written and before the optimizer state
is, the process kills itself, once: MARKER then holds the half-written folder and its files,
and the next attempt (MARKER exists) runs clean. The rest is the real `charter.pipelines.run`.
"""

import json
import os
import runpy
import signal
import sys
from pathlib import Path

import transformers

marker = Path(sys.argv[1])
original = transformers.Trainer._save_optimizer_and_scheduler
saves = []


def save_optimizer_then_maybe_die(self: transformers.Trainer, output_dir: str) -> None:
    saves.append(output_dir)
    if len(saves) == 2 and not marker.exists():
        files = sorted(p.name for p in Path(output_dir).iterdir())
        marker.write_text(json.dumps({"dir": output_dir, "files": files}))
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, output_dir)


transformers.Trainer._save_optimizer_and_scheduler = save_optimizer_then_maybe_die
sys.argv = ["charter.pipelines.run", *sys.argv[2:]]
runpy.run_module("charter.pipelines.run", run_name="__main__")
