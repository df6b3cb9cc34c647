"""The HTTP API: submit, follow and cancel jobs.

    uvicorn --factory charter.service.api:app_from_env      # or `charter serve`
    curl -X POST localhost:8400/v1/jobs -H 'content-type: application/json' -d @job.json

`build_app()` makes the app; the store, settings and (optionally) an embedded worker live
on `app.state`. Routes stay thin; every error becomes an HTTP status in `_handlers` only.
"""

from __future__ import annotations

import asyncio
import io
import mimetypes
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

import charter
from charter import plots
from charter.errors import CharterError, SpecError
from charter.service import artifacts, files, openai_api
from charter.service.auth import PrincipalDep
from charter.service.db import Event, Job, JobStatus, schema_status, upgrade
from charter.service.files import FileStore
from charter.service.keys import KeyStore
from charter.service.middleware import AccessLog, BodyLimit
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
    tenant: str
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


class ArtifactPublic(BaseModel):
    name: str  # download with GET /v1/jobs/{id}/artifacts/{name}
    kind: Literal["file", "dir"]  # a dir downloads as a .tar
    bytes: int
    path: str  # inside the job's folder


class ArtifactsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ArtifactPublic]


# -- routes -------------------------------------------------------------------------


def get_store(request: Request) -> JobStore:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


StoreDep = Annotated[JobStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
router = APIRouter()
SSE_POLL_S = 0.5
MAX_ID = 2**63 - 1  # event ids are 64-bit integers in every database
SSE_KEEPALIVE_S = 15.0


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The service is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "database unreachable or its schema not at head"}})
def readyz(store: StoreDep) -> JSONResponse:
    """The service can serve: the database answers and its schema is the newest."""
    try:
        current, heads = schema_status(store.engine)
    except Exception as exc:
        return JSONResponse(
            {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}: {exc}"[:500]}, status_code=503
        )
    if current != heads:
        got, want = ",".join(sorted(current)) or "empty", ",".join(sorted(heads))
        return JSONResponse(
            {
                "status": "unavailable",
                "database": "ok",
                "migrations": f"the schema is at {got}, charter needs {want}; start `charter serve` or run `alembic upgrade head`",
            },
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "migrations": ",".join(sorted(current))})


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus text format: jobs by status, stage durations, queue wait, tokens/s."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    collector = request.app.state.metrics
    collector.update()
    return Response(generate_latest(collector.registry), media_type=CONTENT_TYPE_LATEST)


# A plain def: validation may block for seconds (TRL's parser), so it runs in the threadpool.
@router.post(
    "/v1/jobs",
    status_code=201,
    responses={413: {"description": "body too large"}, 429: {"description": "too many jobs queued"}},
)
def create_job(
    raw: JobCreate, store: StoreDep, settings: SettingsDep, principal: PrincipalDep, request: Request
) -> JobPublic:
    """Validate a job spec and queue the job for the caller's tenant."""
    from charter.validation import validate_job_spec

    uploads = FileStore.of(request)
    spec = validate_job_spec(
        raw,
        settings,
        lambda file_id: uploads.path(file_id, principal.scope),
        lambda job_id: store.visible(job_id, principal.scope),  # another tenant's job reads as missing
    )
    job = store.create_job(
        spec.model_dump(mode="json"),
        name=spec.name,
        tenant=principal.tenant,
        labels=spec.resources.labels,
        max_queued=settings.max_queued_jobs,
    )
    return JobPublic.of(job)


@router.get("/v1/jobs")
def read_jobs(
    store: StoreDep,
    principal: PrincipalDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    status: JobStatus | None = None,
) -> JobsPublic:
    """List the tenant's jobs (an admin: everyone's), newest first."""
    jobs = [JobPublic.of(job) for job in store.list_jobs(limit, status, principal.scope)]
    return JobsPublic(data=jobs, count=len(jobs))


@router.get("/v1/jobs/{job_id}")
def read_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> JobPublic:
    """One job, with its report and artifacts once it succeeded."""
    return JobPublic.of(store.get_job(job_id, principal.scope))


@router.get(
    "/v1/jobs/{job_id}/events",
    response_model=EventsPublic,
    responses={200: {"content": {"text/event-stream": {}}, "description": "JSON pages, or SSE when asked"}},
)
def read_events(
    job_id: str,
    request: Request,
    store: StoreDep,
    principal: PrincipalDep,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_ID)] = None,
) -> Any:
    """A job's events with id > after, oldest first: a JSON page, or with `Accept: text/event-stream`
    a Server-Sent Events stream that follows the job until it ends (resumable with Last-Event-ID)."""
    if "text/event-stream" in request.headers.get("accept", ""):
        job = store.get_job(job_id, principal.scope)
        start = last_event_id if last_event_id is not None else after
        if job.status.finished and not store.events(job_id, start, 1):
            return Response(status_code=204)  # nothing more will come: tells EventSource not to reconnect
        return StreamingResponse(
            _event_stream(store, job_id, start),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    events: list[Event] = store.events(job_id, after, limit, principal.scope)
    return EventsPublic(
        data=[EventPublic.model_validate(e) for e in events], last_id=events[-1].id if events else after
    )


async def _event_stream(store: JobStore, job_id: str, after: int) -> AsyncIterator[str]:
    """SSE frames (id = event id, event = type, data = the event's JSON) until the job has ended."""
    yield "retry: 2000\n\n"
    last_sent = time.monotonic()
    while True:
        job = await run_in_threadpool(store.get_job, job_id)  # read first: no event of a finished job is missed
        while True:
            events = await run_in_threadpool(store.events, job_id, after, 500)
            for e in events:
                after = e.id
                yield f"id: {e.id}\nevent: {e.type}\ndata: {EventPublic.model_validate(e).model_dump_json()}\n\n"
                last_sent = time.monotonic()
            if len(events) < 500:
                break
        if job.status.finished:
            yield f"event: end\ndata: {JobPublic.of(job).model_dump_json(include={'id', 'status', 'error'})}\n\n"
            return
        if time.monotonic() - last_sent > SSE_KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(SSE_POLL_S)


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(job_id: str, store: StoreDep, principal: PrincipalDep) -> JobPublic:
    """Cancel a queued job now, or ask a running job's worker to stop it."""
    return JobPublic.of(store.request_cancel(job_id, principal.scope))


def _artifact_names(store: JobStore, job: Job) -> dict[str, Any]:
    announced: dict[str, str] = {}
    if not job.result:  # still running: what its artifact events announced so far
        after = 0
        while page := store.events(job.id, after, 1000):
            after = page[-1].id
            announced |= {e.data["name"]: e.data["path"] for e in page if e.type == "artifact" and "path" in e.data}
    return artifacts.named(job.id, job.result, announced)


class NoMetricsYet(CharterError):
    """The job has logged no training metrics yet, so there is nothing to plot."""

    status_code = 404


@router.get(
    "/v1/jobs/{job_id}/plot.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such job, or no metrics yet"}},
)
def read_plot(job_id: str, store: StoreDep, principal: PrincipalDep) -> Response:
    """The training curve so far (loss, reward per source, KL, completion length) as a PNG, drawn from the job's metrics events."""
    job = store.get_job(job_id, principal.scope)
    history: list[dict[str, Any]] = []
    after = 0
    while page := store.events(job.id, after, 1000, types=("metrics",)):
        after = page[-1].id
        history += [e.data for e in page if e.data.get("stage", "train") == "train" and "step" in e.data]
    if not history:
        raise NoMetricsYet(
            f"job {job.id} has logged no training metrics yet (status: {job.status.value}); "
            "the plot appears once training logs its first step"
        )
    png = io.BytesIO()
    plots.plot_curve(history, png, job.spec.get("train", {}).get("method", "training"))
    return Response(png.getvalue(), media_type="image/png", headers={"Cache-Control": "no-cache"})


@router.get("/v1/jobs/{job_id}/artifacts")
def read_artifacts(job_id: str, store: StoreDep, settings: SettingsDep, principal: PrincipalDep) -> ArtifactsPublic:
    """The job's artifacts on disk: datasets, adapter or model, plot, report, log."""
    job = store.get_job(job_id, principal.scope)
    listed = artifacts.describe(settings.artifact_root / job.id, _artifact_names(store, job))
    return ArtifactsPublic(data=[ArtifactPublic(**a) for a in listed])


MEDIA_TYPES = {".jsonl": "application/jsonl", ".log": "text/plain", ".yaml": "application/yaml"}


@router.get(
    "/v1/jobs/{job_id}/artifacts/{name:path}",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}, "application/x-tar": {}}}},
)
def read_artifact(job_id: str, name: str, store: StoreDep, settings: SettingsDep, principal: PrincipalDep) -> Response:
    """One artifact, by name or by relative path inside the job's folder: a file as it is, a folder as a .tar."""
    job = store.get_job(job_id, principal.scope)
    path = artifacts.resolve(settings.artifact_root / job.id, job.id, name, _artifact_names(store, job))
    if path.is_dir():
        arcname = Path(name).name or job.id
        return StreamingResponse(
            artifacts.stream_tar(path, arcname),
            media_type="application/x-tar",
            headers={"Content-Disposition": f'attachment; filename="{arcname}.tar"'},
        )
    media = MEDIA_TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media, filename=path.name)


# -- errors: the one place they become HTTP ------------------------------------------


def _charter_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CharterError)
    detail: Any = exc.errors if isinstance(exc, SpecError) else str(exc)
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


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
    """The API; with `start_worker`, a worker thread runs jobs inside this process too.

    Refuses (SettingsError) to serve without API keys on anything but a loopback address.
    """
    from charter.service.metrics import StoreMetrics  # prometheus_client: loaded by an app, not by the CLI

    settings.check_auth()
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
    app.state.keys, app.state.metrics = KeyStore(store.engine), StoreMetrics(store)
    app.state.worker_stop, app.state.worker_thread = None, None
    app.include_router(router)
    app.include_router(files.router)
    app.include_router(openai_api.router)
    app.add_exception_handler(CharterError, _charter_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    uploads = [("/v1/files", settings.max_upload_bytes, "CHARTER_MAX_UPLOAD_BYTES")]
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, setting="CHARTER_MAX_BODY_BYTES", overrides=uploads)
    app.add_middleware(AccessLog)
    return app


def app_from_env() -> FastAPI:
    """`uvicorn --factory charter.service.api:app_from_env`: settings from the environment, worker embedded."""
    return build_app(Settings.from_env(), start_worker=True)
