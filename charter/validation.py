"""Everything checked when a job is submitted, so a bad spec is a 422 now, not a crash later.

The shape comes from `charter.spec`; then the references are resolved (models, constitution,
prompt sets) and `train.args` go through TRL's own parser. TRL imports torch, which the API
process must not, so a long-lived validator subprocess (`charter.pipelines.trl_args
--serve`) answers; `warm_up()` starts it when the API starts. Where TRL is not installed
(the slim `api` image, docker/api.Dockerfile) that check is left to the job process, which
builds the trainer's config with the same parser and fails the job naming the key.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from charter import access, constitution, dataset, models, prompts
from charter.access import JobVisible
from charter.errors import CharterError, ConstitutionError, ModelNotFound, SpecError
from charter.settings import Settings
from charter.spec import JobSpec, recipe_errors

FileLookup = Callable[[str], Path]  # an uploaded file's id → its local path; raises CharterError if unknown
FILE_PREFIX = "file-"


class _TrlValidator:
    """One `trl_args --serve` process, started lazily, restarted if it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "charter.pipelines.trl_args", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        ready = proc.stdout.readline()
        if not ready:
            raise CharterError("the TRL validator process failed to start; check that trl is installed")
        return proc

    def warm_up(self) -> None:
        threading.Thread(target=self._ensure_locked, daemon=True, name="trl-validator-warmup").start()

    def _ensure_locked(self) -> None:
        with self._lock:
            self._ensure()

    def _ensure(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        return self._proc

    def check(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """{"train": …, "recipe": bool, "artifact_root": …} or {"method": …, "args": …} → [{loc, msg}]."""
        with self._lock:
            for _attempt in range(2):
                proc = self._ensure()
                try:
                    proc.stdin.write(json.dumps({**request, "cpu": _cpu_only()}) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                    if line:
                        return json.loads(line)["errors"]
                except (BrokenPipeError, OSError):
                    pass
                self._proc = None  # died mid-request: start a fresh one and ask again
            raise CharterError("the TRL validator process keeps dying; see the service log")


_validator = _TrlValidator()


def _cpu_only() -> bool:
    from charter.pipelines.servers import has_gpu  # reads /dev, imports no torch

    return not has_gpu()


def trl_installed() -> bool:
    """Whether this environment can run TRL's parser (found without importing it)."""
    try:
        return importlib.util.find_spec("trl") is not None
    except (ImportError, ValueError):
        return False


def warm_up() -> None:
    """Start the TRL validator in the background so the first submit does not wait for it."""
    if trl_installed():
        _validator.warm_up()


def resolve_files(spec: JobSpec, lookup: FileLookup | None) -> JobSpec:
    """A copy of `spec` whose uploaded-file references (`file-…`) are local paths.

    The stored spec keeps the ids; the API resolves them within the caller's tenant, the job
    process under ARTIFACT_ROOT/files. Errors name each field whose file is unknown.
    """
    errors: list[dict[str, Any]] = []

    def path(loc: list[str], ref: Any) -> Any:
        if not (isinstance(ref, str) and ref.startswith(FILE_PREFIX)):
            return ref
        if lookup is None:
            errors.append({"loc": loc, "msg": f"{ref}: uploaded files can only be used through the charter service"})
            return ref
        try:
            return str(lookup(ref))
        except CharterError as e:
            errors.append({"loc": loc, "msg": str(e)})
            return ref

    out = spec.model_copy(deep=True)
    out.constitution = path(["constitution"], spec.constitution)
    if out.prompts:
        out.prompts.source = path(["prompts", "source"], spec.prompts.source)
    if out.dataset:
        out.dataset.source = path(["dataset", "source"], spec.dataset.source)
        out.dataset.validation = path(["dataset", "validation"], spec.dataset.validation)
    if out.evaluate:
        out.evaluate.prompts = path(["evaluate", "prompts"], spec.evaluate.prompts)
    if probe := out.train.monitors.probe:
        probe.prompts = path(["train", "monitors", "probe", "prompts"], probe.prompts)
    if errors:
        raise SpecError(errors)
    return out


def check_dataset(spec: JobSpec) -> None:
    """The dataset and its validation file (resolved to paths) exist, parse, are the kind the
    training method needs, and hold every field a grader reads as {{item.…}}."""
    assert spec.dataset is not None
    from charter.graders import item_fields

    fields = {f for r in spec.train.rewards if r.type == "grader" for f in item_fields(r.grader)}
    if spec.dataset.validation and spec.train.method in ("reward", "ppo"):
        raise SpecError.one(
            ["dataset", "validation"],
            f"train.method {spec.train.method} takes no validation file"
            + (" (it holds out train.heldout_fraction of the pairs itself)" if spec.train.method == "reward" else ""),
        )
    files = [("source", spec.dataset.source, spec.dataset.limit), ("validation", spec.dataset.validation, None)]
    for key, source, limit in files:
        if source is None:
            continue
        path = Path(source).expanduser()
        loc = ["dataset", key]
        if not path.is_file():
            raise SpecError.one(loc, f"{source!r} is neither an uploaded file (file-…) nor a readable JSONL file")
        try:
            kind, rows = dataset.load(path, limit)
        except dataset.DatasetError as e:
            raise SpecError.one(loc, str(e)) from None
        wanted = dataset.KINDS_FOR_METHOD.get(spec.train.method, ())
        if kind not in wanted:
            raise SpecError.one(
                loc,
                f"train.method {spec.train.method} needs a {' or '.join(wanted) or 'generated'} dataset, "
                f"this one holds {kind} rows; see the dataset formats in the README",
            )
        for n, row in enumerate(rows, start=1):
            if missing := sorted(fields - set(row)):
                raise SpecError.one(
                    loc,
                    f"row {n} has no field {missing[0]!r}, which a grader reads as {{{{item.{missing[0]}}}}}; "
                    "add it to every row",
                )


def validate_job_spec(
    raw: Any, settings: Settings | None = None, files: FileLookup | None = None, jobs: JobVisible | None = None
) -> JobSpec:
    """A raw spec (parsed JSON/YAML) → a JobSpec, or SpecError listing every problem found.

    `files` resolves uploaded-file references within the caller's tenant, `jobs` says whether
    a job id is the caller's (a reward model, a path into a job's output); the spec returned
    keeps the `file-…` ids. Local paths must lie under the data roots (charter.access).
    """
    if not isinstance(raw, dict):
        raise SpecError.one(["body"], f"a job spec must be a JSON object, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([{"loc": list(err["loc"]), "msg": _pydantic_msg(err)} for err in e.errors()]) from None
    settings = settings or Settings.from_env()
    checked = spec
    # Paths first: a field whose path is refused is not opened, so no error tells what lies outside.
    _, errors = access.check_spec(spec, settings, jobs)
    refused = {tuple(e["loc"]) for e in errors}
    spec = resolve_files(spec, files)

    def collect(loc: list[str], fn: Any, *a: Any) -> None:
        if tuple(loc) in refused:
            return
        try:
            fn(*a)
        except SpecError as e:
            errors.extend(e.errors)
        except (ModelNotFound, CharterError) as e:
            errors.append({"loc": loc, "msg": str(e)})

    collect(["policy", "model"], models.resolve, spec.policy.model, settings, jobs)
    if spec.judge.base_url is None:
        collect(["judge", "model"], models.resolve, spec.judge_model, settings, jobs)
    elif not all(u.strip().startswith(("http://", "https://")) for u in spec.judge.base_url.split(",")):
        errors.append(
            {
                "loc": ["judge", "base_url"],
                "msg": "each base_url must start with http:// or https://, e.g. http://host:8000/v1",
            }
        )
    if ("constitution",) not in refused:
        try:
            constitution.load(spec.constitution)
        except ConstitutionError as e:
            errors += [{"loc": ["constitution"], "msg": m} for m in e.errors]
    if spec.prompts:
        collect(["prompts", "source"], prompts.load, spec.prompts.source, spec.prompts.limit, ("prompts", "source"))
    if spec.dataset:
        collect(["dataset", "source"], check_dataset, spec)
    if spec.evaluate:
        collect(
            ["evaluate", "prompts"], prompts.load, spec.evaluate.prompts, spec.evaluate.limit, ("evaluate", "prompts")
        )
    if probe := spec.train.monitors.probe:
        loc = ("train", "monitors", "probe", "prompts")
        collect(list(loc), prompts.load, probe.prompts, probe.limit, loc)
    errors += recipe_errors(spec)
    if not errors and trl_installed():  # the slow check: only ask it about an otherwise good spec
        errors += _validator.check(
            {
                "train": spec.train.model_dump(mode="json"),
                "recipe": bool(spec.recipe),
                "artifact_root": str(settings.artifact_root),
            }
        )
        for section, method in (("sft", "sft"), ("reward", "reward")):
            step = getattr(spec, section)
            if step is not None:  # the recipe's other steps: the same parser, errors under their own section
                found = _validator.check({"method": method, "args": step.args})
                errors += [{**e, "loc": [section, *e["loc"][1:]]} for e in found]
    if errors:
        raise SpecError(errors)
    return checked


def _pydantic_msg(err: dict[str, Any]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key; remove it or check its spelling against the job spec in the README"
    if err["type"] == "missing":
        return "required; add it to the spec"
    msg = err["msg"]
    if err["type"] == "literal_error":
        return f"{msg} (got {err.get('input')!r})"
    return msg.removeprefix("Value error, ")
