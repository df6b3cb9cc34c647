"""Paths and job ids in specs through the real API, with two tenants: 422s that name the field.

A reward model naming another tenant's job is refused exactly like a job id that does not exist.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from charter.service.api import build_app

from .helpers import make_settings, spec
from .test_auth import MISSING, Tenants


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    tmp = tmp_path_factory.mktemp("access")
    (tmp / "data").mkdir()
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}", auth="on", data_roots=(tmp / "data",))
    with TestClient(build_app(settings, start_worker=False)) as client:
        yield Tenants(client)


def finished_reward_job(tenants: Tenants, who: str) -> str:
    """A job of `who`'s whose folder holds what a finished `reward` job leaves (read, not loaded, at submit)."""
    r = tenants.request(who, "POST", "/v1/jobs", json=spec("rm"))
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    root = tenants.client.app.state.settings.artifact_root / job_id
    model = root / "train" / "model"
    model.mkdir(parents=True)
    (model / "charter_train_config.json").write_text(json.dumps({"method": "reward"}))
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    (root / "train" / "manifest.json").write_text(json.dumps({"result": {"path": str(model)}}))
    return job_id


def ppo(reward_model: str) -> dict:
    return spec("ppo", train={"method": "ppo", "reward_model": reward_model})


def test_a_reward_model_of_another_tenant_reads_as_missing(tenants: Tenants) -> None:
    bobs = finished_reward_job(tenants, "bob")
    assert tenants.request("bob", "POST", "/v1/jobs", json=ppo(bobs)).status_code == 201  # his own: fine

    theirs = tenants.request("alice", "POST", "/v1/jobs", json=ppo(bobs))
    missing = tenants.request("alice", "POST", "/v1/jobs", json=ppo(MISSING))
    assert theirs.status_code == missing.status_code == 422
    assert theirs.json()["detail"][0]["loc"] == ["train", "reward_model"]
    assert theirs.json()["detail"][0]["msg"].replace(bobs, "ID") == missing.json()["detail"][0]["msg"].replace(
        MISSING, "ID"
    )
    assert "train.method: reward first" in theirs.json()["detail"][0]["msg"]

    grpo = spec("g", train={"method": "grpo", "rewards": [{"type": "reward_model", "model": bobs}]})
    r = tenants.request("alice", "POST", "/v1/jobs", json=grpo)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["train", "rewards", 0, "model"]
    assert tenants.request("root", "POST", "/v1/jobs", json=ppo(bobs)).status_code == 201  # an admin sees all


def test_a_path_into_another_tenants_job_folder_is_refused(tenants: Tenants) -> None:
    bobs = finished_reward_job(tenants, "bob")
    folder = str(tenants.client.app.state.settings.artifact_root / bobs / "train" / "model")
    assert tenants.request("bob", "POST", "/v1/jobs", json=ppo(folder)).status_code == 201
    r = tenants.request("alice", "POST", "/v1/jobs", json=ppo(folder))
    assert r.status_code == 422 and f"there is no job {bobs}" in r.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    "field, value, needle",
    [
        (
            "prompts",
            {"source": "/etc/passwd"},
            "outside the data roots ({models}, {data}); put the file under one of them, upload",
        ),
        (
            "prompts",
            {"source": "{data}/../charter.db"},
            "'..' component; give its path under a data root ({models}, {data})",
        ),
        ("constitution", "/etc/hostname", "set CHARTER_DATA_ROOTS to include its folder"),
    ],
)
def test_paths_outside_the_roots_are_422_naming_the_field(tenants: Tenants, field: str, value, needle: str) -> None:
    settings = tenants.client.app.state.settings
    where = {"data": settings.data_roots[0], "models": settings.models_dir}
    value = json.loads(json.dumps(value).replace("{data}", str(where["data"])))
    r = tenants.request("alice", "POST", "/v1/jobs", json=spec("p", **{field: value}))
    assert r.status_code == 422, r.text
    (err,) = r.json()["detail"]
    assert err["loc"][0] == field and needle.format(**where) in err["msg"]


def test_a_file_in_a_data_root_is_accepted(tenants: Tenants) -> None:
    data: Path = tenants.client.app.state.settings.data_roots[0]
    (data / "p.jsonl").write_text(json.dumps({"prompt": "Hi"}) + "\n")
    r = tenants.request("alice", "POST", "/v1/jobs", json=spec("ok", prompts={"source": str(data / "p.jsonl")}))
    assert r.status_code == 201, r.text


def test_the_worker_hands_its_roots_to_the_job_process(tenants: Tenants, tmp_path: Path) -> None:
    from charter.service.worker import Worker

    app = tenants.client.app
    job = app.state.store.get_job(tenants.request("alice", "POST", "/v1/jobs", json=spec("w")).json()["id"])
    worker = Worker(app.state.store, app.state.settings, job_command=lambda *_: ["true"])
    _, env = worker._command(job, tmp_path / "spec.json", tmp_path)
    assert env["CHARTER_DATA_ROOTS"] == str(app.state.settings.data_roots[0])  # the job re-checks against these
