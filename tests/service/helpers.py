"""Helpers shared by the service tests (the fixtures are in conftest.py)."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from charter.service.db import Job, make_engine, upgrade
from charter.service.store import JobStore
from charter.settings import Settings

POSTGRES_URL = os.environ.get("CHARTER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FAKE_JOB = Path(__file__).parent / "fake_job.py"

# A spec JobSpec accepts; its name doubles as fake_job.py's MODE in the worker tests.
SPEC: dict[str, Any] = {
    "name": "ok",
    "policy": {"model": "smollm2-135m"},
    "prompts": {"source": "builtin:red-team", "limit": 2},
    "train": {"method": "dpo"},
}


def fake_command(job: Job, spec_path: Path, workdir: Path) -> list[str]:
    """The worker's job_command for tests: fake_job.py, in the mode named by the job's name."""
    return [sys.executable, str(FAKE_JOB), job.spec["name"], str(spec_path), str(workdir)]


def spec(name: str = "ok", **changes: Any) -> dict[str, Any]:
    return {**SPEC, "name": name, **changes}


def postgres_schema_url() -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped afterwards; skips if Postgres is unreachable."""
    admin = sa.create_engine(POSTGRES_URL)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"Postgres not reachable at {POSTGRES_URL} ({type(exc).__name__}); set CHARTER_TEST_POSTGRES_URL")
    schema = f"charter_test_{secrets.token_hex(4)}"
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def make_store(url: str, lease_seconds: float = 60.0) -> JobStore:
    upgrade(url)
    return JobStore(make_engine(url), lease_seconds=lease_seconds)


def make_settings(tmp_path: Path, database_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = dict(
        home=tmp_path,
        database_url=database_url,
        artifact_root=tmp_path / "artifacts",
        models_dir=tmp_path / "models",
        heartbeat_seconds=0.5,
        lease_seconds=30.0,
    )
    return Settings(**(values | changes))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """The app on a real uvicorn server in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(20)
