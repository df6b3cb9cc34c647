"""API keys and tenants: 401s, every job route with another tenant's ids, admin keys, key commands."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from charter import cli
from charter.service.api import build_app
from charter.settings import Settings, SettingsError

from .helpers import make_settings, serving, spec

REPO = Path(__file__).resolve().parents[2]
MISSING = "job-000000000000"


class Tenants:
    def __init__(self, client: TestClient):
        self.client = client
        keys = client.app.state.keys
        self.tokens = {
            "alice": keys.create("alice", tenant="team-a")[1],
            "bob": keys.create("bob", tenant="team-b")[1],
            "root": keys.create("root", tenant="ops", admin=True)[1],
        }

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def request(self, who: str, method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        return self.client.request(method, path, headers=self.headers(who) | (headers or {}), **kwargs)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenants]:
    tmp = tmp_path_factory.mktemp("auth")
    settings = make_settings(tmp, f"sqlite:///{tmp / 'charter.db'}", auth="on")
    with TestClient(build_app(settings, start_worker=False)) as client:
        yield Tenants(client)


def job_routes(client: TestClient) -> list[tuple[str, str]]:
    """(method, path) of every route that takes a job id, so a new one cannot skip these tests."""
    routes = [r for r in client.app.routes if isinstance(r, APIRoute) and "{job_id}" in r.path]
    return sorted((m, r.path) for r in routes for m in r.methods)


def test_requests_without_a_valid_key_are_401(tenants: Tenants) -> None:
    client = tenants.client
    token = tenants.tokens["alice"]
    cases = {
        "no header": {},
        "not bearer": {"Authorization": f"Basic {token}"},
        "empty bearer": {"Authorization": "Bearer "},
        "wrong secret": {"Authorization": f"Bearer {token[:-4]}xxxx"},
        "unknown id": {"Authorization": "Bearer chk_000000000000_" + "x" * 43},
        "no prefix": {"Authorization": "Bearer " + token.removeprefix("chk_")},
    }
    for case, headers in cases.items():
        r = client.get("/v1/jobs", headers=headers)
        assert r.status_code == 401, case
        assert r.headers["www-authenticate"].startswith("Bearer"), case
        assert "charter keys" in r.json()["detail"], case
    assert client.post("/v1/jobs", json=spec("x")).status_code == 401
    assert client.get("/healthz").status_code == 200  # probes need no key
    assert client.get("/readyz").status_code == 200
    assert tenants.request("alice", "GET", "/v1/jobs").status_code == 200


def message(r: Any) -> str:
    body = r.json()
    return body["detail"] if "detail" in body else body["error"]["message"]


def test_every_job_route_hides_another_tenants_jobs(tenants: Tenants) -> None:
    r = tenants.request("alice", "POST", "/v1/jobs", json=spec("alices-job"))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["tenant"] == "team-a"
    routes = job_routes(tenants.client)
    assert ("GET", "/v1/jobs/{job_id}/artifacts/{name:path}") in routes and len(routes) >= 5

    for method, path in routes:
        url = path.replace("{job_id}", job["id"]).replace("{name:path}", "log")
        missing = path.replace("{job_id}", MISSING).replace("{name:path}", "log")
        for headers in ({}, {"Accept": "text/event-stream"}):
            as_bob = tenants.request("bob", method, url, headers=headers)
            nobody = tenants.request("bob", method, missing, headers=headers)
            assert as_bob.status_code == 404, (method, path, as_bob.text)
            # the same answer as for an id that does not exist, the id aside (charter's routes
            # answer {"detail"}, the OpenAI-compatible ones {"error": {"message"}})
            assert message(as_bob).replace(job["id"], "ID") == message(nobody).replace(MISSING, "ID")

    assert job["id"] not in [j["id"] for j in tenants.request("bob", "GET", "/v1/jobs").json()["data"]]
    assert tenants.request("bob", "GET", "/v1/jobs", params={"status": "queued"}).json()["count"] == 0
    assert tenants.request("alice", "GET", f"/v1/jobs/{job['id']}").json() == job
    assert tenants.request("alice", "GET", f"/v1/jobs/{job['id']}/events").status_code == 200
    assert tenants.request("alice", "GET", f"/v1/jobs/{job['id']}/artifacts").json() == {"object": "list", "data": []}
    assert tenants.client.app.state.store.get_job(job["id"]).status == "queued"  # bob's cancel did nothing


def test_an_admin_key_sees_and_cancels_every_tenants_jobs(tenants: Tenants, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="charter.api"):
        a = tenants.request("alice", "POST", "/v1/jobs", json=spec("a")).json()
    assert [r.tenant for r in caplog.records if r.name == "charter.api"] == ["team-a"]  # in the access log
    b = tenants.request("bob", "POST", "/v1/jobs", json=spec("b")).json()
    listed = {j["id"]: j["tenant"] for j in tenants.request("root", "GET", "/v1/jobs").json()["data"]}
    assert listed[a["id"]] == "team-a" and listed[b["id"]] == "team-b"
    assert tenants.request("root", "GET", f"/v1/jobs/{b['id']}").json()["name"] == "b"
    assert tenants.request("root", "POST", f"/v1/jobs/{a['id']}/cancel").json()["status"] == "cancelled"
    own = tenants.request("root", "POST", "/v1/jobs", json=spec("r")).json()
    assert own["tenant"] == "ops"
    assert own["id"] not in [j["id"] for j in tenants.request("alice", "GET", "/v1/jobs").json()["data"]]


def test_a_revoked_key_is_refused_and_only_a_hash_is_stored(tenants: Tenants) -> None:
    keys = tenants.client.app.state.keys
    key, token = keys.create("temp", tenant="team-a")
    assert token.startswith(f"chk_{key.id}_") and len(token) > 50
    headers = {"Authorization": f"Bearer {token}"}
    assert tenants.client.get("/v1/jobs", headers=headers).status_code == 200
    with keys.engine.connect() as conn:
        row = conn.execute(sa.text("SELECT * FROM api_keys WHERE id = :id"), {"id": key.id}).mappings().one()
    assert row["hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert not any(token in str(v) or token.split("_", 2)[2] in str(v) for v in row.values())
    assert [k.id for k in keys.revoke(key.id)] == [key.id]
    assert tenants.client.get("/v1/jobs", headers=headers).status_code == 401


def test_keys_need_a_name_and_a_plain_tenant(tenants: Tenants) -> None:
    from charter.service.keys import InvalidKeyRequest, KeyNotFound

    keys = tenants.client.app.state.keys
    with pytest.raises(InvalidKeyRequest, match="name"):
        keys.create("  ")
    with pytest.raises(InvalidKeyRequest, match="lower-case"):
        keys.create("x", tenant="Team A")
    with pytest.raises(KeyNotFound, match="charter keys list"):
        keys.revoke("nobody")


def test_auth_off_is_refused_off_loopback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'charter.db'}"
    with pytest.raises(SettingsError, match="CHARTER_AUTH=off .* 127.0.0.1"):
        build_app(make_settings(tmp_path, url, host="0.0.0.0", auth="off"), start_worker=False)
    assert not make_settings(tmp_path, url, host="127.0.0.1").auth_required  # the embedded default
    assert not make_settings(tmp_path, url, host="localhost", auth="off").auth_required
    assert make_settings(tmp_path, url, host="0.0.0.0").auth_required  # auto: keys off loopback
    assert make_settings(tmp_path, url, host="::1", auth="on").auth_required

    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_") and k != "DATABASE_URL"}
    env |= {"CHARTER_HOME": str(tmp_path), "CHARTER_AUTH": "off", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "charter.cli", "serve", "--host", "0.0.0.0", "--port", "9"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 1 and "charter keys create" in r.stderr and "CHARTER_AUTH=off" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "charter.cli", "jobs", "list"],
        capture_output=True,
        text=True,
        env=env | {"CHARTER_AUTH": "maybe"},
        timeout=60,
    )
    assert r.returncode == 1 and "CHARTER_AUTH='maybe'" in r.stderr


def test_key_commands_and_the_cli_sending_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'charter.db'}")
    assert cli.main(["keys", "create", "--name", "ci", "--tenant", "team-c"]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("chk_") and "shown once" in err
    assert cli.main(["keys", "create", "--name", "boss", "--admin"]) == 0
    capsys.readouterr()
    assert cli.main(["keys", "list"]) == 0
    listed = capsys.readouterr().out
    assert "team-c" in listed and "boss" in listed and "active" in listed and token not in listed

    settings = Settings(
        home=tmp_path, database_url=f"sqlite:///{tmp_path / 'charter.db'}", artifact_root=tmp_path / "a", auth="on"
    )
    with serving(build_app(settings, start_worker=False)) as url:
        assert cli.main(["jobs", "list", "--url", url]) == 1
        err = capsys.readouterr().err
        assert "HTTP 401" in err and "CHARTER_API_KEY" in err
        monkeypatch.setenv("CHARTER_API_KEY", token)
        assert cli.main(["jobs", "list", "--url", url]) == 0
        assert capsys.readouterr().out.split() == ["ID", "STATUS", "STAGE", "CREATED", "NAME"]
        assert cli.main(["keys", "revoke", "ci"]) == 0
        assert "revoked" in capsys.readouterr().out
        assert cli.main(["jobs", "list", "--url", url]) == 1
        assert "HTTP 401" in capsys.readouterr().err
    assert cli.main(["keys", "revoke", "ci"]) == 1  # no active key by that name is left
    assert "no API key" in capsys.readouterr().err
