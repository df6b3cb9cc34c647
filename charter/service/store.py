"""JobStore: the only code that touches the database.

A worker's claim on a job is a lease: `claim()` hands the oldest queued job (or a running
job whose lease ran out, i.e. whose worker died) to one worker, bumps its attempt, and
the worker renews the lease with `heartbeat()`. Every write a worker makes names its
worker id and attempt; once another worker has taken the job over those no longer match
and the write raises LeaseLost, so a stale worker cannot overwrite the new one's work.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from charter.errors import CharterError
from charter.service.db import Event, Job, JobStatus, make_engine, utcnow
from charter.settings import Settings

_ACTIVE = (JobStatus.RUNNING, JobStatus.CANCELLING)


class JobNotFound(CharterError):
    """No job has this id."""

    status_code = 404

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id} not found; list jobs with GET /v1/jobs")


class TooManyQueued(CharterError):
    """The tenant already has as many jobs queued as CHARTER_MAX_QUEUED_JOBS allows."""

    status_code = 429
    headers = {"Retry-After": "30"}

    def __init__(self, tenant: str, limit: int):
        super().__init__(
            f"tenant {tenant} already has {limit} jobs queued, the limit (CHARTER_MAX_QUEUED_JOBS={limit}); "
            "wait until some have started, or cancel some"
        )


class JobFinished(CharterError):
    """The job already finished, so it cannot be cancelled."""

    status_code = 409

    def __init__(self, job: Job):
        super().__init__(f"job {job.id} already finished as {job.status.value}; nothing to cancel")


class LeaseLost(CharterError):
    """This worker no longer holds the job's lease (it expired and another worker took the job over)."""

    status_code = 409

    def __init__(self, job_id: str, attempt: int, worker_id: str | None = None):
        who = f"worker {worker_id}" if worker_id else "this worker"
        super().__init__(
            f"{who} lost its lease on job {job_id} (attempt {attempt}): another worker took the job over "
            "or it was put back in the queue, so writes of this attempt are refused"
        )


class JobStore:
    def __init__(self, engine: Engine, *, lease_seconds: float = 60.0):
        self.engine = engine
        self.lease = timedelta(seconds=lease_seconds)

    @classmethod
    def from_settings(cls, settings: Settings) -> JobStore:
        return cls(make_engine(settings.database_url), lease_seconds=settings.lease_seconds)

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        # A write holds SQLite's single write lock from its first statement (BEGIN IMMEDIATE),
        # so read-then-update sequences such as claim() cannot interleave between workers.
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if write:
                session.connection(execution_options={"sqlite_immediate": True})
            yield session

    # -- jobs, as the API sees them --------------------------------------------------
    # `scope` is the caller's tenant (None: an admin, or the worker): another tenant's job
    # raises JobNotFound, the same error as a missing one, so ids of others leak nothing.

    def create_job(
        self,
        spec: dict[str, Any],
        name: str,
        tenant: str = "default",
        labels: Sequence[str] = (),
        max_queued: int | None = None,
    ) -> Job:
        """Queue a job; refused (TooManyQueued) when its tenant already has `max_queued` jobs queued."""
        with self._session(write=True) as s:
            if max_queued is not None:
                if s.get_bind().dialect.name == "postgresql":  # two submits of one tenant count in turn
                    s.execute(sa.text("SELECT pg_advisory_xact_lock(8401, hashtext(:t))"), {"t": tenant})
                queued = s.scalar(
                    sa.select(sa.func.count())
                    .select_from(Job)
                    .where(Job.tenant == tenant, Job.status == JobStatus.QUEUED)
                )
                if (queued or 0) >= max_queued:
                    raise TooManyQueued(tenant, max_queued)
            job = Job(
                name=name,
                spec=spec,
                status=JobStatus.QUEUED,
                attempt=0,
                tenant=tenant,
                labels=",".join(sorted(set(labels))),
            )
            s.add(job)
            s.flush()
            return job

    def get_job(self, job_id: str, scope: str | None = None) -> Job:
        with self._session() as s:
            return self._visible(s.get(Job, job_id), job_id, scope)

    def visible(self, job_id: str, scope: str | None = None) -> bool:
        """Whether the job exists for this caller: the tenant check of a job id a spec names."""
        with self._session() as s:
            job = s.get(Job, job_id)
            return job is not None and (scope is None or job.tenant == scope)

    def list_jobs(self, limit: int = 50, status: JobStatus | None = None, scope: str | None = None) -> list[Job]:
        query = sa.select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
        if status is not None:
            query = query.where(Job.status == status)
        if scope is not None:
            query = query.where(Job.tenant == scope)
        with self._session() as s:
            return list(s.scalars(query))

    def count_jobs(self) -> int:
        with self._session() as s:
            return s.scalar(sa.select(sa.func.count()).select_from(Job)) or 0

    def count_by_status(self) -> dict[JobStatus, int]:
        with self._session() as s:
            rows = s.execute(sa.select(Job.status, sa.func.count()).group_by(Job.status)).all()
        return {status: count for status, count in rows}

    def request_cancel(self, job_id: str, scope: str | None = None) -> Job:
        with self._session(write=True) as s:
            job = self._visible(self._lock(s, job_id), job_id, scope)
            if job.status.finished:
                raise JobFinished(job)
            if job.status == JobStatus.QUEUED:
                job.status = JobStatus.CANCELLED
                job.finished_at = utcnow()
                s.add(Event(job_id=job_id, level="info", type="message", data={"message": "cancelled by request"}))
            elif job.status == JobStatus.RUNNING:
                job.status = JobStatus.CANCELLING
            return job

    @staticmethod
    def _visible(job: Job | None, job_id: str, scope: str | None) -> Job:
        if job is None or (scope is not None and job.tenant != scope):
            raise JobNotFound(job_id)
        return job

    # -- events ---------------------------------------------------------------------

    def append_event(
        self,
        job_id: str,
        type: str,
        data: dict[str, Any],
        level: str = "info",
        *,
        attempt: int | None = None,
    ) -> int:
        """Append one event; with `attempt`, refused (LeaseLost) once the job moved to another attempt."""
        with self._session(write=True) as s:
            job = s.get(Job, job_id)
            if job is None:
                raise JobNotFound(job_id)
            if attempt is not None and job.attempt != attempt:
                raise LeaseLost(job_id, attempt)
            event = Event(job_id=job_id, type=type, level=level, data=data)
            s.add(event)
            s.flush()
            return event.id

    def events(
        self, job_id: str, after: int = 0, limit: int = 100, scope: str | None = None, types: Sequence[str] = ()
    ) -> list[Event]:
        query = sa.select(Event).where(Event.job_id == job_id, Event.id > after).order_by(Event.id).limit(limit)
        if types:
            query = query.where(Event.type.in_(types))
        with self._session() as s:
            self._visible(s.get(Job, job_id), job_id, scope)
            return list(s.scalars(query))

    def events_since(self, after: int, types: Sequence[str], before: Any, limit: int = 5000) -> list[Event]:
        """Events of every job with id > after and time < before, oldest first (for /metrics)."""
        query = (
            sa.select(Event)
            .where(Event.id > after, Event.type.in_(types), Event.time < before)
            .order_by(Event.id)
            .limit(limit)
        )
        with self._session() as s:
            return list(s.scalars(query))

    # -- leases, as the worker sees them --------------------------------------------

    def claim(self, worker_id: str, labels: Sequence[str] = ()) -> Job | None:
        """Take the oldest queued job, or a running job whose worker stopped heartbeating.

        Only jobs whose labels this worker all has: a job's labels are stored sorted and
        comma-joined, so they must equal one of the subsets of the worker's (at most 2^8).
        """
        now = utcnow()
        expired = sa.and_(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        labels = sorted(set(labels))
        subsets = [",".join(c) for n in range(len(labels) + 1) for c in itertools.combinations(labels, n)]
        query = (
            sa.select(Job)
            .where(sa.or_(Job.status == JobStatus.QUEUED, expired), Job.labels.in_(subsets))
            .order_by(Job.created_at, Job.id)
            .limit(1)
            .with_for_update(skip_locked=True)  # Postgres; SQLite already holds its write lock
        )
        with self._session(write=True) as s:
            # A cancel requested of a job whose worker died has nobody left to act on it.
            s.execute(
                sa.update(Job)
                .where(Job.status == JobStatus.CANCELLING, Job.lease_expires_at < now)
                .values(status=JobStatus.CANCELLED, finished_at=now, lease_owner=None, lease_expires_at=None)
            )
            job = s.scalars(query).first()
            if job is None:
                return None
            if job.status == JobStatus.RUNNING:
                s.add(
                    Event(
                        job_id=job.id,
                        level="warning",
                        type="message",
                        data={
                            "message": f"worker {job.lease_owner} stopped heartbeating; {worker_id} takes the job over"
                        },
                    )
                )
            job.status = JobStatus.RUNNING
            job.attempt += 1
            job.lease_owner = worker_id
            job.lease_expires_at = now + self.lease
            job.started_at = job.started_at or now
            return job

    def heartbeat(self, job_id: str, worker_id: str, attempt: int) -> JobStatus:
        """Renew the lease; the status returned tells the worker whether a cancel was requested."""
        with self._session(write=True) as s:
            job = self._owned(s, job_id, worker_id, attempt)
            job.lease_expires_at = utcnow() + self.lease
            return job.status

    def update_progress(
        self, job_id: str, worker_id: str, attempt: int, stage: str | None, progress: dict[str, Any] | None
    ) -> None:
        with self._session(write=True) as s:
            job = self._owned(s, job_id, worker_id, attempt)
            job.stage = stage
            job.progress = progress

    def finish(
        self,
        job_id: str,
        worker_id: str,
        attempt: int,
        status: JobStatus,
        error: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> Job:
        if not status.finished:
            raise ValueError(f"finish() takes a final status, not {status.value}")
        with self._session(write=True) as s:
            job = self._owned(s, job_id, worker_id, attempt)
            job.status = status
            job.error = error
            job.result = result
            job.finished_at = utcnow()
            job.lease_owner = None
            job.lease_expires_at = None
            return job

    def release(self, job_id: str, worker_id: str, attempt: int) -> Job:
        """Put a job this worker holds back in the queue (graceful worker stop); a cancel wins."""
        with self._session(write=True) as s:
            job = self._owned(s, job_id, worker_id, attempt)
            if job.status == JobStatus.CANCELLING:
                job.status = JobStatus.CANCELLED
                job.finished_at = utcnow()
            else:
                job.status = JobStatus.QUEUED
            job.lease_owner = None
            job.lease_expires_at = None
            return job

    def _lock(self, s: Session, job_id: str) -> Job:
        job = s.scalars(sa.select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _owned(self, s: Session, job_id: str, worker_id: str, attempt: int) -> Job:
        job = self._lock(s, job_id)
        if job.lease_owner != worker_id or job.attempt != attempt or job.status not in _ACTIVE:
            raise LeaseLost(job_id, attempt, worker_id)
        return job
