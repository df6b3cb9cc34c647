"""One job, start to end, in its own process:

    python -m charter.pipelines.run --spec spec.json --workdir ARTIFACT_ROOT/<job>

generate → critique → revise (N rounds) → label → train → evaluate; a spec with `dataset:`
instead of `prompts:` trains on that dataset and skips the four generation stages; a spec with
`recipe: constitutional-ai` runs SL-CAI and rounds of RL-CAI instead (recipe.py). Each stage writes its
rows and then its manifest; a stage whose manifest exists is skipped, so a job picked up
again after a crash resumes where it stopped. Progress goes out as `@@event` lines (see
events.py); the summary and artifact paths go to `result.json`, read by the worker.
The judge's and policy's URLs come from CHARTER_JUDGE_URL / CHARTER_POLICY_URL (set by
the worker, which owns the local vLLM servers) or from the spec's `judge.base_url`.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from charter import access, dataset, models, prompts
from charter import constitution as constitutions
from charter.errors import CharterError
from charter.pipelines import launch
from charter.pipelines.artifacts import Workdir, write_atomic, write_jsonl
from charter.pipelines.critique import critique
from charter.pipelines.engine import Engine
from charter.pipelines.evaluate import evaluate
from charter.pipelines.events import Reporter
from charter.pipelines.generate import generate
from charter.pipelines.label import label
from charter.pipelines.recipe import run_recipe
from charter.pipelines.revise import revise
from charter.pipelines.revise import sft_rows as revised_sft_rows
from charter.pipelines.train import train
from charter.settings import Settings
from charter.spec import JobSpec
from charter.validation import resolve_files


def run_job(
    spec: JobSpec, workdir: Path, report: Reporter, judge_url: str | None, policy_url: str | None
) -> dict[str, Any]:
    c = constitutions.load(spec.constitution)
    policy_path = models.ensure(spec.policy.model)
    judge_model = spec.judge.served_model_name

    def engine(url: str, model: str | None, name: str) -> Engine:
        return _engine(spec, url, model, name)

    def judge() -> Engine:
        return engine(judge_url, judge_model, "judge")

    wd = Workdir(
        workdir,
        workdir.name,
        {
            "spec": spec.model_dump(mode="json"),
            "constitution": {"name": c.name, "sha256": c.sha256},
            "judge": {
                "url": judge_url,
                "model": spec.judge_model,
                "engine": _engine_version(judge_url) if judge_url else None,
            },
            "policy": {"model": spec.policy.model, "path": policy_path},
        },
    )

    def policy() -> Engine:
        return engine(policy_url, None, "policy")

    def stage(name: str, kind: str, fn: Any, parents: list[str] = ()) -> list[dict]:
        if wd.done(name):
            report.skipped(name)
            return wd.rows(name)
        rows, counts = fn()
        m = wd.finish(name, kind, rows, parents, counts)
        report.done(name.split(".")[0], rows=m["rows"], **{k: v for k, v in counts.items() if k != "rows"})
        return rows

    if spec.recipe:

        def revised() -> tuple[list[dict], str]:
            return _revised_rows(spec, stage, c, judge, policy, report)

        return run_recipe(spec, wd, revised, reward_context(spec, c, judge_url, workdir.parent), policy_path, report)

    method = spec.train.method
    online = method in ONLINE
    label_counts: dict[str, Any] = {}
    pairs: list[dict] = []
    sft_rows: list[dict] = []
    dataset_dir: Path | None = None
    if spec.dataset:  # the user's own data: no generation, critique, revision or labels
        pairs, sft_rows, label_counts = _uploaded_rows(spec, report)
        if not online:
            dataset_dir = _export_dataset(wd, pairs, sft_rows, [])
    elif not online:
        pairs, sft_rows, label_counts, parent = _constitutional_rows(spec, wd, stage, c, judge, policy, report)
        dataset_dir = _export_dataset(wd, pairs, sft_rows, ["label", parent])
    if online:
        # grpo, rloo and ppo sample from the policy as they train: they need prompts, not pairs.
        if spec.dataset:
            train_rows = [r for r in pairs + sft_rows if "prompt" in r]  # other fields are graders' {{item.…}}
        else:
            assert spec.prompts is not None
            train_rows = [{"prompt": p} for p in prompts.load(spec.prompts.source, spec.prompts.limit)]
    else:
        train_rows = sft_rows if method == "sft" else pairs
    if not train_rows:
        raise RuntimeError(
            f"no {'SFT rows' if method == 'sft' else 'preference pairs'} to train on: "
            f"label stage counts {label_counts}; raise prompts.limit or use disagreement: keep"
        )

    # train
    if not wd.done("train"):
        out, seed = wd.stage_dir("train"), spec.data.seed
        validation = dataset.load(Path(spec.dataset.validation))[1] if spec.dataset and spec.dataset.validation else []
        if spec.train.launcher == "accelerate":  # N ranks in child processes; this process orchestrates
            info = launch.train(
                spec, train_rows, policy_path, out, seed, judge_url, workdir.parent, report, validation=validation
            )
        else:
            ctx = reward_context(spec, c, judge_url, workdir.parent)
            info = train(spec.train, train_rows, policy_path, out, seed, report, rewards=ctx, validation=validation)
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
                (policy_path, trained),
                {"base": (policy_path, None)},
                spec.evaluate,
                spec.judge,
                spec.data.seed,
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


def _engine(spec: JobSpec, url: str | None, model: str | None, name: str) -> Engine:
    # A fresh client per stage: each stage runs its own event loop.
    j = spec.judge
    return Engine(url, model, name=name, max_concurrency=j.max_concurrency, timeout_s=j.timeout_s, retries=j.retries)


def reward_context(
    spec: JobSpec, c: constitutions.Constitution, judge_url: str | None, artifact_root: Path | str
) -> dict[str, Any]:
    """What grpo/rloo reward sources need beyond the spec (train.train's `rewards`)."""
    return {
        "constitution": c,
        "judge_engine": lambda: _engine(spec, judge_url, spec.judge.served_model_name, "judge"),
        "judge_retries": spec.judge.retries,
        "artifact_root": Path(artifact_root),
    }


def _constitutional_rows(
    spec: JobSpec,
    wd: Workdir,
    stage: Callable[..., list[dict]],
    c: constitutions.Constitution,
    judge: Callable[[], Engine],
    policy: Callable[[], Engine],
    report: Reporter,
) -> tuple[list[dict], list[dict], dict[str, Any], str]:
    """generate → critique → revise × N → label: (preference pairs, SFT rows, label counts, last stage)."""

    # AI labels need only the policy's samples: the label stage runs beside critique/revise,
    # so the judge server batches its prefill-only requests into their decode steps.
    def label_stage(rows: list[dict], parent: str, reporter: Reporter) -> list[dict]:
        return stage("label", "preferences", lambda: label(judge(), c, rows, spec.data, spec.judge, reporter), [parent])

    beside = ThreadPoolExecutor(1, thread_name_prefix="label")
    labelled = None

    def on_samples(rows: list[dict]) -> None:
        nonlocal labelled
        if spec.data.labels == "ai":
            labelled = beside.submit(label_stage, rows, "generate", report.fork())

    try:
        revised, parent = _revised_rows(spec, stage, c, judge, policy, report, on_samples)
        # label: preference pairs (dpo, reward, kto), and SFT rows from the final revisions (sft)
        pairs = labelled.result() if labelled else label_stage(revised, parent, report)
    finally:
        beside.shutdown(wait=False, cancel_futures=True)
    sft_rows = revised_sft_rows(revised)
    return pairs, sft_rows, wd.manifest("label")["counts"], parent


def _revised_rows(
    spec: JobSpec,
    stage: Callable[..., list[dict]],
    c: constitutions.Constitution,
    judge: Callable[[], Engine],
    policy: Callable[[], Engine],
    report: Reporter,
    on_samples: Callable[[list[dict]], None] = lambda rows: None,
) -> tuple[list[dict], str]:
    """generate → critique → revise × N: (rows with their revisions, last stage); `on_samples`
    hears of the policy's samples as soon as they exist."""
    assert spec.prompts is not None
    ps = prompts.load(spec.prompts.source, spec.prompts.limit)
    rows = stage("generate", "samples", lambda: generate(policy(), ps, spec.data, report))
    on_samples(rows)
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
    return rows, parent


def _uploaded_rows(spec: JobSpec, report: Reporter) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The spec's dataset as (preference pairs, SFT rows, counts); validated at submit, read again here."""
    assert spec.dataset is not None
    kind, rows = dataset.load(Path(spec.dataset.source), spec.dataset.limit)
    report.message(f"training on {len(rows)} {kind} rows from {spec.dataset.source}", stage="dataset")
    counts = {"source": spec.dataset.source, "kind": kind, "rows": len(rows)}
    if kind == "preference":
        counts["pairs"] = len(rows)
    return (rows, [], counts) if kind == "preference" else ([], rows, counts)


ONLINE = ("grpo", "rloo", "ppo")


def _export_dataset(wd: Workdir, pairs: list[dict], sft_rows: list[dict], parents: list[str]) -> Path:
    """The datasets in TRL's conversational columns: `datasets` on disk and JSONL."""
    d = wd.root / "dataset"
    if wd.done("dataset"):
        return d
    import shutil

    from datasets import Dataset

    shutil.rmtree(d, ignore_errors=True)  # what a killed attempt left half-written
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "pairs.jsonl", pairs)
    write_jsonl(d / "sft.jsonl", sft_rows)
    if pairs:
        Dataset.from_list(pairs).save_to_disk(str(d / "preferences"))
    if sft_rows:
        Dataset.from_list(sft_rows).save_to_disk(str(d / "sft"))
    wd.finish("dataset", "dataset", None, parents, {"pairs": len(pairs), "sft_rows": len(sft_rows)})
    return d


def _uploaded(files: Path, file_id: str) -> Path:
    if not (files / file_id).is_file():
        raise CharterError(f"uploaded file {file_id} is gone from {files}; was it deleted after the job was submitted?")
    return files / file_id


def _engine_version(url: str) -> str | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url.split(",")[0].removesuffix("/v1") + "/version", timeout=5) as r:
            return "vllm " + json.loads(r.read())["version"]
    except Exception:
        return None


def _die_with_parent() -> None:
    """End this job (its whole process group) when the worker that started it dies.

    The job runs in its own session, so a worker killed with SIGKILL would leave it running,
    writing into the work directory that the worker taking the job over is writing into too.
    """
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m charter.pipelines.run",
        description="Run one charter job in this process (the worker starts this).",
    )
    ap.add_argument("--spec", required=True, type=Path, help="the job spec, JSON")
    ap.add_argument("--workdir", required=True, type=Path, help="the job's artifact folder")
    ns = ap.parse_args(argv)
    _die_with_parent()
    report = Reporter()
    try:
        spec = JobSpec.model_validate(json.loads(ns.spec.read_text()))
        spec = check_access(spec, ns.workdir.parent)
        # Uploaded files (file-…) live in ARTIFACT_ROOT/files, beside the job folders.
        files = Path(os.environ.get("CHARTER_FILES_DIR") or ns.workdir.parent / "files")
        spec = resolve_files(spec, lambda file_id: _uploaded(files, file_id))
        judge_url = spec.judge.base_url or os.environ.get("CHARTER_JUDGE_URL")
        policy_url = os.environ.get("CHARTER_POLICY_URL") or judge_url
        if not judge_url and spec.needs_servers:
            raise RuntimeError("no judge: set judge.base_url in the spec, or run the job through a charter worker")
        ns.workdir.mkdir(parents=True, exist_ok=True)
        result = run_job(spec, ns.workdir, report, judge_url, policy_url)
        write_atomic(ns.workdir / "result.json", json.dumps(result, indent=2))
        return 0
    except Exception as e:
        traceback.print_exc(file=sys.stdout)
        report.message(explain(e, report.stage, ns.workdir), level="error", stage=report.stage)
        return 1


def check_access(spec: JobSpec, artifact_root: Path) -> JobSpec:
    """The submit-time path checks again, now that the job runs (a symlink may have changed):
    the spec with each local path replaced by where it resolves, which is what the job opens."""
    settings = dataclasses.replace(Settings.from_env(), artifact_root=artifact_root)
    checked, errors = access.check_spec(spec, settings)
    judge = spec.judge.model if spec.judge.base_url is None else None  # a remote judge loads nothing here
    for loc, ref in (("policy.model", spec.policy.model), ("judge.model", judge)):
        try:
            if ref:
                models.resolve(ref, settings)
        except CharterError as e:
            errors.append({"loc": loc.split("."), "msg": str(e)})
    if errors:
        raise access.AccessError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))
    return checked


def explain(e: BaseException, stage: str | None, workdir: Path) -> str:
    """The job's error as the user reads it: a full disk and an out-of-memory say so, and what to do."""
    chain, c = [], e
    while c is not None and len(chain) < 10:
        chain.append(c)
        c = c.__cause__ or c.__context__
    text = f"{type(e).__name__}: {e}"
    every = " ".join(f"{type(c).__name__}: {c}" for c in chain)
    where = f" in stage {stage}" if stage else ""
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in chain) or "No space left on device" in every:
        return (
            f"disk full{where}: no space left under {workdir} (ARTIFACT_ROOT); free space there or point "
            f"ARTIFACT_ROOT at a larger disk, then submit the job again. {text}"
        )
    if any(isinstance(c, MemoryError) for c in chain) or re.search(
        r"can't allocate memory|Cannot allocate memory", every
    ):
        limit = os.environ.get("CHARTER_JOB_MEMORY_MB", "0")
        cap = f"its limit, CHARTER_JOB_MEMORY_MB={limit} MiB on the worker" if limit != "0" else "the machine's memory"
        return (
            f"out of memory{where}: the job process needed more than {cap}; lower the batch size or "
            f"max_length in train.args, or give the job more memory. {text}"
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
