"""Paths a job spec names: under the data roots, symlinks followed, at submit and again in the job.

Real files and symlinks on disk; the submit-time checks through `validate_job_spec`, the job's
through `run.check_access` and `run.main`, the functions the job process runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter import access, validation
from charter.errors import SpecError
from charter.pipelines import run
from charter.settings import Settings, SettingsError, parse_roots

PROMPT = json.dumps({"prompt": "How do I bake bread?"}) + "\n"


@pytest.fixture
def disk(tmp_path: Path) -> dict[str, Path]:
    """A data root holding a prompt file, a folder outside every root, and the settings that say so."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    (data / "sub" / "p.jsonl").write_text(PROMPT)
    (outside / "p.jsonl").write_text(PROMPT)
    return {"tmp": tmp_path, "data": data, "outside": outside}


def settings_for(disk: dict[str, Path]) -> Settings:
    tmp = disk["tmp"]
    return Settings(home=tmp, artifact_root=tmp / "artifacts", models_dir=tmp / "models", data_roots=(disk["data"],))


def job(source: str, **changes: object) -> dict:
    return {
        "name": "x",
        "policy": {"model": "tiny"},
        "prompts": {"source": source},
        "train": {"method": "sft"},
    } | changes


def refused(raw: dict, settings: Settings) -> list[dict]:
    with pytest.raises(SpecError) as e:
        validation.validate_job_spec(raw, settings)
    return e.value.errors


def test_a_dotdot_component_is_refused(disk: dict[str, Path]) -> None:
    errs = refused(job(str(disk["data"] / ".." / "outside" / "p.jsonl")), settings_for(disk))
    assert errs[0]["loc"] == ["prompts", "source"] and "'..' component" in errs[0]["msg"]


def test_an_absolute_path_outside_the_roots_is_refused_unread(disk: dict[str, Path]) -> None:
    raw = job("builtin:red-team", dataset=None)
    raw.pop("prompts")
    raw["dataset"] = {"source": "/etc/passwd"}
    errs = refused(raw, settings_for(disk))
    assert errs == [{"loc": ["dataset", "source"], "msg": errs[0]["msg"]}]  # no parse error: it was never opened
    assert "is outside the data roots" in errs[0]["msg"] and "CHARTER_DATA_ROOTS" in errs[0]["msg"]
    assert str(disk["data"]) in errs[0]["msg"]  # says where files may be


def test_relative_paths_are_held_to_the_roots_where_they_resolve(disk, monkeypatch) -> None:
    s = settings_for(disk)
    monkeypatch.chdir(disk["outside"])
    assert "is outside the data roots" in refused(job("p.jsonl"), s)[0]["msg"]
    monkeypatch.chdir(disk["data"])
    assert validation.validate_job_spec(job("sub/p.jsonl"), s).prompts.source == "sub/p.jsonl"


def test_a_symlink_out_of_a_root_is_refused_and_one_within_is_allowed(disk: dict[str, Path]) -> None:
    s = settings_for(disk)
    (disk["data"] / "out.jsonl").symlink_to(disk["outside"] / "p.jsonl")
    (disk["data"] / "in.jsonl").symlink_to(disk["data"] / "sub" / "p.jsonl")
    (disk["data"] / "dir-out").symlink_to(disk["outside"])  # a symlinked folder on the way counts too
    for name in ("out.jsonl", "dir-out/p.jsonl"):
        errs = refused(job(str(disk["data"] / name)), s)
        assert errs[0]["loc"] == ["prompts", "source"] and "through a symlink" in errs[0]["msg"], errs
    spec = validation.validate_job_spec(job(str(disk["data"] / "in.jsonl")), s)
    assert spec.prompts.source == str(disk["data"] / "in.jsonl")  # the stored spec keeps what the user wrote


def test_every_path_field_is_checked(disk: dict[str, Path]) -> None:
    far = str(disk["outside"] / "p.jsonl")
    raw = job(far, constitution=far, evaluate={"prompts": far})
    raw["train"]["monitors"] = {"probe": {"prompts": far}}
    raw["policy"] = {"model": str(disk["outside"])}
    raw["judge"] = {"model": str(disk["outside"])}
    locs = [e["loc"] for e in refused(raw, settings_for(disk))]
    assert locs == [
        ["constitution"],
        ["prompts", "source"],
        ["evaluate", "prompts"],
        ["train", "monitors", "probe", "prompts"],
        ["policy", "model"],
        ["judge", "model"],
    ]
    ppo = job("builtin:red-team", train={"method": "ppo", "reward_model": far})
    grpo = job("builtin:red-team", train={"method": "grpo", "rewards": [{"type": "reward_model", "model": far}]})
    assert refused(ppo, settings_for(disk))[0]["loc"] == ["train", "reward_model"]
    assert refused(grpo, settings_for(disk))[0]["loc"] == ["train", "rewards", 0, "model"]
    on_data = job("builtin:red-team", dataset={"source": str(disk["data"] / "sub" / "p.jsonl"), "validation": far})
    on_data.pop("prompts")
    assert refused(on_data, settings_for(disk))[0]["loc"] == ["dataset", "validation"]


def model_folder(root: Path, name: str, config: dict, weights: str) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
    (folder / weights).write_bytes(b"\0" * 8)
    return folder


def test_a_model_folder_with_only_pickle_weights_is_refused(disk: dict[str, Path]) -> None:
    folder = model_folder(disk["data"], "bin-only", {}, "pytorch_model.bin")
    errs = refused(job("builtin:red-team", policy={"model": str(folder)}), settings_for(disk))
    msg = errs[0]["msg"]
    assert errs[0]["loc"] == ["policy", "model"] and "pytorch_model.bin" in msg and "safetensors only" in msg
    assert f"M.from_pretrained('{folder}').save_pretrained" in msg and "safe_serialization=True" in msg


def test_a_model_folder_with_custom_code_is_refused(disk: dict[str, Path]) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    folder = model_folder(disk["data"], "custom", {"auto_map": auto_map}, "model.safetensors")
    errs = refused(job("builtin:red-team", judge={"model": str(folder)}), settings_for(disk))
    assert errs[0]["loc"] == ["judge", "model"] and "auto_map" in errs[0]["msg"]
    assert "trust_remote_code is off" in errs[0]["msg"]


def test_a_safetensors_model_folder_in_a_root_is_accepted(disk: dict[str, Path]) -> None:
    folder = model_folder(disk["data"], "fine", {}, "model.safetensors")
    spec = validation.validate_job_spec(job("builtin:red-team", judge={"model": str(folder)}), settings_for(disk))
    assert spec.judge_model == str(folder)


def test_paths_into_artifact_root_stay_in_one_of_the_callers_jobs(disk: dict[str, Path]) -> None:
    s = settings_for(disk)
    root = s.artifact_root
    for name in ("job-mine", "job-theirs", "files"):
        (root / name).mkdir(parents=True)
    (root / "job-mine" / "pairs.jsonl").write_text(PROMPT)
    (root / "job-theirs" / "pairs.jsonl").write_text(PROMPT)
    (root / "files" / "file-abc").write_text(PROMPT)
    (root / "job-mine" / "theirs.jsonl").symlink_to(root / "job-theirs" / "pairs.jsonl")
    (disk["data"] / "into-artifacts.jsonl").symlink_to(root / "job-mine" / "pairs.jsonl")

    def mine(job_id: str) -> bool:
        return job_id == "job-mine"

    assert access.check_path(str(root / "job-mine" / "pairs.jsonl"), s, jobs=mine) == root / "job-mine" / "pairs.jsonl"
    cases = {
        root / "job-theirs" / "pairs.jsonl": "there is no job job-theirs",  # as for a job that does not exist
        root / "job-nope" / "pairs.jsonl": "there is no job job-nope",
        root / "job-mine" / "theirs.jsonl": "leads out of job job-mine's folder",
        root / "files" / "file-abc": "by its id (file-…)",
        disk["data"] / "into-artifacts.jsonl": "leads into ARTIFACT_ROOT through a symlink",
    }
    for path, needle in cases.items():
        with pytest.raises(access.AccessError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            access.check_path(str(path), s, jobs=mine)


def test_a_data_root_holding_artifact_root_does_not_open_other_jobs(disk: dict[str, Path]) -> None:
    s = Settings(
        home=disk["tmp"],
        artifact_root=disk["data"] / "artifacts",
        models_dir=disk["tmp"] / "m",
        data_roots=(disk["data"],),
    )
    (s.artifact_root / "job-theirs").mkdir(parents=True)
    (s.artifact_root / "job-theirs" / "pairs.jsonl").write_text(PROMPT)
    with pytest.raises(access.AccessError, match="there is no job job-theirs"):
        access.check_path(str(s.artifact_root / "job-theirs" / "pairs.jsonl"), s, jobs=lambda _: False)


def test_the_job_process_checks_again_and_opens_what_it_checked(disk: dict[str, Path], monkeypatch) -> None:
    """A symlink swapped after submit: the job refuses it before opening anything."""
    s = settings_for(disk)
    link = disk["data"] / "prompts.jsonl"
    link.symlink_to(disk["data"] / "sub" / "p.jsonl")
    spec = validation.validate_job_spec(job(str(link)), s)
    monkeypatch.setenv("CHARTER_DATA_ROOTS", str(disk["data"]))  # as the worker passes its roots on
    checked = run.check_access(spec, s.artifact_root)
    assert checked.prompts.source == str(disk["data"] / "sub" / "p.jsonl")  # the target, not the link

    link.unlink()
    link.symlink_to(disk["outside"] / "p.jsonl")
    with pytest.raises(access.AccessError, match="prompts.source: prompt file .* through a symlink"):
        run.check_access(spec, s.artifact_root)


def test_a_job_whose_symlink_was_swapped_fails_saying_why(disk, monkeypatch, capsys) -> None:
    link = disk["data"] / "prompts.jsonl"
    link.symlink_to(disk["outside"] / "p.jsonl")
    (disk["tmp"] / "spec.json").write_text(json.dumps(job(str(link))))
    monkeypatch.setenv("CHARTER_DATA_ROOTS", str(disk["data"]))
    code = run.main(["--spec", str(disk["tmp"] / "spec.json"), "--workdir", str(disk["tmp"] / "artifacts" / "job-1")])
    events = [
        json.loads(x.removeprefix("@@event ")) for x in capsys.readouterr().out.splitlines() if x.startswith("@@event ")
    ]
    assert code == 1 and "leads out of the data roots through a symlink" in events[-1]["data"]["message"]


def test_data_roots_setting(monkeypatch) -> None:
    assert parse_roots("/a:/b::~/c") == (Path("/a"), Path("/b"), Path("~/c").expanduser())
    with pytest.raises(SettingsError, match="absolute path"):
        parse_roots("/a:relative")
    monkeypatch.setenv("CHARTER_HOME", "/srv/charter")
    monkeypatch.delenv("CHARTER_DATA_ROOTS", raising=False)
    s = Settings.from_env()
    assert s.data_roots == (Path("/srv/charter/data"),) and s.roots[0] == s.models_dir
    monkeypatch.setenv("CHARTER_DATA_ROOTS", "")
    assert Settings.from_env().roots == (Settings.from_env().models_dir,)  # empty: prepared models only
