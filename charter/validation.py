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

from charter import constitution, dataset, models, prompts
from charter.errors import CharterError, ConstitutionError, ModelNotFound, SpecError
from charter.settings import Settings
from charter.spec import JobSpec

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

    def check(self, train: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            for _attempt in range(2):
                proc = self._ensure()
                try:
                    proc.stdin.write(json.dumps({"train": train, "cpu": _cpu_only()}) + "\n")
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
    if out.evaluate:
        out.evaluate.prompts = path(["evaluate", "prompts"], spec.evaluate.prompts)
    if errors:
        raise SpecError(errors)
    return out


def check_dataset(spec: JobSpec) -> None:
    """The dataset (resolved to a path) exists, parses, and is the kind its training method needs."""
    assert spec.dataset is not None
    path = Path(spec.dataset.source).expanduser()
    loc = ["dataset", "source"]
    if not path.is_file():
        raise SpecError.one(
            loc, f"{spec.dataset.source!r} is neither an uploaded file (file-…) nor a readable JSONL file"
        )
    try:
        kind, _ = dataset.load(path, spec.dataset.limit)
    except dataset.DatasetError as e:
        raise SpecError.one(loc, str(e)) from None
    wanted = dataset.KINDS_FOR_METHOD.get(spec.train.method, ())
    if kind not in wanted:
        raise SpecError.one(
            loc,
            f"train.method {spec.train.method} needs a {' or '.join(wanted) or 'generated'} dataset, "
            f"this one holds {kind} rows; see the dataset formats in the README",
        )


def validate_job_spec(raw: Any, settings: Settings | None = None, files: FileLookup | None = None) -> JobSpec:
    """A raw spec (parsed JSON/YAML) → a JobSpec, or SpecError listing every problem found.

    `files` resolves uploaded-file references within the caller's tenant; the spec returned
    keeps the `file-…` ids.
    """
    if not isinstance(raw, dict):
        raise SpecError.one(["body"], f"a job spec must be a JSON object, got {type(raw).__name__}")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError([{"loc": list(err["loc"]), "msg": _pydantic_msg(err)} for err in e.errors()]) from None
    checked = spec
    spec = resolve_files(spec, files)
    errors: list[dict[str, Any]] = []

    def collect(loc: list[str], fn: Any, *a: Any) -> None:
        try:
            fn(*a)
        except SpecError as e:
            errors.extend(e.errors)
        except (ModelNotFound, CharterError) as e:
            errors.append({"loc": loc, "msg": str(e)})

    collect(["policy", "model"], models.resolve, spec.policy.model, settings)
    if spec.judge.base_url is None:
        collect(["judge", "model"], models.resolve, spec.judge_model, settings)
    elif not all(u.strip().startswith(("http://", "https://")) for u in spec.judge.base_url.split(",")):
        errors.append(
            {
                "loc": ["judge", "base_url"],
                "msg": "each base_url must start with http:// or https://, e.g. http://host:8000/v1",
            }
        )
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
    if not errors and trl_installed():  # the slow check: only ask it about an otherwise good spec
        errors += _validator.check(spec.train.model_dump(mode="json"))
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
