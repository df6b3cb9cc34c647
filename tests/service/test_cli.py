"""The `charter` command: help texts, light imports, and the client commands against live servers."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from charter import cli
from charter.service.api import build_app
from charter.service.store import JobStore
from charter.service.worker import Worker

from .helpers import fake_command, make_settings, make_store, spec

REPO = Path(__file__).resolve().parents[2]
HELP = [
    [],
    ["serve"],
    ["worker"],
    ["submit"],
    ["jobs"],
    ["jobs", "list"],
    ["jobs", "show"],
    ["jobs", "cancel"],
    ["jobs", "events"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "revoke"],
    ["models"],
    ["models", "prepare"],
    ["models", "list"],
    ["demo"],
]


def charter(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charter.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_command_has_help() -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = [
        (
            argv,
            subprocess.Popen(
                [sys.executable, "-m", "charter.cli", *argv, "--help"],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
                cwd=REPO,
            ),
        )
        for argv in HELP
    ]
    for argv, proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, argv
        assert out.startswith(f"usage: charter {' '.join(argv)}".rstrip()), out
        description = out.split("\n\n")[1]
        assert len(description) > 20, f"charter {' '.join(argv)} --help has no description"


def test_the_cli_and_api_modules_import_no_ml_libraries() -> None:
    code = (
        "import sys; "
        "import charter.cli, charter.service.api, charter.service.worker, charter.service.client, charter.service.store; "
        "import charter.validation; "
        "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'vllm', 'datasets') if m in sys.modules); "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]", f"imported at module level: {out}"


def test_summary_prints_what_exists_and_survives_what_does_not() -> None:
    job = {
        "id": "job-0123456789ab",
        "status": "succeeded",
        "started_at": "2025-01-01T00:00:00Z",
        "finished_at": "2025-01-01T00:03:12Z",
        "report": {
            "pairs": 32,
            "win_rate": 0.625,
            "win_rate_ci95": [0.45, 0.78],
            "mean_length": {"trained": 84.2, "base": 97.0},
        },
        "artifacts": {"adapter": "/x/train/adapter", "plot": "/x/evaluate/plot.png", "extra": "/x/y"},
    }
    out = io.StringIO()
    cli.print_summary(job, out)
    text = out.getvalue()
    assert "succeeded in 3m12s" in text and "0.625" in text and "[0.450, 0.780]" in text
    assert "trained 84.200, base 97.000" in text and "/x/train/adapter" in text and "extra" in text
    assert "position agreement" not in text  # absent keys are skipped, not printed as None
    cli.print_summary({"id": "job-x", "status": "failed", "error": "boom", "report": None, "artifacts": {}}, out)
    assert "error: boom" in out.getvalue()


def test_follower_prints_stages_messages_and_throttles_progress_off_a_terminal() -> None:
    out = io.StringIO()
    follow = cli.Follower(out, every_s=60)
    follow({"type": "stage", "level": "info", "data": {"stage": "generate", "state": "started", "total": 8}})
    for i in range(1, 9):
        follow(
            {
                "type": "stage",
                "level": "info",
                "data": {"stage": "generate", "state": "progress", "done": i, "total": 8, "tokens_per_s": 61.5},
            }
        )
    follow({"type": "metrics", "level": "info", "data": {"stage": "train", "loss": 0.6931}})
    follow({"type": "message", "level": "warning", "data": {"message": "3 verdicts did not parse"}})
    follow({"type": "stage", "level": "info", "data": {"stage": "generate", "state": "done", "done": 8, "total": 8}})
    lines = out.getvalue().splitlines()
    assert lines[0] == "[generate] started  total=8"
    assert lines[1] == "[generate]  1/8 rows  61.5 tok/s"  # then nothing for every_s seconds
    assert "warning: 3 verdicts did not parse" in lines and lines[-1].startswith("[generate] done  done=8")
    assert len(lines) == 4


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, JobStore]]:
    """An API (uvicorn in a thread) and a worker running fake_job.py, sharing one SQLite file."""
    tmp_path = tmp_path_factory.mktemp("live")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}")
    app = build_app(settings, start_worker=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    stop = threading.Event()
    store = app.state.store
    worker = threading.Thread(
        target=Worker(store, settings, job_command=fake_command).run_forever, args=(stop,), daemon=True
    )
    worker.start()
    yield f"http://127.0.0.1:{server.config.port}", store
    stop.set()
    worker.join(10)
    server.should_exit = True
    thread.join(20)


def test_submit_wait_follows_a_job_to_success(
    live: tuple[str, JobStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    path = tmp_path / "job.yaml"
    path.write_text(
        "name: ok\npolicy: {model: smollm2-135m}\nprompts: {source: 'builtin:red-team', limit: 2}\ntrain: {method: dpo}\n"
    )
    assert cli.main(["submit", str(path), "--wait", "--url", url]) == 0
    out = capsys.readouterr().out
    job_id = out.splitlines()[0]
    assert job_id.startswith("job-")
    assert "[generate] started" in out and "[generate] done" in out and "[critique] skipped" in out
    assert f"job {job_id} succeeded" in out and "win rate" in out and "dataset" in out


def test_submit_wait_exits_1_with_the_error(
    live: tuple[str, JobStore], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = live
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec("fail")))
    assert cli.main(["submit", str(path), "--wait", "--url", url]) == 1
    out = capsys.readouterr().out
    assert "failed" in out and "error: judge at http://127.0.0.1:9/v1 unreachable" in out


def test_submit_refuses_a_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("- just\n- a list\n")
    assert cli.main(["submit", str(path), "--url", "http://127.0.0.1:9"]) == 1
    assert "must hold a job spec mapping" in capsys.readouterr().err
    assert cli.main(["submit", str(tmp_path / "absent.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_client_commands_against_charter_serve(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ARTIFACT_ROOT", "CHARTER_URL")}
    env |= {"CHARTER_HOME": str(tmp_path / "home"), "CHARTER_PORT": str(port), "PYTHONPATH": str(REPO)}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "charter.cli", "serve", "--no-worker"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "charter serve did not answer within 30 s"
            time.sleep(0.2)

        listed = charter("jobs", "list", env=env)  # the URL comes from CHARTER_PORT
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.split() == ["ID", "STATUS", "STAGE", "CREATED", "NAME"]
        (tmp_path / "bad.yaml").write_text(
            "name: x\npolicy: {model: smollm2-135m}\nprompts: {source: 'builtin:red-team'}\ntrain: {method: telepathy}\n"
        )

        bad = charter("submit", str(tmp_path / "bad.yaml"), env=env)
        assert bad.returncode == 1 and "HTTP 422" in bad.stderr and "train.method" in bad.stderr

        # The other commands run in this process (same code, no interpreter start). Submitting for
        # real is test_submit_wait_*'s job: this job goes straight into the server's database.
        store = make_store(f"sqlite:///{tmp_path / 'home' / 'charter.db'}")
        job_id = store.create_job(spec("cli-job"), name="cli-job").id
        store.engine.dispose()
        url = ["--url", f"http://127.0.0.1:{port}"]
        assert cli.main(["jobs", "list", "--json", *url]) == 0
        assert [j["id"] for j in json.loads(capsys.readouterr().out)] == [job_id]
        assert cli.main(["jobs", "show", job_id, *url]) == 0
        assert "queued" in capsys.readouterr().out
        assert cli.main(["jobs", "cancel", job_id, *url]) == 0
        assert capsys.readouterr().out.strip() == f"{job_id} cancelled"
        assert cli.main(["jobs", "events", job_id, "--json", *url]) == 0
        assert [e["data"]["message"] for e in json.loads(capsys.readouterr().out)] == ["cancelled by request"]
        assert cli.main(["jobs", "events", job_id, *url]) == 0
        assert "cancelled by request" in capsys.readouterr().out
        assert cli.main(["jobs", "cancel", job_id, *url]) == 1
        assert "HTTP 409" in (err := capsys.readouterr().err) and "already finished" in err
        assert cli.main(["jobs", "show", "job-000000000000", *url]) == 1
        assert "not found" in capsys.readouterr().err
    finally:
        server.terminate()
        server.wait(20)
        log.close()
    assert cli.main(["jobs", "list", "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "cannot reach charter" in capsys.readouterr().err


def test_demo_uses_a_running_service(
    live: tuple[str, JobStore], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import charter.models

    prepared: list[str] = []
    monkeypatch.setattr(charter.models, "prepare", lambda name: prepared.append(name) or tmp_path / name)
    monkeypatch.setenv("CHARTER_HOST", "127.0.0.1")
    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps(spec("ok")))
    port = live[0].rsplit(":", 1)[1]
    assert cli.main(["demo", "--port", port, "--spec", str(path)]) == 0
    out = capsys.readouterr().out
    assert prepared == ["smollm2-135m"]
    assert "using the service already running" in out and "succeeded" in out and "win rate" in out
    assert cli.DEMO_SPEC == REPO / "examples" / "demo.yaml"


def test_demo_server_starts_answers_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from charter.service.client import Client

    monkeypatch.setenv("CHARTER_HOME", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("ARTIFACT_ROOT", raising=False)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'charter.db'}")
    port = free_port()
    server = cli._start_server(settings, port)
    try:
        with Client(f"http://127.0.0.1:{port}") as client:
            cli._wait_healthy(client, server, tmp_path / "demo-serve.log", timeout_s=30)
            assert client.list_jobs() == []
    finally:
        cli._stop_server(server)
    assert server.returncode is not None
    assert "Application startup complete" in (tmp_path / "demo-serve.log").read_text()


def test_progress_line_shows_the_prompt_rate_while_the_judge_only_scores() -> None:
    from charter.cli import progress_text

    scoring = {"stage": "label", "done": 12, "total": 32, "tokens_per_s": 0.0, "prompt_tokens_per_s": 2150.4}
    assert progress_text(scoring) == "[label]  12/32 rows  0.0 tok/s  2,150 prompt tok/s"
    assert "prompt" not in progress_text({**scoring, "prompt_tokens_per_s": 0.0})


def test_progress_line_of_an_rl_metrics_event_shows_step_reward_and_kl() -> None:
    from charter.cli import progress_text

    ppo = {"stage": "rl.k1.train", "step": 7, "reward": 0.36173, "kl": 25.223, "entropy": 51.1}
    assert progress_text(ppo) == "[rl.k1.train]  step 7  reward 0.3617  kl 25.22"
    assert progress_text({"stage": "train", "done": 3, "total": 8, "unit": "steps", "loss": 0.5}) == (
        "[train]  3/8 steps  loss 0.5000"
    )


def test_summary_of_a_recipe_shows_the_sft_comparison_and_each_round() -> None:
    report = {
        "win_rate": 0.6,
        "win_rate_ci95": [0.4, 0.8],
        "versus": {"base": {"win_rate": 0.6}, "sft": {"win_rate": 0.55, "win_rate_ci95": [0.35, 0.75]}},
        "rl": [
            {
                "round": 1,
                "pairs": 32,
                "reward": {"heldout": {"accuracy": 0.75}},
                "train": {"first_reward": 0.5, "final_reward": 0.9},
            },
            {"round": 2, "pairs": 30, "train": {}},
        ],
    }
    out = io.StringIO()
    cli.print_summary({"id": "job-r", "status": "succeeded", "report": report, "artifacts": {}}, out)
    text = out.getvalue()
    assert "  win rate vs sft     0.550\n    95% CI            [0.350, 0.750]" in text
    assert "  round 1: pairs 32, reward model held-out accuracy 0.750, reward 0.500 → 0.900" in text
    assert "  round 2: pairs 30\n" in text
