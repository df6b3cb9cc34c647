"""The `charter` command: run the service, submit and follow jobs, prepare models, run the demo.

    charter demo                          # prepare SmolLM2-135M, start a service, run examples/demo.yaml
    charter serve                         # API + embedded worker on http://127.0.0.1:8400
    charter submit job.yaml --wait        # queue a job and follow it to its end
    charter jobs list | show ID | cancel ID | events ID
    charter keys create --name NAME [--tenant T] [--admin] | list | revoke ID|NAME
    charter files upload data.jsonl       # a dataset a job spec names as dataset: {source: file-…}

Client commands talk HTTP to --url (default: $CHARTER_URL, else CHARTER_HOST:CHARTER_PORT)
and send $CHARTER_API_KEY as a Bearer key. `keys` commands work on the database directly
(DATABASE_URL): they are how an operator makes the first key.
Heavy modules (uvicorn, the ML side) are imported inside the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from charter.settings import Settings

DEMO_SPEC = Path(__file__).resolve().parent.parent / "examples" / "demo.yaml"
DEMO_MODEL = "smollm2-135m"


class UsageError(Exception):
    """Something the user gave the command is wrong; the message says what."""


# -- following a job ----------------------------------------------------------------


class Follower:
    """Prints a job's events: a line per stage start/end and message, one live line for progress."""

    def __init__(self, out: IO[str] | None = None, every_s: float = 5.0):
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.every_s = every_s  # without a terminal, a progress line at most this often
        self._live = False
        self._last_live = 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        kind, level, data = event["type"], event["level"], event.get("data") or {}
        if kind == "stage":
            stage, state = data.get("stage", "?"), data.get("state", "")
            if state == "progress":
                self.live(progress_text(data))
            elif state == "skipped":
                self.line(f"[{stage}] skipped (finished by an earlier attempt)")
            else:
                numbers = _numbers(data)
                self.line(f"[{stage}] {state}" + (f"  {numbers}" if numbers else ""))
        elif kind == "metrics":
            self.live(progress_text(data))
        elif kind == "artifact":
            self.line(f"artifact {data.get('name') or data.get('kind') or ''}: {data.get('path', data)}")
        else:
            text = data.get("message", json.dumps(data))
            self.line(text if level == "info" else f"{level}: {text}")

    def live(self, text: str) -> None:
        if self.tty:  # one screen line, or \r cannot return to its start
            self.out.write("\r\033[K" + text[: shutil.get_terminal_size().columns - 1])
            self.out.flush()
            self._live = True
        elif time.monotonic() - self._last_live >= self.every_s:
            self._last_live = time.monotonic()
            self.line(text)

    def line(self, text: str) -> None:
        self.close()
        print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self._live:
            self.out.write("\r\033[K")
            self._live = False


def progress_text(data: dict[str, Any]) -> str:
    parts = [f"[{data.get('stage', data.get('step', 'train'))}]"]
    if "done" in data and "total" in data:
        parts.append(f"{data['done']}/{data['total']} {data.get('unit', 'rows')}")
    if data.get("tokens_per_s") is not None:
        parts.append(f"{data['tokens_per_s']:.1f} tok/s")
    if data.get("prompt_tokens_per_s"):  # prefill: what moves while the judge only scores (label)
        parts.append(f"{data['prompt_tokens_per_s']:,.0f} prompt tok/s")
    if "done" not in data and data.get("step") is not None:  # a metrics event
        parts.append(f"step {data['step']}")
    if data.get("loss") is not None:
        parts.append(f"loss {data['loss']:.4f}")
    for key in ("reward", "kl"):  # what an RL method's run is watched by
        if isinstance(data.get(key), int | float):
            parts.append(f"{key} {data[key]:.4g}")
    return "  ".join(parts)


def _numbers(data: dict[str, Any]) -> str:
    keys = [k for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    return "  ".join(f"{k}={_fmt(data[k])}" for k in keys[:6])


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return str(value)


def print_summary(job: dict[str, Any], out: IO[str] | None = None) -> None:
    """The end of a job: status and time, its error, or its evaluation report and artifacts."""
    out = out or sys.stdout
    took = ""
    if job.get("started_at") and job.get("finished_at"):
        seconds = (
            datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])
        ).total_seconds()
        took = f" in {int(seconds // 60)}m{int(seconds % 60):02d}s"
    print(f"\njob {job['id']} {job['status']}{took}", file=out)
    if job.get("error"):
        print(f"error: {job['error']}", file=out)
    report = job.get("report") or {}
    rows = [
        ("pairs", report.get("pairs")),
        ("position agreement", report.get("position_agreement")),
        ("win rate", report.get("win_rate")),
        ("  95% CI", report.get("win_rate_ci95")),
        ("ties", report.get("ties")),
        ("dropped", report.get("dropped")),
        ("mean length", report.get("mean_length")),
    ]
    for name, vs in (report.get("versus") or {}).items():  # the recipe: against the SFT policy too
        if name != "base":
            rows += [(f"win rate vs {name}", vs.get("win_rate")), ("  95% CI", vs.get("win_rate_ci95"))]
    if report:
        print("evaluation (trained vs base, judged in both orders):", file=out)
        for label, value in rows:
            if value is not None:
                print(f"  {label:<20}{_fmt(value)}", file=out)
    for r in report.get("rl") or []:  # the recipe's RL-CAI rounds
        held = (r.get("reward") or {}).get("heldout") or {}
        t = r.get("train") or {}
        parts = [f"pairs {r.get('pairs')}"]
        if held.get("accuracy") is not None:
            parts.append(f"reward model held-out accuracy {_fmt(held['accuracy'])}")
        if t.get("first_reward") is not None and t.get("final_reward") is not None:
            parts.append(f"reward {_fmt(t['first_reward'])} → {_fmt(t['final_reward'])}")
        print(f"  round {r.get('round')}: {', '.join(parts)}", file=out)
    artifacts = job.get("artifacts") or {}
    if artifacts:
        print("artifacts:", file=out)
        order = ["dataset", "dataset_jsonl", "adapter", "model", "plot", "report"]
        for key in order + sorted(k for k in artifacts if k not in order):
            if key in artifacts:
                print(f"  {key:<20}{artifacts[key]}", file=out)


def follow(client: Any, job_id: str) -> int:
    """Print a job's progress until it ends; 0 if it succeeded, 1 otherwise."""
    follower = Follower()
    try:
        job = client.wait(job_id, on_event=follower)
    except KeyboardInterrupt:
        follower.close()
        print(f"\nstopped following; {job_id} keeps running (cancel: charter jobs cancel {job_id})", file=sys.stderr)
        return 130
    follower.close()
    print_summary(job)
    return 0 if job["status"] == "succeeded" else 1


# -- commands -----------------------------------------------------------------------


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _url(args: argparse.Namespace) -> str:
    if getattr(args, "url", None):
        return args.url
    settings = Settings.from_env()
    return os.environ.get("CHARTER_URL") or f"http://{_connect_host(settings.host)}:{settings.port}"


def _client(args: argparse.Namespace) -> Any:
    from charter.client import Client

    return Client(_url(args), api_key=os.environ.get("CHARTER_API_KEY") or None)


def load_spec(path: str | Path) -> dict[str, Any]:
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML or JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path} must hold a job spec mapping (name, policy, prompts, train, …)")
    return spec


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    import uvicorn

    from charter.service.api import build_app
    from charter.service.db import upgrade
    from charter.service.logs import setup_logging

    settings = Settings.from_env()
    # The address it really binds decides whether it may run without API keys.
    settings = dataclasses.replace(settings, host=args.host or settings.host, port=args.port or settings.port)
    settings.check_auth()
    setup_logging(settings.log_format)
    upgrade(settings.database_url)
    app = build_app(settings, start_worker=not args.no_worker)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


def run_worker(settings: Settings, job_command: Any = None) -> int:
    """What `charter worker` runs: claim and run jobs until SIGTERM or SIGINT, then hand the running job back."""
    import threading

    from charter.service.db import upgrade
    from charter.service.logs import setup_logging
    from charter.service.store import JobStore
    from charter.service.worker import Worker

    setup_logging(settings.log_format)
    upgrade(settings.database_url)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # finish cleanly: the running job goes back to the queue
        signal.signal(sig, lambda *_: stop.set())
    Worker(JobStore.from_settings(settings), settings, job_command=job_command).run_forever(stop)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import dataclasses

    from charter.settings import parse_labels

    settings = Settings.from_env()
    if args.labels is not None:
        settings = dataclasses.replace(settings, worker_labels=parse_labels(args.labels, "--labels"))
    return run_worker(settings)


def cmd_submit(args: argparse.Namespace) -> int:
    spec = load_spec(args.file)
    with _client(args) as client:
        job = client.create_job(spec)
        print(job["id"], flush=True)
        return follow(client, job["id"]) if args.wait else 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.list_jobs(limit=args.limit)
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    print(f"{'ID':<17}{'STATUS':<12}{'STAGE':<12}{'CREATED':<22}NAME")
    for job in jobs:
        created = job["created_at"][:19].replace("T", " ")
        print(f"{job['id']:<17}{job['status']:<12}{job['stage'] or '-':<12}{created:<22}{job['name']}")
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.get_job(args.id)
    if args.json:
        print(json.dumps(job, indent=2))
        return 0
    print(f"{job['id']}  {job['name']}")
    print(f"  status    {job['status']} (attempt {job['attempt']})")
    if job.get("stage"):
        print(f"  stage     {progress_text(job.get('progress') or {'stage': job['stage']})}")
    print(f"  created   {job['created_at']}")
    if job["status"] in ("succeeded", "failed", "cancelled"):
        print_summary(job)
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel(args.id)
    print(f"{job['id']} {job['status']}")
    return 0


def cmd_jobs_events(args: argparse.Namespace) -> int:
    events, after = [], args.after
    with _client(args) as client:
        while page := client.events(args.id, after=after, limit=1000):
            events += page
            after = page[-1]["id"]
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    for e in events:
        print(f"{e['id']:>6}  {e['time'][:23]}  {e['level']:<7}  {e['type']:<8}  {json.dumps(e['data'])}")
    return 0


def _keys() -> Any:
    from charter.service.db import make_engine, upgrade
    from charter.service.keys import KeyStore

    settings = Settings.from_env()
    upgrade(settings.database_url)
    return KeyStore(make_engine(settings.database_url))


def cmd_keys_create(args: argparse.Namespace) -> int:
    key, token = _keys().create(args.name, tenant=args.tenant, admin=args.admin)
    print(token)
    role = "admin (sees every tenant)" if key.admin else f"tenant {key.tenant}"
    print(f"key {key.id} ({key.name}, {role}); shown once, only its hash is stored", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = [
        {
            "id": k.id,
            "name": k.name,
            "tenant": k.tenant,
            "admin": k.admin,
            "created_at": k.created_at.isoformat(),
            "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
        }
        for k in _keys().list()
    ]
    if args.json:
        print(json.dumps(keys, indent=2))
        return 0
    print(f"{'ID':<14}{'TENANT':<16}{'ADMIN':<7}{'CREATED':<21}{'STATE':<9}NAME")
    for k in keys:
        state = "revoked" if k["revoked_at"] else "active"
        created = k["created_at"][:19].replace("T", " ")
        print(f"{k['id']:<14}{k['tenant']:<16}{'yes' if k['admin'] else 'no':<7}{created:<21}{state:<9}{k['name']}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    for key in _keys().revoke(args.key):
        print(f"revoked {key.id} ({key.name})")
    return 0


def cmd_files_upload(args: argparse.Namespace) -> int:
    with _client(args) as client:
        f = client.files.upload(args.path, purpose=args.purpose)
    print(f"{f['id']}  {f['kind']}  {f['filename']}" + (f"  ({f['rows']} rows)" if f.get("rows") else ""))
    return 0


def cmd_files_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        files = client.files.list()
    if args.json:
        print(json.dumps(files, indent=2))
        return 0
    for f in files:
        print(f"{f['id']:<30}{f['kind']:<14}{f['bytes']:>10}  {f['filename']}")
    return 0


def cmd_models_prepare(args: argparse.Namespace) -> int:
    import charter.models

    print(charter.models.prepare(args.name))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    import charter.models

    models = charter.models.list_prepared()
    if args.json:
        print(json.dumps(models, indent=2, default=str))
        return 0
    for m in models:
        print(f"{m['name']:<24}{m['path']}")
    if not models:
        print(f"no prepared models; try: charter models prepare {DEMO_MODEL}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import charter.models
    from charter.client import Client, ClientError

    settings = Settings.from_env()
    port = args.port or settings.port
    spec = load_spec(args.spec)
    print(f"preparing {DEMO_MODEL} …", flush=True)
    print(f"  ready: {charter.models.prepare(DEMO_MODEL)}", flush=True)
    server = None
    with Client(f"http://{_connect_host(settings.host)}:{port}", os.environ.get("CHARTER_API_KEY") or None) as client:
        try:
            try:
                client.health()
                print(f"using the service already running at {client.url}")
            except ClientError:
                server = _start_server(settings, port)
                _wait_healthy(client, server, settings.home / "demo-serve.log", timeout_s=60)
            job = client.create_job(spec)
            print(f"submitted {job['id']} ({spec.get('name', '')})", flush=True)
            code = follow(client, job["id"])
            if code == 130:  # Ctrl-C: a demo job should not outlive the demo
                client.cancel(job["id"])
            return code
        finally:
            if server is not None:
                _stop_server(server)


def _start_server(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    log_path = settings.home / "demo-serve.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"starting charter serve on port {port} (log: {log_path})", flush=True)
    with open(log_path, "ab") as log:
        # Its own session: a Ctrl-C here reaches the demo, which then stops the server in order.
        return subprocess.Popen(
            [sys.executable, "-m", "charter.cli", "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_healthy(client: Any, server: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise UsageError(f"charter serve exited with code {server.returncode}; end of {log_path}:\n{tail}")
        try:
            client.health()
            return
        except Exception:
            time.sleep(0.5)
    raise UsageError(f"charter serve did not answer {client.url}/healthz within {timeout_s:.0f} s; see {log_path}")


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)  # uvicorn shuts down; its worker requeues any running job
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# -- the parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="charter",
        description="charter: a Constitutional AI post-training service. "
        "Start with `charter demo`, or `charter serve` and `charter submit JOB.yaml --wait`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url", help="the charter API (default: $CHARTER_URL, else http://CHARTER_HOST:CHARTER_PORT)")

    def command(
        parent: Any, name: str, text: str, func: Any, parents: list[Any] | None = None
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=text, description=text, parents=parents or [])
        p.set_defaults(func=func)
        return p

    p = command(sub, "serve", "Run the HTTP API (and, unless --no-worker, a worker that runs the jobs).", cmd_serve)
    p.add_argument("--host", help="address to listen on (default: $CHARTER_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: $CHARTER_PORT or 8400)")
    p.add_argument("--no-worker", action="store_true", help="serve the API only; run `charter worker` elsewhere")

    p = command(
        sub,
        "worker",
        "Run a standalone worker: claims queued jobs and runs them (SIGTERM stops it cleanly).",
        cmd_worker,
    )
    p.add_argument(
        "--labels",
        metavar="L1,L2",
        help="take only jobs whose resources.labels this worker all has, e.g. gpu (default: $CHARTER_WORKER_LABELS); "
        "jobs without labels run anywhere",
    )

    p = command(sub, "submit", "Submit a job spec (YAML or JSON file) and print the job id.", cmd_submit, [url])
    p.add_argument("file", metavar="FILE", help="the job spec, YAML or JSON")
    p.add_argument(
        "--wait", action="store_true", help="follow the job's progress until it ends; exit 0 only if it succeeded"
    )

    jobs = sub.add_parser(
        "jobs",
        help="List, show, cancel jobs and read their events.",
        description="List, show, cancel jobs and read their events.",
    )
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    p = command(jsub, "list", "List jobs, newest first.", cmd_jobs_list, [url])
    p.add_argument("--limit", type=int, default=50, help="at most this many jobs (default 50)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p = command(jsub, "show", "Show one job: status, progress, error, report and artifacts.", cmd_jobs_show, [url])
    p.add_argument("id", metavar="ID", help="the job id (job-…)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p = command(jsub, "cancel", "Cancel a job (a running one stops within seconds).", cmd_jobs_cancel, [url])
    p.add_argument("id", metavar="ID", help="the job id (job-…)")
    p = command(jsub, "events", "Print a job's events (stages, metrics, messages, artifacts).", cmd_jobs_events, [url])
    p.add_argument("id", metavar="ID", help="the job id (job-…)")
    p.add_argument("--after", type=int, default=0, help="only events with an id above N", metavar="N")
    p.add_argument("--json", action="store_true", help="print the API's JSON")

    keys = sub.add_parser(
        "keys",
        help="Make, list and revoke API keys (works on the database: DATABASE_URL).",
        description="Make, list and revoke API keys (works on the database: DATABASE_URL).",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    p = command(ksub, "create", "Make an API key and print it (shown once; only its hash is stored).", cmd_keys_create)
    p.add_argument("--name", required=True, help="who or what uses the key, e.g. alice or ci")
    p.add_argument("--tenant", default="default", help="the tenant whose jobs the key sees (default: default)")
    p.add_argument("--admin", action="store_true", help="the key sees and cancels every tenant's jobs")
    p = command(
        ksub, "list", "List API keys (id, tenant, admin, state, name); never the keys themselves.", cmd_keys_list
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(ksub, "revoke", "Revoke a key by id, or every active key with this name.", cmd_keys_revoke)
    p.add_argument("key", metavar="ID|NAME", help="the key's id (from `charter keys list`) or name")
    files = sub.add_parser(
        "files",
        help="Upload datasets and constitutions a job spec can name by id (file-…).",
        description="Upload datasets and constitutions a job spec can name by id (file-…).",
    )
    fsub = files.add_subparsers(dest="files_command", required=True, metavar="SUBCOMMAND")
    p = command(
        fsub, "upload", "Upload a file; it is checked first (the first bad line and why).", cmd_files_upload, [url]
    )
    p.add_argument(
        "path", metavar="PATH", help="a JSONL dataset, or a constitution (YAML/JSON) with --purpose constitution"
    )
    p.add_argument("--purpose", default="fine-tune", choices=["fine-tune", "constitution"])
    p = command(fsub, "list", "List uploaded files.", cmd_files_list, [url])
    p.add_argument("--json", action="store_true", help="print JSON")

    models = sub.add_parser(
        "models",
        help="Prepare models for offline use and list them.",
        description="Prepare models for offline use and list them.",
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    p = command(msub, "prepare", "Make a model usable offline by name and print its local path.", cmd_models_prepare)
    p.add_argument("name", metavar="NAME", help=f"a model name, e.g. {DEMO_MODEL}")
    p = command(msub, "list", "List the prepared models (name, path).", cmd_models_list)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(
        sub,
        "demo",
        f"Run the demo end to end: prepare {DEMO_MODEL}, start a service if none answers, run the demo job, print its evaluation.",
        cmd_demo,
    )
    p.add_argument("--port", type=int, help="the service's port (default: $CHARTER_PORT or 8400)")
    p.add_argument("--spec", default=str(DEMO_SPEC), help=f"the job spec (default: {DEMO_SPEC})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from charter.client import ClientError
    from charter.errors import CharterError

    try:
        return args.func(args)
    except (UsageError, ClientError, CharterError) as exc:
        print(f"charter: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
