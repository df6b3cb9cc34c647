"""Which local paths a job spec may name; checked at submit and again in the job process.

A spec names models, datasets, prompt files, constitutions and reward models by name, by id
(`file-…`, `job-…`) or by path. A path may not hold `..`, and where it resolves to, every
symlink followed, must lie under a data root (`Settings.roots`: CHARTER_MODELS_DIR and
CHARTER_DATA_ROOTS). ARTIFACT_ROOT is never a data root, since it holds every tenant's jobs
and uploads: a path into it must stay inside one job's folder, a job the API checks is the
caller's (another tenant's job reads as a missing one), and an upload is named by its id.
The job process repeats the checks (a symlink may have changed since submit) and opens the
paths they resolved to.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from charter.errors import CharterError
from charter.settings import Settings
from charter.spec import JobSpec

JobVisible = Callable[[str], bool]  # a job id → whether the caller may read that job (the API's tenant check)


class AccessError(CharterError):
    """A spec names a path outside the data roots, or a job that is not the caller's."""

    status_code = 422


def missing_reward_model(ref: str) -> str:
    """The one message for a reward model that is missing and for another tenant's job."""
    return (
        f"{ref!r} is neither a finished charter job id nor a folder written by a `reward` job "
        "(no charter_train_config.json there); train one with train.method: reward first"
    )


def is_job_id(ref: str) -> bool:
    """A reward model named by its job's id (one plain name) rather than by a path."""
    return bool(ref) and "/" not in ref and ref not in (".", "..") and not ref.startswith(("~", "."))


def check_path(ref: str, settings: Settings, what: str = "path", jobs: JobVisible | None = None) -> Path:
    """A path a spec names → where it resolves, if that is under a data root or in one of the
    caller's job folders; else AccessError saying which rule it broke and how to fix it."""
    path = Path(ref).expanduser()
    roots = ", ".join(str(r) for r in settings.roots) or "none"
    if ".." in path.parts:
        raise AccessError(f"{what} {ref!r} has a '..' component; give its path under a data root ({roots}) without one")
    real = path.resolve()
    artifacts = settings.artifact_root.resolve()
    job = _job_folder(path.absolute(), settings.artifact_root)
    if job is not None:  # named inside ARTIFACT_ROOT: one job's folder, the caller's
        if job in ("", "files"):
            raise AccessError(
                f"{what} {ref!r} is in ARTIFACT_ROOT; name an uploaded file by its id (file-…) and a job's output "
                "by a path inside that job's folder"
            )
        if jobs is not None and not jobs(job):
            raise AccessError(f"{what} {ref!r}: there is no job {job}; check the job id (GET /v1/jobs lists yours)")
        if not real.is_relative_to(artifacts / job):
            raise AccessError(f"{what} {ref!r} leads out of job {job}'s folder through a symlink; name the file itself")
        return real
    if real.is_relative_to(artifacts):
        raise AccessError(
            f"{what} {ref!r} leads into ARTIFACT_ROOT through a symlink; name a job's output by its path in "
            "ARTIFACT_ROOT/<job id> and an upload by its file id"
        )
    if any(real.is_relative_to(r.resolve()) for r in settings.roots):
        return real
    literal = path.absolute()
    inside = any(literal.is_relative_to(r.absolute()) or literal.is_relative_to(r.resolve()) for r in settings.roots)
    how = "leads out of the data roots through a symlink" if inside else "is outside the data roots"
    raise AccessError(
        f"{what} {ref!r} {how} ({roots}); put the file under one of them, upload it (POST /v1/files), "
        "or have the operator set CHARTER_DATA_ROOTS to include its folder"
    )


def _job_folder(literal: Path, artifact_root: Path) -> str | None:
    """The job id a path is written under (ARTIFACT_ROOT/<id>/…), '' for ARTIFACT_ROOT itself, None outside it."""
    for base in {artifact_root.absolute(), artifact_root.resolve()}:
        if literal.is_relative_to(base):
            parts = literal.relative_to(base).parts
            return parts[0] if parts else ""
    return None


def check_spec(
    spec: JobSpec, settings: Settings, jobs: JobVisible | None = None
) -> tuple[JobSpec, list[dict[str, Any]]]:
    """(a copy of `spec` whose local paths are the ones they resolve to, [{loc, msg}] for each refused).

    Names and ids are left as they are: `builtin:…` prompt sets, shipped constitutions and
    uploaded files (`file-…`); a reward model's job id is checked against `jobs` here, and
    resolved inside that job's folder by `rewards.resolve_reward_model`. Models are checked
    where they are resolved, by `models.resolve`.
    """
    from charter import constitution

    errors: list[dict[str, Any]] = []
    out = spec.model_copy(deep=True)

    def path(loc: list[str | int], ref: str, what: str) -> str:
        try:
            return str(check_path(ref, settings, what, jobs))
        except AccessError as e:
            errors.append({"loc": loc, "msg": str(e)})
            return ref

    def local(ref: str) -> bool:
        return not ref.startswith(("builtin:", "file-"))

    c = spec.constitution
    if isinstance(c, str) and local(c) and c not in constitution.shipped_names():
        if "/" in c or c.startswith(("~", ".")):
            out.constitution = path(["constitution"], c, "constitution")
        else:  # a bare word names a shipped constitution, never a file in whatever folder the process runs in
            errors.append(
                {
                    "loc": ["constitution"],
                    "msg": f"constitution {c!r} is neither a shipped name ({', '.join(constitution.shipped_names())}) "
                    "nor a path; give a YAML/JSON file's path under a data root, or upload it (file-…)",
                }
            )
    if spec.prompts and local(spec.prompts.source):
        out.prompts.source = path(["prompts", "source"], spec.prompts.source, "prompt file")
    if spec.dataset and local(spec.dataset.source):
        out.dataset.source = path(["dataset", "source"], spec.dataset.source, "dataset")
    if spec.dataset and spec.dataset.validation and local(spec.dataset.validation):
        out.dataset.validation = path(["dataset", "validation"], spec.dataset.validation, "validation dataset")
    if spec.evaluate and local(spec.evaluate.prompts):
        out.evaluate.prompts = path(["evaluate", "prompts"], spec.evaluate.prompts, "prompt file")
    if (probe := spec.train.monitors.probe) and local(probe.prompts):
        out.train.monitors.probe.prompts = path(["train", "monitors", "probe", "prompts"], probe.prompts, "prompt file")

    def reward_model(loc: list[str | int], ref: str) -> str:
        if not is_job_id(ref):
            return path(loc, ref, "reward model")
        if jobs is not None and not jobs(ref):
            errors.append({"loc": loc, "msg": missing_reward_model(ref)})
        return ref

    if spec.train.reward_model:
        out.train.reward_model = reward_model(["train", "reward_model"], spec.train.reward_model)
    for i, src in enumerate(spec.train.rewards):
        if src.type == "reward_model":
            out.train.rewards[i].model = reward_model(["train", "rewards", i, "model"], src.model)
    return out, errors
