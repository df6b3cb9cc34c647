"""charter.Client, the notebook client: a light import, and every call against the real app
in process (FastAPI's TestClient as its HTTP client). A job followed to its end by a worker
is in test_live_clients.py."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import charter
from charter.client import ClientError
from charter.service.api import build_app

from .service.helpers import make_settings

SFT = b'{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}\n'


def test_import_charter_and_make_a_client_loads_no_heavy_module():
    code = (
        "import sys, charter; c = charter.Client('http://127.0.0.1:1'); charter.Job; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'fastapi', 'sqlalchemy', 'pandas', 'matplotlib', 'vllm') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Iterator[charter.Client]:
    tmp = tmp_path_factory.mktemp("client")
    with TestClient(build_app(make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}"), start_worker=False)) as http:
        yield charter.Client("http://testserver", api_key="k", http_client=http)


def test_files(client: charter.Client, tmp_path: Path):
    path = tmp_path / "sft.jsonl"
    path.write_bytes(SFT)
    f = client.files.upload(path)
    assert f["kind"] == "sft" and f["rows"] == 1 and f["filename"] == "sft.jsonl"
    assert client.files.get(f["id"]) == f and f in client.files.list()
    assert client.files.content(f["id"]) == SFT
    path.write_bytes(SFT + b"{oops\n")
    with pytest.raises(ClientError) as e:
        client.files.upload(path)
    assert e.value.status == 400 and "line 2" in str(e.value)
    assert client.files.delete(f["id"])["deleted"] is True
    with pytest.raises(ClientError) as e:
        client.files.get(f["id"])
    assert e.value.status == 404


def test_jobs_events_metrics_plot(client: charter.Client, tmp_path: Path):
    f = client.files.upload(_write(tmp_path / "d.jsonl", SFT))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"name: mine\npolicy: {{model: tiny}}\ndataset: {{source: {f['id']}}}\ntrain: {{method: sft}}\n")
    job = client.jobs.create(spec)  # a YAML path
    assert job.status == "queued" and job["spec"]["dataset"]["source"] == f["id"]
    assert client.jobs.get(job.id).data == job.data and job.id in [j.id for j in client.jobs.list()]
    with pytest.raises(ClientError) as e:
        client.jobs.create({"name": "x", "policy": {"model": "tiny"}, "train": {"method": "sft"}})
    assert e.value.status == 422 and "exactly one of prompts" in str(e.value)

    store = client._http.app.state.store
    for step, loss in [(1, 2.0), (2, 1.5), (3, 1.25)]:
        store.append_event(job.id, "metrics", {"stage": "train", "step": step, "loss": loss, "learning_rate": 1e-5})
    store.append_event(job.id, "message", {"message": "hello"})
    assert [e["type"] for e in job.events()] == ["metrics"] * 3 + ["message"]
    frame = job.metrics()
    assert list(frame["loss"]) == [2.0, 1.5, 1.25] and list(frame["step"]) == [1, 2, 3]
    import matplotlib

    matplotlib.use("Agg")
    fig = job.plot()
    assert list(fig.axes[0].lines[0].get_ydata()) == [2.0, 1.5, 1.25]

    assert job.cancel().status == "cancelled"
    assert job.wait(progress=False).status == "cancelled"  # a finished job returns at once


def test_download_of_a_missing_artifact_leaves_no_file(client: charter.Client, tmp_path: Path):
    job = client.jobs.list()[0]
    with pytest.raises(ClientError) as e:
        job.download("adapter", tmp_path)
    assert e.value.status == 404
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_follows_stage_events(capsys: pytest.CaptureFixture[str]):
    from charter.client import _Progress

    bar = _Progress()
    events = [
        {"type": "stage", "data": {"stage": "train", "state": "started", "done": 0, "total": 4}},
        {"type": "stage", "data": {"stage": "train", "state": "progress", "done": 2, "total": 4, "loss": 1.5}},
        {"type": "message", "level": "info", "data": {"message": "half way"}},
        {"type": "stage", "data": {"stage": "train", "state": "done", "steps": 4}},
    ]
    for e in events:
        bar.update({"id": 0, **e})
    bar.close()
    err = capsys.readouterr()
    text = err.err + err.out
    assert "train" in text and "4/4" in text and "half way" in text


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_service_client_module_still_imports():
    from charter.service.client import Client

    assert Client is charter.Client  # the old import path, for scripts that use it
