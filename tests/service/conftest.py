"""Fixtures for the service tests: a real SQLite file per test, and real Postgres in a throwaway schema.

Postgres comes from CHARTER_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test);
its tests skip, saying why, when it cannot be reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.service.store import JobStore

from .helpers import make_store, postgres_schema_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'charter.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'charter.db'}"
    else:
        yield from postgres_schema_url()


@pytest.fixture
def store(db_url: str) -> Iterator[JobStore]:
    s = make_store(db_url)
    yield s
    s.engine.dispose()
