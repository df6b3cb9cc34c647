"""The job store's tables (SQLAlchemy 2) and engine; the schema itself is made by Alembic.

    engine = make_engine("sqlite:////tmp/charter.db")   # or postgresql+psycopg://user@host/db
    upgrade("sqlite:////tmp/charter.db")                # alembic upgrade head, no alembic.ini

The jobs table is the source of truth for a job's status; events are its append-only log,
ordered globally by id so a client can follow them with `after=<last id>`.
"""

from __future__ import annotations

import enum
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"
_UPGRADE_LOCK = threading.Lock()


class JobStatus(enum.StrEnum):  # a str: the same value in code, database and JSON
    QUEUED = "queued"  # waiting for a worker to claim it
    RUNNING = "running"  # a worker holds its lease and runs its process
    CANCELLING = "cancelling"  # cancel requested; the worker stops it at its next heartbeat
    SUCCEEDED = "succeeded"  # finished; result holds the report and artifacts
    FAILED = "failed"  # finished; error says why
    CANCELLED = "cancelled"  # finished by request

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return "job-" + secrets.token_hex(6)


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite keeps no zone, so it is stored naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use charter.service.db.utcnow()")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: sa.JSON(none_as_null=True)}


# Stored as the enum's values ("queued"), as plain VARCHAR: the same string in code, DB and JSON.
StatusType = sa.Enum(
    JobStatus,
    name="job_status",
    native_enum=False,
    create_constraint=False,
    length=16,
    values_callable=lambda e: [m.value for m in e],
)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        sa.Index("ix_jobs_status_created_at", "status", "created_at"),
        sa.Index("ix_jobs_tenant_status", "tenant", "status"),
    )

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True, default=new_job_id)
    name: Mapped[str] = mapped_column(sa.String(200))
    tenant: Mapped[str] = mapped_column(sa.String(100), default="default", server_default="default")
    # The worker labels the job needs (spec resources.labels), sorted and comma-joined; "" for any worker.
    labels: Mapped[str] = mapped_column(sa.String(200), default="", server_default="")
    status: Mapped[JobStatus] = mapped_column(StatusType, default=JobStatus.QUEUED)
    spec: Mapped[dict[str, Any]]
    stage: Mapped[str | None] = mapped_column(sa.String(64))
    progress: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(sa.Text)
    result: Mapped[dict[str, Any] | None]
    attempt: Mapped[int] = mapped_column(default=0)
    lease_owner: Mapped[str | None] = mapped_column(sa.String(200))
    lease_expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(sa.ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(sa.String(16))  # info | warning | error
    type: Mapped[str] = mapped_column(sa.String(16))  # stage | metrics | message | artifact
    data: Mapped[dict[str, Any]]


class ApiKey(Base):
    """An API key: only the sha256 of the token is kept; the token is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)  # also inside the token: chk_<id>_<secret>
    name: Mapped[str] = mapped_column(sa.String(200))
    tenant: Mapped[str] = mapped_column(sa.String(100))
    admin: Mapped[bool] = mapped_column(default=False)
    hash: Mapped[str] = mapped_column(sa.String(64))  # sha256 hex of the whole token
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class File(Base):
    """An uploaded file (a dataset or a constitution); its bytes are at ARTIFACT_ROOT/files/<id>."""

    __tablename__ = "files"
    __table_args__ = (sa.Index("ix_files_tenant_created_at", "tenant", "created_at"),)

    id: Mapped[str] = mapped_column(sa.String(40), primary_key=True, default=new_file_id)
    tenant: Mapped[str] = mapped_column(sa.String(200))
    filename: Mapped[str] = mapped_column(sa.String(500))
    purpose: Mapped[str] = mapped_column(sa.String(32))  # fine-tune | constitution
    kind: Mapped[str] = mapped_column(sa.String(32))  # sft | preference | prompts | constitution
    bytes: Mapped[int] = mapped_column(sa.BigInteger)
    rows: Mapped[int | None]
    sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def make_engine(database_url: str) -> Engine:
    """An engine for SQLite (WAL, one writer at a time) or Postgres (postgresql+psycopg://)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)

    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 5})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # sqlite3's own BEGIN handling is turned off so that `_on_begin` decides: a write
        # transaction takes the write lock up front (BEGIN IMMEDIATE), which waits politely
        # under busy_timeout instead of failing mid-transaction when another writer won.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that holds the write lock (SQLite) from its first statement."""
    with engine.connect().execution_options(sqlite_immediate=True) as conn, conn.begin():
        yield conn


def _script_config() -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def schema_status(engine: Engine) -> tuple[set[str], set[str]]:
    """(the database's migration revisions, the newest ones charter ships); equal when up to date."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    heads = set(ScriptDirectory.from_config(_script_config()).get_heads())
    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads()), heads


def upgrade(database_url: str | Engine) -> None:
    """Bring the database to the newest schema (`alembic upgrade head`); safe to run concurrently."""
    from alembic import command

    engine = database_url if isinstance(database_url, Engine) else make_engine(database_url)
    cfg = _script_config()
    try:
        # Alembic's `context` is one global per process, so threads take turns; processes are
        # kept apart by the database (SQLite's write lock, a Postgres advisory lock).
        with _UPGRADE_LOCK, write_transaction(engine) as conn:
            if conn.dialect.name == "postgresql":
                # API and worker may start together; one migrates, the other waits and finds head.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(8400)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        if engine is not database_url:
            engine.dispose()
