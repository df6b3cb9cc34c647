"""The clients people use against one live `charter serve` (a real uvicorn process with its
embedded worker): the official `openai` SDK (supervised and dpo jobs on the tiny model from
uploaded files), charter.Client and the CLI. Dataset-only jobs start no vLLM server."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.test_integration_api import serving

pytestmark = pytest.mark.integration

SFT = [
    {
        "messages": [
            {"role": "user", "content": f"Count to {i}."},
            {"role": "assistant", "content": " ".join(map(str, range(1, i + 1)))},
        ]
    }
    for i in range(1, 9)
]
DPO = [
    {
        "input": {"messages": [{"role": "user", "content": f"Is {i} even?"}]},
        "preferred_output": [{"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}],
        "non_preferred_output": [{"role": "assistant", "content": "no" if i % 2 == 0 else "yes"}],
    }
    for i in range(8)
]
SMALL = {"lora": {"r": 4, "alpha": 8}, "args": {"max_steps": 2, "logging_steps": 1}}
# OpenAI's reinforcement format: messages ending with the user's turn, other fields for graders.
RFT = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)} for i in range(8)]


def jsonl(rows: list[dict]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(r) + "\n" for r in rows).encode())


@pytest.fixture(scope="module")
def service(tiny_model, tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("charter-clients"))


@pytest.fixture
def sdk(service):
    base, home = service
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0), home


def wait(sdk: openai.OpenAI, job_id: str, timeout_s: float = 600):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = sdk.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
    raise AssertionError(f"{job_id} still {job.status} after {timeout_s} s")


def test_supervised_and_dpo_jobs_through_the_openai_sdk(sdk):
    client, home = sdk
    sft_file = client.files.create(file=("sft.jsonl", jsonl(SFT)), purpose="fine-tune")
    dpo_file = client.files.create(file=("dpo.jsonl", jsonl(DPO)), purpose="fine-tune")

    sft = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=sft_file.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2, "n_epochs": 1}}},
        suffix="count",
        extra_body={"charter": SMALL},
    )
    dpo = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=dpo_file.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 2}}},
        extra_body={"charter": SMALL},
    )
    extra = client.fine_tuning.jobs.create(model="tiny", training_file=sft_file.id, extra_body={"charter": SMALL})
    # One worker runs one job at a time, so the third is still queued: cancelled at once.
    assert client.fine_tuning.jobs.cancel(extra.id).status == "cancelled"

    for job in (sft, dpo):
        done = wait(client, job.id)
        log = (home / "artifacts" / job.id / "job.log").read_text()[-3000:]
        assert done.status == "succeeded", (done.error, log)
        assert done.fine_tuned_model.startswith("ft:tiny:charter:") and done.fine_tuned_model.endswith(job.id)
        assert done.trained_tokens and done.trained_tokens > 0
        assert isinstance(done.finished_at, int) and done.finished_at >= done.created_at and done.error is None

        events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # the SDK pages with `after`
        assert len({e.id for e in events}) == len(events) > 5
        metrics = [e for e in events if e.type == "metrics"]
        assert metrics and all(e.message.startswith("Step ") for e in metrics)
        steps = [e.data for e in metrics if "loss" in e.data]
        assert steps and all({"step", "train_loss"} <= set(d) for d in steps)
        ids = [int(e.id.removeprefix("ftevent-")) for e in events]
        assert ids == sorted(ids, reverse=True)  # newest first, as OpenAI's

        ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in ckpts] == [2]
        assert ckpts[0].metrics.train_loss is not None and ckpts[0].fine_tuning_job_id == job.id
        adapter = home / "artifacts" / job.id / "train" / "adapter"
        assert (adapter / "adapter_model.safetensors").exists()

    manifest = json.loads((home / "artifacts" / sft.id / "dataset" / "manifest.json").read_text())
    assert manifest["counts"] == {"pairs": 0, "sft_rows": 8}
    assert not (home / "artifacts" / sft.id / "generate").exists()  # no generation for a dataset job
    assert not list((home / "logs").glob("vllm-*"))  # nor any vLLM server
    listed = [j.id for j in client.fine_tuning.jobs.list(limit=10)]
    assert listed[:3] == [extra.id, dpo.id, sft.id]


def test_reinforcement_and_validation_files_through_the_openai_sdk(sdk):
    """A reinforcement job with a string_check grader trains grpo on the tiny model and logs the
    grader's reward every step; a supervised job with a validation_file reports valid_loss."""
    client, home = sdk
    rft = client.files.create(file=("rft.jsonl", jsonl(RFT[:6])), purpose="fine-tune")
    rft_valid = client.files.create(file=("rft-valid.jsonl", jsonl(RFT[6:])), purpose="fine-tune")
    sft = client.files.create(file=("sft.jsonl", jsonl(SFT[:6])), purpose="fine-tune")
    sft_valid = client.files.create(file=("sft-valid.jsonl", jsonl(SFT[6:])), purpose="fine-tune")
    grader = {
        "type": "string_check",
        "name": "answer",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "ilike",
    }
    rl = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=rft.id,
        validation_file=rft_valid.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {"batch_size": 4}}},
        extra_body={"charter": {**SMALL, "args": {**SMALL["args"], "num_generations": 2, "max_completion_length": 8}}},
    )
    supervised = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=sft.id,
        validation_file=sft_valid.id,
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
        extra_body={"charter": SMALL},
    )
    for job in (rl, supervised):
        done = wait(client, job.id)
        log = (home / "artifacts" / job.id / "job.log").read_text()[-3000:]
        assert done.status == "succeeded", (done.error, log)
        assert done.validation_file == job.validation_file
    assert client.fine_tuning.jobs.retrieve(rl.id).method.reinforcement.grader.operation == "ilike"

    steps = [e.data for e in client.fine_tuning.jobs.list_events(rl.id, limit=100) if e.type == "metrics"]
    per_step = {d["step"]: d for d in steps if "reward/answer/mean" in d}
    assert sorted(per_step) == [1, 2] and all(0 <= d["reward/answer/mean"] <= 1 for d in per_step.values())
    assert any(k.startswith("eval_") for d in steps for k in d)  # the validation prompts were graded too

    steps = [e.data for e in client.fine_tuning.jobs.list_events(supervised.id, limit=100) if e.type == "metrics"]
    valid = [d for d in steps if "valid_loss" in d]
    assert [d["step"] for d in valid] == [2] and valid[0]["valid_loss"] > 0  # evaluated after the last step
    assert any("train_loss" in d for d in steps)
    [ckpt] = client.fine_tuning.jobs.checkpoints.list(supervised.id).data
    assert ckpt.metrics.valid_loss == valid[0]["valid_loss"]


def test_cli_files_upload_and_list(service, tmp_path):
    base, _ = service
    data = tmp_path / "sft.jsonl"
    data.write_bytes(jsonl(SFT).getvalue())

    def cli(*args: str) -> str:
        cmd = [sys.executable, "-m", "charter.cli", *args, "--url", base]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

    out = cli("files", "upload", str(data))
    file_id = out.split()[0]
    assert file_id.startswith("file-") and "sft" in out and "(8 rows)" in out
    assert file_id in cli("files", "list")


def test_quickstart_notebook_runs_top_to_bottom(service, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    base, _ = service
    monkeypatch.setenv("CHARTER_URL", base)  # the kernel inherits this process's environment
    nb = nbformat.read(Path(__file__).parents[1] / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute()
    outputs = {
        i: "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in c.outputs)
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code"
    }
    text = "\n".join(outputs.values())
    assert "succeeded" in text and "'kind': 'sft'" in text and "'steps': 4" in text
    bars = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("name") == "stderr"
    )
    assert "train" in bars and "4/4" in bars  # job.wait()'s progress bar followed the training steps
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
