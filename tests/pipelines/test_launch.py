"""`train.launcher: accelerate`: real TRL on 2 CPU processes (gloo) under `accelerate launch`.

Each run shows that both ranks stepped, that the data was split between them (half the steps
one process would take), that rank 0 alone reported and saved, and that every checkpoint got
its final name with both ranks' parts inside.
"""

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from charter.pipelines import launch, run
from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.train import atomic_checkpoints
from charter.spec import DatasetSpec, JobSpec
from tests.pipelines.test_train_methods import prompt_rows, separable_pairs

ROOT = Path(__file__).resolve().parent.parent.parent


def job(tiny_model, **train):
    return JobSpec.model_validate(
        {
            "name": "two-ranks",
            "policy": {"model": tiny_model},
            "dataset": {"source": "pairs.jsonl"},  # not read: the rows are passed in
            "train": {"launcher": "accelerate", "num_processes": 2, "lora": {"r": 4, "alpha": 8}, **train},
        }
    )


def events(out):
    return [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines() if line.startswith(PREFIX)]


def train_on_two(tmp_path, spec, rows):
    out = io.StringIO()
    info = launch.train(spec, rows, spec.policy.model, tmp_path / "job" / "train", 0, None, tmp_path, Reporter(out))
    return info, events(out), tmp_path / "job" / "train"


def assert_one_model_saved(out_dir):
    assert (out_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out_dir / "model").exists()
    saved = [p.parent for p in out_dir.rglob("adapter_model.safetensors") if "checkpoints" not in p.parts]
    assert saved == [out_dir / "adapter"]


def test_dpo_job_on_two_cpu_processes(tiny_model, tmp_path):
    """The whole job path: run_job's train stage orchestrates the ranks and records their result."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in separable_pairs(8)))
    spec = job(
        tiny_model,
        method="dpo",
        args={"num_train_epochs": 1, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "save_steps": 1},
    ).model_copy(update={"dataset": DatasetSpec(source=str(data))})
    out = io.StringIO()
    run.run_job(spec, tmp_path / "job", Reporter(out), None, None)
    out_dir, evs = tmp_path / "job" / "train", events(out)
    info = json.loads((out_dir / "manifest.json").read_text())["result"]
    # 8 pairs, 2 per rank per step, 2 ranks: one epoch is 2 steps (one process would take 4)
    assert info["steps"] == 2
    assert info["ranks"] == [{"rank": r, "world_size": 2, "steps": 2, "global_step": 2} for r in (0, 1)]
    # rank 0 alone reports: one metrics event per step, one start of the train stage
    assert [e["data"]["step"] for e in evs if e["type"] == "metrics" and "loss" in e["data"]] == [1, 2]
    started = [e["data"]["stage"] for e in evs if e["type"] == "stage" and e["data"]["state"] == "started"]
    assert started.count("train") == 1
    assert_one_model_saved(out_dir)
    ckpts = out_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name != ".staging") == ["checkpoint-1", "checkpoint-2"]
    assert not list((ckpts / ".staging").glob("checkpoint-*"))  # nothing left under a temporary name
    for c in ("checkpoint-1", "checkpoint-2"):  # each rank's part is inside the renamed folder
        assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= {p.name for p in (ckpts / c).iterdir()}
    assert json.loads((out_dir / "metrics.json").read_text())[-1]["step"] == 2
    assert json.loads((tmp_path / "job" / "report.json").read_text())["train"]["steps"] == 2


def test_grpo_on_two_cpu_processes(tiny_model, tmp_path):
    spec = job(
        tiny_model,
        method="grpo",
        rewards=[{"type": "length", "max": 12, "unit": "chars"}, {"type": "contains", "values": ["e"]}],
        args={
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "num_generations": 4,
            "max_completion_length": 12,
            "learning_rate": 1e-2,
        },
    )
    info, evs, out_dir = train_on_two(tmp_path, spec, prompt_rows(4))
    assert info["steps"] == 2
    assert [r["steps"] for r in info["ranks"]] == [2, 2] and {r["world_size"] for r in info["ranks"]} == {2}
    logged = [e["data"] for e in evs if e["type"] == "metrics" and "reward" in e["data"]]
    assert [m["step"] for m in logged] == [1, 2]
    assert all("reward/length/mean" in m and "reward/contains/mean" in m for m in logged)
    assert_one_model_saved(out_dir)
    assert "first_reward" in info


def test_a_failing_rank_fails_the_stage_with_its_message(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("CHARTER_REWARD_MODULES", "tests.pipelines.reward_fns")
    spec = job(
        tiny_model,
        method="grpo",
        rewards=[{"type": "python", "function": "tests.pipelines.reward_fns:fails_on_rank_1"}],
        args={"max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 4, "max_completion_length": 8},
    )
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"train rank 1 failed: ValueError: rank 1 refuses to score"):
        train_on_two(tmp_path, spec, prompt_rows(4))
    assert time.monotonic() - start < 120  # rank 0, left waiting at a collective, was ended, not left to hang


# The job process: its own session, like a worker's job; it trains for long enough to be killed.
JOB = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from charter.pipelines import launch
    from charter.pipelines.events import Reporter
    from charter.spec import JobSpec
    from tests.pipelines.test_train_methods import separable_pairs

    spec, tmp = JobSpec.model_validate(json.loads(sys.argv[1])), Path(sys.argv[2])
    launch.train(spec, separable_pairs(12), spec.policy.model, tmp / "job" / "train", 0, None, tmp, Reporter())
    """
)


def _ranks(request: Path) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = b"charter.pipelines.launch" in cmd and b"accelerate.commands.launch" not in cmd  # not the launcher
        if p.name.isdigit() and rank and str(request).encode() in cmd:
            pids.append(int(p.name))
    return pids


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_ranks_die_with_the_job(tiny_model, tmp_path):
    """torchrun gives each rank a session of its own, out of reach of the job's killpg: each rank
    must notice its launcher is gone and end itself."""
    spec = job(tiny_model, method="dpo", args={"max_steps": 1000, "per_device_train_batch_size": 2})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB, spec.model_dump_json(), str(tmp_path)],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = []
        for line in proc.stdout:  # wait until rank 0 has stepped
            seen.append(line)
            if line.startswith(PREFIX) and '"metrics"' in line:
                break
        else:
            pytest.fail("the job ended before a step: " + "".join(seen[-20:]))
        ranks = _ranks(tmp_path / "job" / "train" / "launch" / "request.json")
        assert len(ranks) == 2
        assert all(os.getsid(p) != proc.pid for p in ranks)  # the job's killpg cannot reach them
        os.killpg(proc.pid, signal.SIGKILL)  # what a cancel, or the job guard, does to the job's group
        proc.wait(10)
        deadline = time.monotonic() + 10
        while (alive := [p for p in ranks if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


class FakeAccelerator:
    def __init__(self, main, log):
        self.is_main_process, self.log = main, log

    def wait_for_everyone(self):
        self.log.append("barrier")


def fake_trainer(tmp_path, main, log):
    """A trainer whose save writes its rank's part into the staged checkpoint."""
    t = SimpleNamespace(args=SimpleNamespace(output_dir=str(tmp_path), save_total_limit=None))
    t.accelerator = FakeAccelerator(main, log)

    def save(model, trial):
        d = Path(t.args.output_dir) / "checkpoint-3"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"part-{int(not main)}").write_text("x")
        log.append("saved")

    t._save_checkpoint = save
    return t


@pytest.mark.parametrize("main", [True, False], ids=["rank0", "rank1"])
def test_only_rank_0_renames_a_checkpoint_between_barriers(tmp_path, main):
    log: list[str] = []
    t = fake_trainer(tmp_path, main, log)
    atomic_checkpoints(t, tmp_path)
    t._save_checkpoint(None, None)
    assert log == ["barrier", "saved", "barrier", "barrier"]  # start, then both sides of the rename
    assert (tmp_path / "checkpoint-3").exists() == main
    assert (tmp_path / ".staging" / "checkpoint-3").exists() != main  # rank 1 leaves it to rank 0


CONFIGS = sorted((ROOT / "charter" / "pipelines" / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_accelerate_configs_are_valid(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    cfg = load_config_from_file(str(path))  # accelerate's own loader: unknown keys are refused
    assert isinstance(cfg, ClusterConfig)
    parser = launch_command_parser()
    known = vars(parser.parse_args(["x.py"]))
    for section in ("deepspeed_config", "fsdp_config"):  # launch copies these keys onto its options unchecked
        for key in yaml.safe_load(path.read_text()).get(section, {}):
            assert key in known, f"{path.name}: {section}.{key} is not an accelerate launch option"
    args, _, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(path), "--num_processes", "4", "x.py"])
    )
    assert args.num_processes == 4  # the job's num_processes wins over the file's
    kind = {"deepspeed-zero2": "use_deepspeed", "deepspeed-zero3": "use_deepspeed", "fsdp": "use_fsdp"}
    assert getattr(args, kind.get(path.stem, "multi_gpu"))
    if path.stem.startswith("deepspeed"):
        assert args.zero_stage == int(path.stem[-1])


def test_config_choice_says_what_to_change(tiny_model, monkeypatch):
    def spec(**train):
        return job(tiny_model, method="dpo", **train).train

    assert launch.config_file(spec(), gpus=0).name == "cpu.yaml"
    assert launch.config_file(spec(), gpus=2).name == "ddp.yaml"
    assert launch.config_file(spec(accelerate_config="fsdp"), gpus=2).name == "fsdp.yaml"
    with pytest.raises(RuntimeError, match="needs GPUs and this worker has none"):
        launch.config_file(spec(accelerate_config="fsdp"), gpus=0)
    with pytest.raises(RuntimeError, match="has 1 GPU"):
        launch.config_file(spec(), gpus=1)
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"pip install 'charter\[deepspeed\]'"):
        launch.config_file(spec(accelerate_config="deepspeed-zero3"), gpus=2)
