"""OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`) over charter jobs.

    client = openai.OpenAI(base_url="http://127.0.0.1:8400/v1", api_key="…")
    f = client.files.create(file=open("sft.jsonl", "rb"), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="smollm2-135m", training_file=f.id,
                                         method={"type": "supervised"},
                                         extra_body={"charter": {"lora": {"r": 16}}})

A request becomes a charter job spec that trains on the uploaded file (`dataset:`), and is
validated like any other spec, so a bad field is a 400 naming the OpenAI parameter:

| OpenAI                                   | charter                                             |
|------------------------------------------|-----------------------------------------------------|
| method.type supervised / dpo / reinforcement | train.method sft / dpo / grpo                   |
| training_file, validation_file           | dataset.source, dataset.validation (eval_loss → `valid_loss`) |
| reinforcement.grader                     | train.rewards: [{type: grader, grader}] (charter/graders.py); a score_model's model is the judge |
| hyperparameters n_epochs                 | train.args.num_train_epochs                         |
| batch_size                               | train.args.per_device_train_batch_size              |
| learning_rate_multiplier                 | train.args.learning_rate = multiplier × TRL's default for the method |
| beta (dpo)                               | train.args.beta                                     |
| eval_interval (with a validation_file)   | train.args.eval_steps                               |
| compute_multiplier, eval_samples, reasoning_effort | refused unless auto/default: no TRL counterpart; use charter.args (num_generations …) |
| seed, metadata, suffix                   | data.seed, metadata, name                           |
| extra body `charter: {lora, constitution, judge, evaluate, args}` | the spec's own sections; `lora` defaults to {r: 16, alpha: 32}, null trains every weight |

Every charter job is also visible here as a `fine_tuning.job`. Statuses map one to one
(`cancelling` shows as `running` until the job stops).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy.orm import Session

from charter import graders
from charter.errors import SpecError
from charter.service.auth import Principal, PrincipalDep
from charter.service.db import Event, Job, JobStatus
from charter.service.files import FileStore
from charter.service.openai_errors import OpenAIError, OpenAIRoute
from charter.service.store import JobNotFound, JobStore

METHODS = {"supervised": "sft", "dpo": "dpo", "reinforcement": "grpo"}
OPENAI_TYPE = {v: k for k, v in METHODS.items()}
# TRL's default learning_rate per config class: the base learning_rate_multiplier scales.
BASE_LR = {"sft": 2e-5, "dpo": 1e-6, "grpo": 1e-6}
HYPER_TO_TRL = {"n_epochs": "num_train_epochs", "batch_size": "per_device_train_batch_size", "beta": "beta"}
DEFAULT_LORA = {"r": 16, "alpha": 32}
# A spec field → the OpenAI request parameter a user sent it as.
PARAMS = {
    "dataset.source": "training_file",
    "dataset.validation": "validation_file",
    "policy.model": "model",
    "name": "suffix",
    "data.seed": "seed",
}
GRADER_TYPES = ("string_check", "text_similarity", "score_model", "multi")
STATUS = {JobStatus.CANCELLING: "running"}
LEVEL = {"warning": "warn"}
# TRL's log keys → the names OpenAI's metrics events and checkpoints use.
METRIC_NAMES = {
    "loss": "train_loss",
    "mean_token_accuracy": "train_mean_token_accuracy",
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
}


# -- the request ------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="forbid")


Positive = Annotated[float, Field(gt=0)]
Count = Annotated[int, Field(ge=1)]


class Hyperparameters(_Open):
    n_epochs: Count | Literal["auto"] | None = None
    batch_size: Count | Literal["auto"] | None = None
    learning_rate_multiplier: Positive | Literal["auto"] | None = None
    beta: Positive | Literal["auto"] | None = None  # dpo only
    # reinforcement only; accepted and ignored where TRL has no such knob
    compute_multiplier: float | Literal["auto"] | None = None
    eval_interval: int | Literal["auto"] | None = None
    eval_samples: int | Literal["auto"] | None = None
    reasoning_effort: str | None = None


class MethodBody(_Open):
    hyperparameters: Hyperparameters | None = None
    grader: dict[str, Any] | None = None  # reinforcement only


class Method(_Open):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None
    reinforcement: MethodBody | None = None


class CharterExtras(_Open):
    """charter's own settings, sent as the extra body field `charter`."""

    lora: dict[str, Any] | None = Field(default_factory=lambda: dict(DEFAULT_LORA))
    constitution: str | dict[str, Any] | None = None
    judge: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None
    args: dict[str, Any] = Field(default_factory=dict, description="More TRL config keys for train.args.")


class FineTuningJobCreate(_Open):
    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for supervised hyperparameters
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    validation_file: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    charter: CharterExtras = Field(default_factory=CharterExtras)


# -- the response -----------------------------------------------------------------------


class JobErrorPublic(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str | None
    validation_file: str | None = None
    result_files: list[str] = []
    trained_tokens: int | None
    error: JobErrorPublic | None
    seed: int
    metadata: dict[str, str] | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    user_provided_suffix: str | None = None


class FineTuningJobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningJobPublic]
    has_more: bool


class FineTuningEventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any]


class FineTuningEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FineTuningEventPublic]
    has_more: bool


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, float]


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


# -- request → spec ---------------------------------------------------------------------


def to_spec(body: FineTuningJobCreate) -> dict[str, Any]:
    """An OpenAI create request → a charter job spec (validated afterwards like any spec)."""
    method = body.method or Method(type="supervised")
    kind = METHODS[method.type]
    if body.integrations:
        raise OpenAIError(400, "integrations are not supported; follow a job with its events", "integrations")
    section: MethodBody = getattr(method, method.type) or MethodBody()
    if section.grader is not None and kind != "grpo":
        raise OpenAIError(400, "a grader is read by reinforcement jobs only", f"method.{method.type}.grader")
    hyper = section.hyperparameters or body.hyperparameters or Hyperparameters()
    args = _train_args(hyper, kind, f"method.{method.type}.hyperparameters", body.validation_file is not None)
    train: dict[str, Any] = {"method": kind, "lora": body.charter.lora, "args": {**args, **body.charter.args}}
    spec: dict[str, Any] = {
        "name": body.suffix or f"{method.type}-{Path(body.model).name}",
        "policy": {"model": body.model},
        "dataset": {"source": body.training_file},
        "train": train,
        "metadata": body.metadata or {},
    }
    if body.validation_file:
        spec["dataset"]["validation"] = body.validation_file
    if kind == "grpo":
        grader = _grader(section.grader)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", grader.name or grader.type)[:64]
        train["rewards"] = [{"type": "grader", "name": name, "grader": section.grader}]
        if judge := _score_model_judge(grader):
            spec["judge"] = {"model": judge}
    if body.seed is not None:
        spec["data"] = {"seed": body.seed}
    for key in ("constitution", "judge", "evaluate"):
        if (value := getattr(body.charter, key)) is not None:
            spec[key] = value
    return spec


def _train_args(hyper: Hyperparameters, kind: str, where: str, validation: bool) -> dict[str, Any]:
    """OpenAI's hyperparameters → TRL config keys; those with no TRL counterpart are refused."""
    for key in ("compute_multiplier", "eval_samples"):
        if getattr(hyper, key) not in (None, "auto"):
            raise OpenAIError(
                400,
                f"{key} has no TRL counterpart; leave it auto and set TRL keys in extra_body charter.args "
                "(e.g. num_generations, per_device_eval_batch_size)",
                f"{where}.{key}",
            )
    if hyper.reasoning_effort not in (None, "default"):
        raise OpenAIError(
            400, "reasoning_effort is for OpenAI's reasoning models; leave it default", f"{where}.reasoning_effort"
        )
    args: dict[str, Any] = {}
    for key, trl_key in HYPER_TO_TRL.items():
        value = getattr(hyper, key)
        if value not in (None, "auto"):
            if key == "beta" and kind != "dpo":
                raise OpenAIError(400, "beta is a dpo hyperparameter", f"{where}.beta")
            args[trl_key] = value
    if hyper.learning_rate_multiplier not in (None, "auto"):
        args["learning_rate"] = hyper.learning_rate_multiplier * BASE_LR[kind]
    if hyper.eval_interval not in (None, "auto"):
        if not validation:
            raise OpenAIError(400, "eval_interval needs a validation_file to evaluate on", f"{where}.eval_interval")
        args["eval_steps"] = hyper.eval_interval
    return args


def _grader(raw: dict[str, Any] | None) -> Any:
    """The reinforcement grader, checked here so that errors name OpenAI's parameter."""
    param = "method.reinforcement.grader"
    if raw is None:
        raise OpenAIError(400, f"reinforcement needs a grader ({', '.join(GRADER_TYPES)}); see the README", param)
    try:
        return TypeAdapter(graders.Grader).validate_python(raw)
    except ValidationError as e:
        msgs, first = [], None
        for err in e.errors():
            loc = [str(p) for p in err["loc"] if str(p) not in GRADER_TYPES]
            where = ".".join([param, *loc])
            first = first or where
            detail = err["msg"].removeprefix("Value error, ")
            if err["type"] == "union_tag_invalid":
                inside = " inside a multi grader" if loc else ""
                allowed = GRADER_TYPES if not loc else GRADER_TYPES[:-1]
                detail = (
                    f"grader type {err['input'].get('type')!r} is not supported{inside}; "
                    f"use one of {', '.join(allowed)}"
                )
            msgs.append(f"{where}: {detail}")
        raise OpenAIError(400, "; ".join(msgs), first, "invalid_grader") from None


def _score_models(g: Any) -> list[str]:
    if g.type == "score_model":
        return [g.model]
    return [m for sub in g.graders.values() for m in _score_models(sub)] if g.type == "multi" else []


def _score_model_judge(g: Any) -> str | None:
    """The model a grader's score_model names: the job's judge (charter has one per job)."""
    models = sorted(set(_score_models(g)))
    if len(models) > 1:
        raise OpenAIError(
            400,
            f"score_model graders name different models ({', '.join(models)}); charter has one judge per job",
            "method.reinforcement.grader",
        )
    return models[0] if models else None


# -- job → response ---------------------------------------------------------------------


def _unix(t: datetime | None) -> int | None:
    return int(t.timestamp()) if t else None


def job_public(job: Job, trained_tokens: int | None) -> FineTuningJobPublic:
    spec = job.spec
    train = spec.get("train", {})
    args = train.get("args", {})
    kind = train.get("method", "sft")
    hyper = {
        "n_epochs": args.get("num_train_epochs", "auto"),
        "batch_size": args.get("per_device_train_batch_size", "auto"),
        "learning_rate_multiplier": args["learning_rate"] / BASE_LR[kind]
        if "learning_rate" in args and kind in BASE_LR
        else "auto",
    }
    if kind == "dpo":
        hyper["beta"] = args.get("beta", "auto")
    otype = OPENAI_TYPE.get(kind, kind)
    body: dict[str, Any] = {"hyperparameters": hyper}
    grader = [r["grader"] for r in train.get("rewards") or [] if r.get("type") == "grader"]
    if grader:
        body["grader"] = grader[0]
    model = spec.get("policy", {}).get("model", "")
    finished = job.status == JobStatus.SUCCEEDED
    return FineTuningJobPublic(
        id=job.id,
        created_at=_unix(job.created_at),
        finished_at=_unix(job.finished_at),
        model=model,
        fine_tuned_model=f"ft:{Path(model).name}:charter:{job.name}:{job.id}" if finished else None,
        organization_id=job.tenant,
        status=STATUS.get(job.status, job.status.value),
        hyperparameters=hyper,
        method={"type": otype, otype: body},
        training_file=(spec.get("dataset") or spec.get("prompts") or {}).get("source"),
        validation_file=(spec.get("dataset") or {}).get("validation"),
        trained_tokens=trained_tokens if finished else None,
        error=JobErrorPublic(code="job_failed", message=job.error or "failed")
        if job.status == JobStatus.FAILED
        else None,
        seed=(spec.get("data") or {}).get("seed", 0),
        metadata=spec.get("metadata") or None,
        user_provided_suffix=job.name,
    )


def event_public(e: Event) -> FineTuningEventPublic:
    d = e.data
    if e.type == "metrics":
        d = {**d, **{METRIC_NAMES[k]: v for k, v in d.items() if k in METRIC_NAMES}}
        numbers = ", ".join(
            f"{k}={v:.4g}" for k, v in d.items() if k not in ("step", "epoch", "stage") and isinstance(v, float)
        )
        message = f"Step {d.get('step')}: {numbers}"
    elif e.type == "stage":
        extra = ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("stage", "state") and v is not None)
        message = f"{d.get('stage')} {d.get('state')}" + (f" ({extra})" if extra else "")
    elif e.type == "artifact":
        message = f"artifact {d.get('name')}: {d.get('path')}"
    else:
        message = str(d.get("message", ""))
    return FineTuningEventPublic(
        id=f"ftevent-{e.id}",
        created_at=_unix(e.time),
        level=LEVEL.get(e.level, e.level) if e.level in ("info", "warning", "error") else "info",
        message=message,
        type="metrics" if e.type == "metrics" else "message",
        data=d,
    )


# -- the store, as these routes need it ----------------------------------------------------
# Another tenant's job looks exactly like a missing one.


def _visible(job: Job, principal: Principal) -> bool:
    return principal.scope is None or job.tenant == principal.scope


def _get(store: JobStore, job_id: str, principal: Principal) -> Job:
    job = store.get_job(job_id)
    if not _visible(job, principal):
        raise JobNotFound(job_id)
    return job


def _metrics(store: JobStore, job_id: str) -> list[dict[str, Any]]:
    with Session(store.engine) as s:
        rows = s.scalars(
            sa.select(Event.data).where(Event.job_id == job_id, Event.type == "metrics").order_by(Event.id)
        )
        return list(rows)


def _trained_tokens(store: JobStore, job: Job) -> int | None:
    if job.status != JobStatus.SUCCEEDED:
        return None
    tokens = [m["num_tokens"] for m in _metrics(store, job.id) if isinstance(m.get("num_tokens"), int | float)]
    return int(max(tokens)) if tokens else None


def _cursor(value: str | None, prefix: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value.removeprefix(prefix))
    except ValueError:
        raise OpenAIError(
            400, f"after must be an id from a previous page ({prefix}…), got {value!r}", "after"
        ) from None


def _param(loc: list[Any], body: FineTuningJobCreate) -> str:
    """A spec field's location → the OpenAI request parameter the user sent it as."""
    field = ".".join(map(str, loc))
    if field.startswith("train.args"):
        return f"method.{(body.method or Method(type='supervised')).type}.hyperparameters"
    if field.startswith("train.rewards"):
        return "method.reinforcement.grader"
    if field == "judge.model" and body.charter.judge is None:
        return "method.reinforcement.grader.model"  # the judge came from a score_model grader
    return PARAMS.get(field) or (f"charter.{field}" if field else "body")


def get_store(request: Request) -> JobStore:
    return request.app.state.store


StoreDep = Annotated[JobStore, Depends(get_store)]
router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning (OpenAI)"], route_class=OpenAIRoute)


# A plain def: validation may block for seconds (TRL's parser), so it runs in the threadpool.
@router.post("")
def create_fine_tuning_job(
    body: FineTuningJobCreate, store: StoreDep, principal: PrincipalDep, request: Request
) -> FineTuningJobPublic:
    """Create a fine-tuning job on an uploaded file (OpenAI's shape)."""
    from charter.validation import validate_job_spec

    uploads = FileStore.of(request)
    raw = to_spec(body)
    try:
        spec = validate_job_spec(
            raw,
            request.app.state.settings,
            lambda fid: uploads.path(fid, principal.scope),
            lambda job_id: store.visible(job_id, principal.scope),
        )
    except SpecError as e:
        raise OpenAIError(
            400,
            "; ".join(f"{_param(err['loc'], body)}: {err['msg']}" for err in e.errors),
            _param(e.errors[0]["loc"], body),
        ) from None
    settings = request.app.state.settings
    job = store.create_job(
        spec.model_dump(mode="json", exclude_unset=False),
        name=spec.name,
        tenant=principal.tenant,
        labels=spec.resources.labels,
        max_queued=settings.max_queued_jobs,
    )
    return job_public(job, None)


@router.get("")
def list_fine_tuning_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> FineTuningJobsPublic:
    """Jobs, newest first; `after` is the last id of the previous page."""
    query = sa.select(Job).order_by(Job.created_at.desc(), Job.id.desc())
    if principal.scope is not None:
        query = query.where(Job.tenant == principal.scope)
    if after:
        cursor = _get(store, after, principal)
        query = query.where(
            sa.or_(Job.created_at < cursor.created_at, sa.and_(Job.created_at == cursor.created_at, Job.id < after))
        )
    with Session(store.engine) as s:
        jobs = list(s.scalars(query.limit(limit + 1)))
    page = [job_public(j, _trained_tokens(store, j)) for j in jobs[:limit]]
    return FineTuningJobsPublic(data=page, has_more=len(jobs) > limit)


@router.get("/{job_id}")
def read_fine_tuning_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> FineTuningJobPublic:
    """One job."""
    job = _get(store, job_id, principal)
    return job_public(job, _trained_tokens(store, job))


@router.post("/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> FineTuningJobPublic:
    """Cancel a job: at once if queued, within seconds if running."""
    _get(store, job_id, principal)
    return job_public(store.request_cancel(job_id), None)


@router.get("/{job_id}/events")
def list_fine_tuning_events(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> FineTuningEventsPublic:
    """A job's events, newest first; `after` is the last id of the previous page (older events follow)."""
    _get(store, job_id, principal)
    query = sa.select(Event).where(Event.job_id == job_id).order_by(Event.id.desc()).limit(limit + 1)
    if (before := _cursor(after, "ftevent-")) is not None:
        query = query.where(Event.id < before)
    with Session(store.engine) as s:
        events = list(s.scalars(query))
    return FineTuningEventsPublic(data=[event_public(e) for e in events[:limit]], has_more=len(events) > limit)


@router.get("/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(
    job_id: str,
    store: StoreDep,
    principal: PrincipalDep,
    request: Request,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> CheckpointsPublic:
    """Saved checkpoints (TRL's `checkpoint-N` folders, then the final model), newest first."""
    job = _get(store, job_id, principal)
    train_dir = request.app.state.settings.artifact_root / job.id / "train"
    found: list[tuple[int, Path]] = []
    for d in (train_dir / "checkpoints").glob("checkpoint-*"):
        if d.is_dir() and d.name.removeprefix("checkpoint-").isdigit():
            found.append((int(d.name.removeprefix("checkpoint-")), d))
    if job.status == JobStatus.SUCCEEDED:
        for final in (train_dir / "adapter", train_dir / "model"):
            if final.is_dir():
                steps = ((job.result or {}).get("report") or {}).get("train", {}).get("steps") or 0
                found.append((int(steps), final))
    by_step: dict[int, dict[str, float]] = {}
    for m in _metrics(store, job.id):
        if isinstance(m.get("step"), int):
            by_step.setdefault(m["step"], {}).update(
                {METRIC_NAMES.get(k, k): float(v) for k, v in m.items() if isinstance(v, int | float)}
            )
    base = job_public(job, None).fine_tuned_model or f"ft:{job.id}"
    items = [
        CheckpointPublic(
            id=f"ftckpt-{job.id}-{step}-{path.name}",
            created_at=int(path.stat().st_mtime),
            fine_tuned_model_checkpoint=f"{base}:{path.name}:step-{step}",
            fine_tuning_job_id=job.id,
            step_number=step,
            metrics={"step": float(step), **by_step.get(step, {})},
        )
        for step, path in sorted(found, key=lambda x: (x[0], x[1].name in ("adapter", "model")), reverse=True)
    ]
    if after:
        ids = [c.id for c in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[:limit]
    return CheckpointsPublic(
        data=page,
        has_more=len(items) > limit,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
    )
