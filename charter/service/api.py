"""The HTTP API: submit, follow and cancel jobs.

    uvicorn --factory charter.service.api:app_from_env      # or `charter serve`
    curl -X POST localhost:8400/v1/jobs -H 'content-type: application/json' -d @job.json

`build_app()` makes the app; the store, settings and (optionally) an embedded worker live
on `app.state`. Routes stay thin; every error becomes an HTTP status in `_handlers` only.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

import charter
from charter.errors import CharterError, SpecError
from charter.service import files, openai_api
from charter.service.auth import PrincipalDep
from charter.service.db import Event, Job, JobStatus, upgrade
from charter.service.files import FileStore
from charter.service.store import JobStore
from charter.service.worker import Worker
from charter.settings import Settings

# -- schemas ------------------------------------------------------------------------

JobCreate = Annotated[
    dict[str, Any],
    Body(
        description="A job spec (charter.spec.JobSpec): name, policy, judge, constitution, prompts or dataset, data, train, evaluate.",
        examples=[
            {
                "name": "harmless-dpo-demo",
                "policy": {"model": "smollm2-135m"},
                "prompts": {"source": "builtin:red-team", "limit": 32},
                "data": {"samples_per_prompt": 2, "revision_rounds": 1, "labels": "ai"},
                "train": {"method": "dpo", "lora": {"r": 16, "alpha": 32}, "args": {"beta": 0.1}},
                "evaluate": {"prompts": "builtin:red-team-heldout", "limit": 32},
            }
        ],
    ),
]


class JobPublic(BaseModel):
    id: str
    name: str
    status: JobStatus
    stage: str | None
    progress: dict[str, Any] | None
    error: str | None
    attempt: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    spec: dict[str, Any]
    report: dict[str, Any] | None  # result.report: the evaluation summary
    artifacts: dict[str, Any]  # result.artifacts: name → path

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        result = job.result or {}
        return cls(
            **{k: getattr(job, k) for k in cls.model_fields if k not in ("report", "artifacts")},
            report=result.get("report"),
            artifacts=result.get("artifacts") or {},
        )


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    count: int


class EventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    job_id: str
    time: datetime
    level: str
    type: str
    data: dict[str, Any]


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    last_id: int  # pass it back as `after` to get the next events


# -- routes -------------------------------------------------------------------------


def get_store(request: Request) -> JobStore:
    return request.app.state.store


StoreDep = Annotated[JobStore, Depends(get_store)]
router = APIRouter()


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The service is up."""
    return {"status": "ok"}


# A plain def: validation may block for seconds (TRL's parser), so it runs in the threadpool.
@router.post("/v1/jobs", status_code=201)
def create_job(raw: JobCreate, store: StoreDep, request: Request, principal: PrincipalDep) -> JobPublic:
    """Validate a job spec and queue the job."""
    from charter.validation import validate_job_spec

    uploads = FileStore.of(request)
    spec = validate_job_spec(raw, request.app.state.settings, lambda file_id: uploads.path(file_id, principal.scope))
    return JobPublic.of(store.create_job(spec.model_dump(mode="json"), name=spec.name))


@router.get("/v1/jobs")
def read_jobs(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    status: JobStatus | None = None,
) -> JobsPublic:
    """List jobs, newest first."""
    jobs = [JobPublic.of(job) for job in store.list_jobs(limit, status)]
    return JobsPublic(data=jobs, count=len(jobs))


@router.get("/v1/jobs/{job_id}")
def read_job(job_id: str, store: StoreDep) -> JobPublic:
    """One job, with its report and artifacts once it succeeded."""
    return JobPublic.of(store.get_job(job_id))


@router.get("/v1/jobs/{job_id}/events")
def read_events(
    job_id: str,
    store: StoreDep,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventsPublic:
    """A job's events with id > after, oldest first."""
    events: list[Event] = store.events(job_id, after, limit)
    return EventsPublic(
        data=[EventPublic.model_validate(e) for e in events], last_id=events[-1].id if events else after
    )


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(job_id: str, store: StoreDep) -> JobPublic:
    """Cancel a queued job now, or ask a running job's worker to stop it."""
    return JobPublic.of(store.request_cancel(job_id))


# -- errors: the one place they become HTTP ------------------------------------------


def _charter_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CharterError)
    detail: Any = exc.errors if isinstance(exc, SpecError) else str(exc)
    return JSONResponse({"detail": detail}, status_code=exc.status_code)


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": [_readable(e) for e in exc.errors()]}, status_code=422)


_JSON_KINDS = {"list": "an array", "str": "a string", "int": "a number", "float": "a number", "bool": "a boolean"}


def _readable(err: Any) -> dict[str, Any]:
    """FastAPI's error for a bad request, reworded where the default says little."""
    loc, kind = list(err.get("loc", [])), err.get("type")
    if kind == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "")
        at = f" at character {loc[1]}" if len(loc) > 1 else ""
        return {"loc": ["body"], "msg": f"the request body is not valid JSON: {reason}{at}"}
    if loc == ["body"] and kind == "dict_type" and isinstance(err.get("input"), bytes):
        return {"loc": ["body"], "msg": "send the job spec as JSON with the header content-type: application/json"}
    if loc == ["body"] and kind == "dict_type":
        got = _JSON_KINDS.get(type(err.get("input")).__name__, "something else")
        return {
            "loc": ["body"],
            "msg": f"the job spec must be a JSON object (name, policy, prompts, train, …), not {got}",
        }
    if loc == ["body"] and kind == "missing":
        return {"loc": ["body"], "msg": "the request has no body; send the job spec as a JSON object"}
    return {"loc": loc, "msg": err.get("msg", "invalid")}


# -- the app ------------------------------------------------------------------------


def build_app(settings: Settings, *, start_worker: bool) -> FastAPI:
    """The API; with `start_worker`, a worker thread runs jobs inside this process too."""
    store = JobStore.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upgrade(store.engine)
        # The TRL validator subprocess starts now, to be ready by the first submit; it lives as
        # long as this process (it exits when its stdin closes), shared by every app in it.
        from charter.validation import warm_up

        warm_up()
        stop = threading.Event()
        thread = None
        if start_worker:
            worker = Worker(store, settings)
            thread = threading.Thread(target=worker.run_forever, args=(stop,), name="charter-worker", daemon=True)
            thread.start()
        app.state.worker_stop, app.state.worker_thread = stop, thread
        try:
            yield
        finally:
            stop.set()
            if thread is not None:  # it stops its job's processes and puts the job back in the queue
                await asyncio.to_thread(thread.join, 30)
            store.engine.dispose()

    app = FastAPI(
        title="charter", version=charter.__version__, summary="Constitutional AI post-training jobs.", lifespan=lifespan
    )
    app.state.store, app.state.settings = store, settings
    app.state.worker_stop, app.state.worker_thread = None, None
    app.include_router(router)
    app.include_router(files.router)
    app.include_router(openai_api.router)
    app.add_exception_handler(CharterError, _charter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory charter.service.api:app_from_env`: settings from the environment, worker embedded."""
    return build_app(Settings.from_env(), start_worker=True)
