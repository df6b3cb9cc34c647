"""Stage `train` on several processes: `train: {launcher: accelerate, num_processes: N}`.

The job process stays the orchestrator. It writes the rows and a request to `train/launch/`,
starts `accelerate launch … -m charter.pipelines.launch --request train/launch/request.json`
in the job's process group, forwards the `@@event` lines of rank 0 (the other ranks report
nothing) and reads back the result rank 0 writes. Each rank writes `rank-<i>.json` (the steps
it took) when it ends, or `rank-<i>.error` when it fails; a failed rank fails the stage with
its own message, since torchrun ends the other ranks rather than leaving them waiting.

On CPUs the ranks talk gloo (`accelerate_configs/cpu.yaml` + ACCELERATE_USE_CPU); on GPUs
one rank per GPU with `accelerate_configs/<train.accelerate_config>.yaml` (ddp by default).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from charter.pipelines.artifacts import read_jsonl, write_atomic, write_jsonl
from charter.pipelines.events import PREFIX, Reporter
from charter.spec import JobSpec, TrainSpec

CONFIGS = Path(__file__).parent / "accelerate_configs"
PR_SET_PDEATHSIG = 1


def config_file(spec: TrainSpec, gpus: int) -> Path:
    """The accelerate config for this machine, or a RuntimeError saying what to change."""
    name = spec.accelerate_config
    if gpus == 0:
        if name:
            raise RuntimeError(
                f"train.accelerate_config: {name} needs GPUs and this worker has none; leave accelerate_config "
                "unset to train on CPU processes (gloo), or give the job resources.labels: [gpu]"
            )
        return CONFIGS / "cpu.yaml"
    if spec.num_processes > gpus:
        raise RuntimeError(
            f"train.num_processes is {spec.num_processes} but this worker has {gpus} GPU(s); one rank needs one GPU"
        )
    if name and name.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError(
            f"train.accelerate_config: {name} needs the deepspeed package on the worker, which is not installed: "
            "pip install 'charter[deepspeed]' there, or use accelerate_config: ddp or fsdp"
        )
    return CONFIGS / f"{name or 'ddp'}.yaml"


def command(spec: TrainSpec, config: Path, request: Path, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        str(spec.num_processes),
        "--main_process_port",
        str(port),  # two jobs on one worker must not meet at accelerate's default 29500
        "-m",
        "charter.pipelines.launch",
        "--request",
        str(request),
    ]


def train(
    job: JobSpec,
    rows: list[dict],
    model_path: str,
    out_dir: Path,
    seed: int,
    judge_url: str | None,
    artifact_root: Path,
    report: Reporter,
    validation: list[dict] = (),
) -> dict[str, Any]:
    """Run `train.train` on `job.train.num_processes` ranks; rank 0's result, with every rank's steps."""
    import torch

    from charter.pipelines.servers import free_port

    d = out_dir / "launch"
    d.mkdir(parents=True, exist_ok=True)
    for old in [*d.glob("rank-*"), d / "result.json"]:  # what a killed attempt left
        old.unlink(missing_ok=True)
    write_jsonl(d / "rows.jsonl", rows)
    write_jsonl(d / "validation.jsonl", list(validation))
    request = {
        "job": job.model_dump(mode="json"),
        "model_path": model_path,
        "out_dir": str(out_dir),
        "seed": seed,
        "judge_url": judge_url,
        "artifact_root": str(artifact_root),
    }
    write_atomic(d / "request.json", json.dumps(request, indent=2))
    gpus = torch.cuda.device_count()
    config = config_file(job.train, gpus)
    cmd = command(job.train, config, d / "request.json", free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if gpus == 0:
        env["ACCELERATE_USE_CPU"] = "true"
    report.message(f"train: {job.train.num_processes} processes under accelerate ({config.name})", stage="train")
    # The launcher stays in the job's process group, so a cancel's killpg reaches it; torchrun gives
    # each rank a session of its own, so a rank ends itself when the launcher dies (see main).
    # Only rank 0 writes stdout (events); stderr has its own pipe, so no progress bar's carriage
    # return lands in front of an event line.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        preexec_fn=_pdeathsig(signal.SIGKILL),  # the launcher ends if the job process does
    )
    assert proc.stdout is not None and proc.stderr is not None
    tail: collections.deque[str] = collections.deque(maxlen=20)
    err = threading.Thread(target=_copy, args=(proc.stderr, sys.stderr, tail), daemon=True)
    err.start()
    for line in proc.stdout:
        at = line.find(PREFIX)
        if at != 0:
            sys.stdout.write(line if at < 0 else line[:at] + "\n")
            if at < 0:
                continue
        event = json.loads(line[at + len(PREFIX) :])
        if event["type"] == "stage" and event["data"].get("state") == "started":
            report.stage = event["data"]["stage"]
        report.emit(event["type"], event["data"], event["level"])
    code = proc.wait()
    err.join(timeout=5)
    if code != 0:
        raise RuntimeError(_failure(d, code, list(tail)))
    info = json.loads((d / "result.json").read_text())
    info["ranks"] = [json.loads((d / f"rank-{i}.json").read_text()) for i in range(job.train.num_processes)]
    return info


def _copy(src: Any, dst: Any, tail: collections.deque[str]) -> None:
    for line in src:
        dst.write(line)
        tail.append(line.rstrip())
    dst.flush()


def _failure(d: Path, code: int, tail: list[str]) -> str:
    """The first rank's error (the others usually fail only because it left), else the launcher's output."""
    errors = sorted(d.glob("rank-*.error"), key=lambda p: p.stat().st_mtime)
    if errors:
        return f"train {errors[0].stem.replace('-', ' ')} failed: {errors[0].read_text()}"
    return f"accelerate launch exited with {code}: " + " | ".join(tail[-5:])


def _pdeathsig(sig: int) -> Any:
    def set_pdeathsig() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)

    return set_pdeathsig


def main(argv: list[str] | None = None) -> int:
    """One rank: rebuild what train() needs from the request, train, and record this rank's steps."""
    ap = argparse.ArgumentParser(prog="accelerate launch -m charter.pipelines.launch")
    ap.add_argument("--request", required=True, type=Path)
    ns = ap.parse_args(argv)
    from charter.pipelines import run

    run._die_with_parent()  # the launcher: if it dies, this rank (its own session) ends itself
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        os.dup2(2, 1)  # stdout carries rank 0's events only
    d = ns.request.parent
    try:
        from transformers import TrainerCallback

        from charter import constitution as constitutions
        from charter.pipelines.train import train as train_one

        req = json.loads(ns.request.read_text())
        job = JobSpec.model_validate(req["job"])
        rows = read_jsonl(d / "rows.jsonl")
        steps: list[int] = []

        class RankSteps(TrainerCallback):
            """What this rank did: one entry per optimizer step it took part in."""

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                steps.append(state.global_step)

        # Only rank 0 reports: the job has one progress bar and one metrics series.
        report = Reporter() if rank == 0 else Reporter(open(os.devnull, "w"))  # noqa: SIM115
        ctx = run.reward_context(job, constitutions.load(job.constitution), req["judge_url"], req["artifact_root"])
        info = train_one(
            job.train,
            rows,
            req["model_path"],
            Path(req["out_dir"]),
            req["seed"],
            report,
            [RankSteps()],
            rewards=ctx,
            validation=read_jsonl(d / "validation.jsonl") if (d / "validation.jsonl").exists() else [],
        )
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        write_atomic(
            d / f"rank-{rank}.json",
            json.dumps({"rank": rank, "world_size": world, "steps": len(steps), "global_step": info["steps"]}),
        )
        if rank == 0:
            write_atomic(d / "result.json", json.dumps(info, indent=2))
        return 0
    except Exception as e:
        import traceback

        traceback.print_exc()
        write_atomic(d / f"rank-{rank}.error", run.explain(e, "train", d))
        return 1


if __name__ == "__main__":
    sys.exit(main())
