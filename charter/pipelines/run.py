"""One job, start to end, in its own process:

    python -m charter.pipelines.run --spec spec.json --workdir ARTIFACT_ROOT/<job>

generate → critique → revise (N rounds) → label → train → evaluate. Each stage writes its
rows and then its manifest; a stage whose manifest exists is skipped, so a job picked up
again after a crash resumes where it stopped. Progress goes out as `@@event` lines (see
events.py); the summary and artifact paths go to `result.json`, read by the worker.
The judge's and policy's URLs come from CHARTER_JUDGE_URL / CHARTER_POLICY_URL (set by
the worker, which owns the local vLLM servers) or from the spec's `judge.base_url`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from charter import constitution as constitutions
from charter import models, prompts
from charter.pipelines.artifacts import Workdir, write_atomic, write_jsonl
from charter.pipelines.critique import critique
from charter.pipelines.engine import Engine
from charter.pipelines.evaluate import evaluate
from charter.pipelines.events import Reporter
from charter.pipelines.generate import generate
from charter.pipelines.label import label
from charter.pipelines.revise import revise
from charter.pipelines.train import train
from charter.spec import JobSpec


def run_job(spec: JobSpec, workdir: Path, report: Reporter, judge_url: str, policy_url: str) -> dict[str, Any]:
    c = constitutions.load(spec.constitution)
    policy_path = models.ensure(spec.policy.model)
    judge_model = spec.judge.served_model_name

    def engine(url: str, model: str | None, name: str) -> Engine:
        # A fresh client per stage: each stage runs its own event loop.
        j = spec.judge
        return Engine(
            url, model, name=name, max_concurrency=j.max_concurrency, timeout_s=j.timeout_s, retries=j.retries
        )

    def judge() -> Engine:
        return engine(judge_url, judge_model, "judge")

    wd = Workdir(
        workdir,
        workdir.name,
        {
            "spec": spec.model_dump(mode="json"),
            "constitution": {"name": c.name, "sha256": c.sha256},
            "judge": {"url": judge_url, "model": spec.judge_model, "engine": _engine_version(judge_url)},
            "policy": {"model": spec.policy.model, "path": policy_path},
        },
    )

    def stage(name: str, kind: str, fn: Any, parents: list[str] = ()) -> list[dict]:
        if wd.done(name):
            report.skipped(name)
            return wd.rows(name)
        rows, counts = fn()
        m = wd.finish(name, kind, rows, parents, counts)
        report.done(name.split(".")[0], rows=m["rows"], **{k: v for k, v in counts.items() if k != "rows"})
        return rows

    def data_stages() -> tuple[list[dict], list[dict], Path, dict[str, Any]]:
        """generate → critique → revise × N → label → dataset: (train rows, SFT rows, dataset, label counts)."""

        def policy() -> Engine:
            return engine(policy_url, None, "policy")

        rows = stage("generate", "samples", lambda: generate(policy(), ps, spec.data, report))
        parent = "generate"
        for r in range(1, spec.data.revision_rounds + 1):
            rows = stage(
                f"critique.r{r}",
                "critiques",
                lambda rows=rows, r=r: critique(judge(), c, rows, spec.judge, r, spec.data.seed, report),
                [parent],
            )
            rows = stage(
                f"revise.r{r}",
                "revisions",
                lambda rows=rows, r=r: revise(judge(), c, rows, spec.judge, r, report),
                [f"critique.r{r}"],
            )
            parent = f"revise.r{r}"
        revised = rows
        # label: preference pairs (dpo, reward, kto), and SFT rows from the final revisions (sft)
        pairs = stage(
            "label", "preferences", lambda: label(judge(), c, revised, spec.data, spec.judge, report), [parent]
        )
        sft = [
            {"messages": r["prompt"] + [{"role": "assistant", "content": r["revisions"][-1]}], "source_id": r["id"]}
            for r in revised
            if r["revisions"][-1]
        ]
        d = _export_dataset(wd, pairs, sft, parent)
        return (sft if spec.train.method == "sft" else pairs), sft, d, wd.manifest("label")["counts"]

    ps = prompts.load(spec.prompts.source, spec.prompts.limit)
    method = spec.train.method
    online = method in ONLINE
    label_counts: dict[str, Any] = {}
    sft_rows: list[dict] = []
    dataset_dir: Path | None = None
    if online:
        # grpo, rloo and ppo sample from the policy as they train: they need prompts, not pairs.
        train_rows = [{"prompt": p} for p in ps]
    else:
        train_rows, sft_rows, dataset_dir, label_counts = data_stages()
    if not train_rows:
        raise RuntimeError(
            f"no {'SFT rows' if method == 'sft' else 'preference pairs'} to train on: "
            f"label stage counts {label_counts}; raise prompts.limit or use disagreement: keep"
        )

    # train
    if not wd.done("train"):
        ctx = {
            "constitution": c,
            "judge_engine": judge,
            "judge_retries": spec.judge.retries,
            "artifact_root": workdir.parent,
        }
        info = train(spec.train, train_rows, policy_path, wd.stage_dir("train"), spec.data.seed, report, rewards=ctx)
        wd.finish(
            "train",
            info["kind"],
            None,
            ["prompts" if online else "dataset"],
            {"steps": info["steps"], "rows": info["rows"]},
            {"result": info},
        )
        report.done("train", **{k: v for k, v in info.items() if k in ("steps", "train_loss", "final_loss")})
    else:
        report.skipped("train")
    trained = wd.manifest("train")["result"]

    # evaluate
    report_json: dict[str, Any] = {
        "job": spec.name,
        "method": method,
        "pairs": label_counts.get("pairs"),
        "position_agreement": label_counts.get("position_agreement"),
        "label_counts": label_counts,
        "sft_rows": len(sft_rows),
        "train": {
            k: trained.get(k)
            for k in ("steps", "train_loss", "first_loss", "final_loss", "first_reward", "final_reward", "heldout")
            if k in trained
        },
    }
    if spec.evaluate and method == "reward":
        report.message("evaluate: a reward model is not a policy; its held-out accuracy and margin are in the report")
    elif spec.evaluate:
        ev_prompts = prompts.load(spec.evaluate.prompts, spec.evaluate.limit, ("evaluate", "prompts"))
        if not wd.done("evaluate"):
            ev_rows, summary = evaluate(
                judge(),
                c,
                ev_prompts,
                policy_path,
                trained,
                spec.evaluate,
                spec.judge,
                spec.data.seed,
                wd.stage_dir("evaluate"),
                report,
            )
            wd.finish("evaluate", "evaluation", ev_rows, ["train"], summary)
            report.done("evaluate", **{k: summary[k] for k in ("win_rate", "ties", "dropped")})
        else:
            report.skipped("evaluate")
        report_json.update(wd.manifest("evaluate")["counts"])
    write_atomic(workdir / "report.json", json.dumps(report_json, indent=2))

    artifacts = {
        **(
            {
                "dataset": str(dataset_dir),
                "dataset_jsonl": str(dataset_dir / "pairs.jsonl"),
                "sft_jsonl": str(dataset_dir / "sft.jsonl"),
            }
            if dataset_dir
            else {}
        ),
        trained["kind"]: trained["path"],
        "plot": str(workdir / "train" / "curve.png"),
        "metrics": str(workdir / "train" / "metrics.json"),
        "report": str(workdir / "report.json"),
    }
    for name, path in artifacts.items():
        report.artifact(name, path, kind=name)
    return {"report": report_json, "artifacts": artifacts}


ONLINE = ("grpo", "rloo", "ppo")


def _export_dataset(wd: Workdir, pairs: list[dict], sft_rows: list[dict], parent: str) -> Path:
    """The datasets in TRL's conversational columns: `datasets` on disk and JSONL."""
    d = wd.root / "dataset"
    if wd.done("dataset"):
        return d
    from datasets import Dataset

    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "pairs.jsonl", pairs)
    write_jsonl(d / "sft.jsonl", sft_rows)
    if pairs:
        Dataset.from_list(pairs).save_to_disk(str(d / "preferences"))
    if sft_rows:
        Dataset.from_list(sft_rows).save_to_disk(str(d / "sft"))
    wd.finish("dataset", "dataset", None, ["label", parent], {"pairs": len(pairs), "sft_rows": len(sft_rows)})
    return d


def _engine_version(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url.split(",")[0].removesuffix("/v1") + "/version", timeout=5) as r:
            return "vllm " + json.loads(r.read())["version"]
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m charter.pipelines.run",
        description="Run one charter job in this process (the worker starts this).",
    )
    ap.add_argument("--spec", required=True, type=Path, help="the job spec, JSON")
    ap.add_argument("--workdir", required=True, type=Path, help="the job's artifact folder")
    ns = ap.parse_args(argv)
    report = Reporter()
    try:
        spec = JobSpec.model_validate(json.loads(ns.spec.read_text()))
        judge_url = spec.judge.base_url or os.environ.get("CHARTER_JUDGE_URL")
        policy_url = os.environ.get("CHARTER_POLICY_URL") or judge_url
        if not judge_url:
            raise RuntimeError("no judge: set judge.base_url in the spec, or run the job through a charter worker")
        ns.workdir.mkdir(parents=True, exist_ok=True)
        result = run_job(spec, ns.workdir, report, judge_url, policy_url)
        write_atomic(ns.workdir / "result.json", json.dumps(result, indent=2))
        return 0
    except Exception as e:
        traceback.print_exc(file=sys.stdout)
        report.message(f"{type(e).__name__}: {e}", level="error", stage=report.stage)
        return 1


if __name__ == "__main__":
    sys.exit(main())
