"""Property-based requests from the OpenAPI schema (schemathesis): no route answers 5xx.

Every operation gets a handful of generated requests, valid and invalid, against the real
app in process (SQLite, the real validator); kept small so the whole run takes seconds.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from charter.service.api import build_app

from .helpers import make_settings

# The schema is read when the module is collected, so the app (and its folder) exist by then.
_tmp = Path(tempfile.mkdtemp(prefix="charter-schemathesis-"))
atexit.register(shutil.rmtree, _tmp, ignore_errors=True)
app = build_app(make_settings(_tmp, f"sqlite:///{_tmp / 'charter.db'}"), start_worker=False)
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# The coverage phase sends every boundary case of every nested field (hundreds per operation):
# the explicit examples plus a few random requests each keep the run to seconds.
schema.config.phases.update(phases=["examples", "fuzzing"])


@schema.parametrize()
@settings(max_examples=5, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call(timeout=120)  # a valid spec waits for TRL's validator process, cold at first
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} → {response.status_code}: {response.text[:500]}"
    )
