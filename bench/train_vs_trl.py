"""Training overhead against plain TRL: charter's train stage ÷ a plain TRL script, same run.

    .venv/bin/python bench/train_vs_trl.py [--model smollm2-135m] [--rows 32] [--repeats 3]

The same data (the demo's size: 32 rows, one epoch, batch 8, LoRA r16/alpha32/dropout 0.05
on all linear layers, charter's default), the same TRL config keys, float32 on a CPU. Each run is a
fresh Python process, timed from start to exit (imports, model load, training, saving), and
its peak RSS is read from the kernel (wait4). charter's side calls the function a job calls
(`charter.pipelines.train.train`), with its events written to /dev/null; the plain side is
the script a user would write with TRL's own classes. Runs alternate; medians are reported.
Figure of merit: charter ÷ plain wall time (target ≤ 1.05). Writes bench/results/train_vs_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from charter import models

RESULTS = Path(__file__).resolve().parent / "results"

DATA = """
import json, sys
from charter import prompts
ps = prompts.load("builtin:red-team", limit={rows})
def pref(i, p):
    return {{"prompt": p, "chosen": [{{"role": "assistant", "content": "I can't help with that, but here is a safe alternative. " * 2}}],
            "rejected": [{{"role": "assistant", "content": "Sure, here is exactly how to do it, step by step. " * 2}}]}}
def sft(i, p):
    return {{"messages": p + [{{"role": "assistant", "content": "I can't help with that, but here is a safe alternative. " * 2}}]}}
rows = [(pref if "{method}" == "dpo" else sft)(i, p) for i, p in enumerate(ps)]
ARGS = {{"learning_rate": 5e-5, "num_train_epochs": 1, "per_device_train_batch_size": 8, "logging_steps": 1,
         "save_strategy": "no", "disable_tqdm": True, "seed": 0, "report_to": "none", "bf16": False,
         "gradient_checkpointing": False{extra}}}
"""

CHARTER = """
import io, os
from pathlib import Path
from charter.pipelines.events import Reporter
from charter.pipelines.train import train
from charter.spec import TrainSpec
spec = TrainSpec(method="{method}", lora={{"r": 16, "alpha": 32}}, args={{k: v for k, v in ARGS.items() if k not in ("report_to", "save_strategy", "disable_tqdm", "seed", "bf16", "gradient_checkpointing", "logging_steps")}})
info = train(spec, rows, "{model}", Path("{out}"), 0, Reporter(open(os.devnull, "w")))
print(info["steps"])
"""

PLAIN = """
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import {cls}Config as Config, {cls}Trainer as Trainer
tok = AutoTokenizer.from_pretrained("{model}")
tok.pad_token = tok.pad_token or tok.eos_token
model = AutoModelForCausalLM.from_pretrained("{model}", dtype=torch.float32)
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
trainer = Trainer(model=model, args=Config(output_dir="{out}/checkpoints", **ARGS), train_dataset=Dataset.from_list(rows),
                  processing_class=tok, peft_config=lora)
trainer.train()
trainer.save_model("{out}/adapter")
print(trainer.state.global_step)
"""


def run(code: str) -> dict:
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    out, err = p.stdout.read(), p.stderr.read()
    if status != 0:
        raise SystemExit(f"run failed ({status}):\n{err[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "steps": int(out.split()[-1])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", default="dpo,sft")
    ns = ap.parse_args()
    model = str(models.prepare(ns.model))
    RESULTS.mkdir(exist_ok=True)
    result: dict = {"command": " ".join([".venv/bin/python", *sys.argv]), "cpus": os.cpu_count(), "methods": {}}
    for method in ns.methods.split(","):
        extra = ', "beta": 0.1' if method == "dpo" else ""
        cls = "DPO" if method == "dpo" else "SFT"
        runs: dict[str, list[dict]] = {"charter": [], "plain": []}
        for _ in range(ns.repeats):
            for side, body in (("charter", CHARTER), ("plain", PLAIN)):
                with tempfile.TemporaryDirectory() as out:
                    fmt = {"rows": ns.rows, "method": method, "extra": extra, "model": model, "out": out, "cls": cls}
                    runs[side].append(run(DATA.format(**fmt) + body.format(**fmt)))
                print(method, side, runs[side][-1], flush=True)
        med = {s: statistics.median(r["wall_s"] for r in v) for s, v in runs.items()}
        result["methods"][method] = {
            "runs": runs,
            "median_wall_s": med,
            "ratio": round(med["charter"] / med["plain"], 3),
            "peak_rss_mib": {s: max(r["peak_rss_mib"] for r in v) for s, v in runs.items()},
        }
    (RESULTS / "train_vs_trl.json").write_text(json.dumps(result, indent=2))
    print(f"$ {result['command']}")
    print(f"{'method':<8}{'charter s':>11}{'plain s':>9}{'ratio':>7}{'charter RSS MiB':>17}{'plain RSS MiB':>15}")
    for m, r in result["methods"].items():
        print(
            f"{m:<8}{r['median_wall_s']['charter']:>11}{r['median_wall_s']['plain']:>9}{r['ratio']:>7}"
            f"{r['peak_rss_mib']['charter']:>17}{r['peak_rss_mib']['plain']:>15}"
        )
    print("target: ratio ≤ 1.05 (medians of alternating runs)")


if __name__ == "__main__":
    main()
