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


def seed_generate(workdir: Path, n_prompts: int = 2, samples: int = 2, words: int = 4) -> list[dict]:
    """Write a finished `generate` stage, as a crashed earlier attempt would have left it."""
    from charter import prompts

    ps = prompts.load("builtin:red-team", n_prompts)
    rows = [
        {
            "id": f"p{i}-s{k}",
            "prompt_index": i,
            "sample": k,
            "prompt": p,
            "response": f"answer {k} to prompt {i} " + "and so on " * words,
        }
        for i, p in enumerate(ps)
        for k in range(samples)
    ]
    Workdir(workdir, workdir.name, {}).finish("generate", "samples", rows, [], {"prompts": n_prompts})
    return rows


def seed_until_train(workdir: Path, n_prompts: int = 4, words: int = 4) -> None:
    """Finished generate, critique, revise and label stages, so the job's next stage is `train`."""
    rows = seed_generate(workdir, n_prompts, words=words)
    wd = Workdir(workdir, workdir.name, {})
    rows = [{**r, "principles": ["harm"], "critiques": [f"critique of {r['id']}"]} for r in rows]
    wd.finish("critique.r1", "critiques", rows, ["generate"], {"rows": len(rows), "unparsed": 0})
    rows = [
        {**r, "revisions": [f"a careful answer to prompt {r['prompt_index']} " + "and so on " * words]} for r in rows
    ]
    wd.finish("revise.r1", "revisions", rows, ["critique.r1"], {"rows": len(rows), "unparsed": 0})
    pairs = [
        {
            "prompt": a["prompt"],
            "chosen": [{"role": "assistant", "content": b["revisions"][-1]}],
            "rejected": [{"role": "assistant", "content": a["response"]}],
            "confidence": 1.0,
            "source_ids": [a["id"], b["id"]],
        }
        for a, b in zip(rows[::2], rows[1::2], strict=True)
    ]
    counts = {"candidates": len(pairs), "pairs": len(pairs), "unparsed": 0, "position_agreement": 1.0}
    wd.finish("label", "preferences", pairs, ["revise.r1"], counts)
