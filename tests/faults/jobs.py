"""Helpers for the fault tests: a real API + store + worker running real job processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from charter.pipelines.artifacts import Workdir
from charter.service.db import Job

# A tiny job: 2 prompts × 2 samples, one critique/revise round, AI labels, one DPO step.
TINY_SPEC: dict[str, Any] = {
    "name": "fault",
    "policy": {"model": "tiny"},
    "prompts": {"source": "builtin:red-team", "limit": 2},
    "data": {"samples_per_prompt": 2, "revision_rounds": 1, "labels": "ai", "max_new_tokens": 16},
    "judge": {"max_tokens": 16, "max_concurrency": 8},
    "train": {
        "method": "dpo",
        "lora": {"r": 4, "alpha": 8},
        "args": {"max_steps": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-3},
    },
}


def real_job_command(job: Job, spec_path: Path, workdir: Path) -> list[str]:
    """The worker's real job process, without the worker's vLLM pool (URLs come from the spec/env)."""
    return [sys.executable, "-m", "charter.pipelines.run", "--spec", str(spec_path), "--workdir", str(workdir)]


def seed_generate(workdir: Path, n_prompts: int = 2, samples: int = 2) -> list[dict]:
    """Write a finished `generate` stage, as a crashed earlier attempt would have left it."""
    from charter import prompts

    ps = prompts.load("builtin:red-team", n_prompts)
    rows = [
        {"id": f"p{i}-s{k}", "prompt_index": i, "sample": k, "prompt": p, "response": f"answer {k} to prompt {i}"}
        for i, p in enumerate(ps)
        for k in range(samples)
    ]
    Workdir(workdir, workdir.name, {}).finish("generate", "samples", rows, [], {"prompts": n_prompts})
    return rows
