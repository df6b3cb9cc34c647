"""Run the API as the slim `api` image would: only the stdlib, charter and what
docker/requirements-api.txt installs (with its dependencies) can be imported.

    python api_without_ml.py REQUIREMENTS DATABASE_DIR

Prints one JSON line: the HTTP statuses seen and the third-party distributions imported.
"""

import importlib.abc
import importlib.metadata as md
import json
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(lines: list[str]) -> set[str]:
    """The distributions these requirements install, dependencies included."""
    seen: set[str] = set()
    todo = [Requirement(line) for line in lines]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for dep in md.requires(req.name) or []:
            d = Requirement(dep)
            if d.marker is None or any(d.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(d)
    return seen


requirements, db_dir = Path(sys.argv[1]), Path(sys.argv[2])
lines = [ln.split("#")[0].strip() for ln in requirements.read_text().splitlines()]
allowed_dists = closure([ln for ln in lines if ln])
modules = md.packages_distributions()
allowed = {m for m, dists in modules.items() if any(canonicalize_name(d) in allowed_dists for d in dists)}
allowed |= set(sys.stdlib_module_names) | {"charter", "_pytest", "pytest", "packaging"}
refused: set[str] = set()


class OnlyTheApiImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top not in allowed and not top.startswith("_"):
            refused.add(top)
            raise ModuleNotFoundError(f"No module named {fullname!r} (not in the api image)", name=fullname)
        return None


sys.meta_path.insert(0, OnlyTheApiImage())

from fastapi.testclient import TestClient  # noqa: E402

from charter.service.api import build_app  # noqa: E402
from charter.settings import Settings  # noqa: E402

settings = Settings(
    home=db_dir, database_url=f"sqlite:///{db_dir / 'charter.db'}", artifact_root=db_dir / "a", models_dir=db_dir / "m"
)
spec = {
    "name": "slim",
    "policy": {"model": "smollm2-135m"},
    "prompts": {"source": "builtin:red-team", "limit": 2},
    "train": {"method": "dpo", "args": {"beta": 0.1}},
}
statuses = {}
with TestClient(build_app(settings, start_worker=False)) as client:
    statuses["healthz"] = client.get("/healthz").status_code
    created = client.post("/v1/jobs", json=spec)
    statuses["create"] = created.status_code
    statuses["read"] = client.get(f"/v1/jobs/{created.json()['id']}").status_code
    statuses["bad"] = client.post("/v1/jobs", json={**spec, "prompts": {"source": "builtin:nope"}}).status_code
    job_id = created.json()["id"]
    statuses["plot_before_metrics"] = client.get(f"/v1/jobs/{job_id}/plot.png").status_code
    client.app.state.store.append_event(job_id, "metrics", {"stage": "train", "step": 1, "loss": 0.7})
    statuses["plot"] = client.get(f"/v1/jobs/{job_id}/plot.png").status_code
imported = {
    canonicalize_name(d)
    for m in list(sys.modules)
    for d in modules.get(m.split(".")[0], [])
    if m.split(".")[0] not in sys.stdlib_module_names
}
print(json.dumps({"statuses": statuses, "imported": sorted(imported), "refused": sorted(refused)}))
