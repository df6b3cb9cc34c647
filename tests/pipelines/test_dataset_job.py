"""A `dataset:` job in its own process, as the worker starts it, when its uploaded file is gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.pipelines import run


def test_a_deleted_upload_fails_the_job_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    spec = {"name": "x", "policy": {"model": "tiny"}, "dataset": {"source": "file-gone"}, "train": {"method": "sft"}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    code = run.main(["--spec", str(tmp_path / "spec.json"), "--workdir", str(tmp_path / "artifacts" / "job-1")])
    assert code == 1
    errors = [
        json.loads(line.removeprefix("@@event "))
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("@@event ")
    ]
    assert errors[-1]["level"] == "error"
    assert "file-gone is gone from" in errors[-1]["data"]["message"]
    assert str(tmp_path / "artifacts" / "files") in errors[-1]["data"]["message"]  # beside the job folders
