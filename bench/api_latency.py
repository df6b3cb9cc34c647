"""The API: job submit latency under 50 concurrent clients, queue pick-up delay, API memory.

    .venv/bin/python bench/api_latency.py [--clients 50] [--per-client 10] [--backends sqlite,postgres]
                                          [--specs same,unique]

For each job store (SQLite in WAL mode; Postgres at 127.0.0.1:5432, a fresh schema):
1. `charter serve --no-worker` as its own process (the production path: uvicorn, validation
   with TRL's parser in its warm subprocess, the store), a fresh CHARTER_HOME;
2. `--clients` concurrent httpx clients each submit `--per-client` valid jobs in a row:
   latency per POST /v1/jobs (201 only), p50/p99, submissions/s; with `same` specs the
   validator answers from what it remembers, with `unique` ones TRL's parser runs every time;
3. the API process's RSS (VmHWM = peak, VmRSS = now) after the burst, and its validator child's;
4. queued → running: a real `Worker` (charter.service.worker) polls the same store, idle; jobs
   are submitted one at a time and the delay is started_at − created_at from the store (the
   job itself is a no-op command: what is measured is the claim).
Prints a table and the command; writes bench/results/api_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
POSTGRES = os.environ.get("CHARTER_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SPEC = {
    "name": "bench",
    "policy": {"model": "tiny"},
    "prompts": {"source": "builtin:red-team", "limit": 2},
    "train": {"method": "dpo", "lora": {"r": 8}, "args": {"beta": 0.1, "max_steps": 1}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def postgres_schema() -> tuple[str, str]:
    import sqlalchemy as sa

    schema = f"charter_bench_{secrets.token_hex(4)}"
    with sa.create_engine(POSTGRES).begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = sa.make_url(POSTGRES).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False), schema


def drop_schema(schema: str) -> None:
    import sqlalchemy as sa

    with sa.create_engine(POSTGRES).begin() as c:
        c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


def spec_for(i: int, unique: bool) -> dict:
    """The i-th submission: the same spec every time, or one whose train.args no earlier
    submission had (a distinct beta), so TRL's parser runs for it instead of the remembered answer."""
    if not unique:
        return SPEC
    return {**SPEC, "train": {**SPEC["train"], "args": {**SPEC["train"]["args"], "beta": 0.1 + i * 1e-6}}}


async def burst(base: str, clients: int, per_client: int, unique: bool) -> tuple[list[float], int, float]:
    lat: list[float] = []
    errors = 0
    sent = iter(range(10**9))

    async def client() -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=120) as h:
            for _ in range(per_client):
                t = time.perf_counter()
                r = await h.post(f"{base}/v1/jobs", json=spec_for(next(sent), unique))
                if r.status_code == 201:
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return lat, errors, time.perf_counter() - t0


def queue_delay(env: dict[str, str], base: str, n: int) -> list[float]:
    from charter.service.store import JobStore
    from charter.service.worker import Worker
    from charter.settings import Settings

    old = dict(os.environ)
    os.environ.update(env)
    try:
        settings = Settings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(old)
    store = JobStore.from_settings(settings)
    # Everything the burst queued is cancelled first, so the worker is idle when a job arrives.
    for job in store.list_jobs(limit=100000):
        if not job.status.finished:
            store.request_cancel(job.id)
    noop = lambda job, spec_path, workdir: [sys.executable, "-c", "pass"]  # noqa: E731
    worker = Worker(store, settings, job_command=noop, worker_id="bench-worker")
    stop = threading.Event()
    t = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True)
    t.start()
    delays = []
    try:
        with httpx.Client(timeout=60) as h:
            for _ in range(n):
                time.sleep(1.5)  # let the worker go idle again (it polls every second)
                job = h.post(f"{base}/v1/jobs", json=SPEC).json()
                while True:
                    j = store.get_job(job["id"])
                    if j.started_at is not None:
                        delays.append((j.started_at - j.created_at).total_seconds())
                        break
                    time.sleep(0.02)
    finally:
        stop.set()
        t.join(30)
    return delays


def run_backend(name: str, clients: int, per_client: int, unique: bool) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"charter-api-bench-{name}-"))
    port = free_port()
    env = {
        **os.environ,
        "CHARTER_HOME": str(home),
        "CHARTER_PORT": str(port),
        "CHARTER_MAX_QUEUED_JOBS": "1000000",
        "CHARTER_MODELS_DIR": os.environ.get("CHARTER_MODELS_DIR", str(Path(".charter/test-models").resolve())),
    }
    schema = None
    if name == "postgres":
        env["DATABASE_URL"], schema = postgres_schema()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "charter"), "serve", "--no-worker", "--port", str(port)],
        env=env,
        stdout=open(home / "serve.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        idle = rss_kib(proc.pid)
        for _ in range(5):  # warm: the validator subprocess starts on first use
            httpx.post(f"{base}/v1/jobs", json=SPEC, timeout=120).raise_for_status()
        lat, errors, wall = asyncio.run(burst(base, clients, per_client, unique))
        api = rss_kib(proc.pid)
        kids = {str(c): rss_kib(c) for c in children(proc.pid)}
        delays = queue_delay({k: v for k, v in env.items() if k.startswith(("CHARTER_", "DATABASE_URL"))}, base, 5)
    finally:
        proc.terminate()
        proc.wait(30)
        if schema:
            drop_schema(schema)
    return {
        "backend": name,
        "specs": "unique" if unique else "same",
        "submissions": len(lat),
        "errors": errors,
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * pct(lat, 0.99), 1),
        "per_s": round(len(lat) / wall, 1),
        "api_rss_mib_idle": round(idle["VmRSS"] / 1024, 1),
        "api_rss_mib_after": round(api["VmRSS"] / 1024, 1),
        "api_peak_rss_mib": round(api["VmHWM"] / 1024, 1),
        "validator_rss_mib": {k: round(v["VmRSS"] / 1024, 1) for k, v in kids.items()},
        "queued_to_running_s": [round(d, 3) for d in delays],
        "queued_to_running_median_s": round(statistics.median(delays), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--per-client", type=int, default=10)
    ap.add_argument("--backends", default="sqlite,postgres")
    ap.add_argument(
        "--specs",
        default="same,unique",
        help="same: every submission the same spec (TRL's answer remembered); unique: train.args no "
        "submission had before, so the parser runs for each",
    )
    ns = ap.parse_args()
    results = [
        run_backend(b, ns.clients, ns.per_client, s == "unique")
        for b in ns.backends.split(",")
        for s in ns.specs.split(",")
    ]
    out = {"command": " ".join([".venv/bin/python", *sys.argv]), "cpus": os.cpu_count(), "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "api_latency.json").write_text(json.dumps(out, indent=2))
    print(f"$ {out['command']}")
    print(
        f"{'store':<10}{'specs':>7}{'submits':>8}{'errors':>7}{'p50 ms':>8}{'p99 ms':>8}{'per s':>7}"
        f"{'API RSS MiB':>13}{'queued→running s':>19}"
    )
    for r in results:
        print(
            f"{r['backend']:<10}{r['specs']:>7}{r['submissions']:>8}{r['errors']:>7}{r['p50_ms']:>8}{r['p99_ms']:>8}{r['per_s']:>7}"
            f"{r['api_rss_mib_after']:>13}{r['queued_to_running_median_s']:>19}"
        )


if __name__ == "__main__":
    main()
