"""End to end: the `make demo` job on this machine, stage by stage.

    .venv/bin/python bench/demo_stages.py [--home DIR] [--spec examples/demo.yaml]

Runs `charter demo` as a user would (its own CHARTER_HOME, a fresh one by default, so model
preparation is included; a free port so a running service is not reused), times the whole
command, then reads the job's own stage events from the job store: each stage's seconds from
its `started` to its `done` event, and the vLLM start-up from the worker's message. Prints a
table and the command, and writes bench/results/demo_stages.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_times(db: Path) -> dict:
    con = sqlite3.connect(db)
    job_id, created, started, finished, status = con.execute(
        "SELECT id, created_at, started_at, finished_at, status FROM jobs ORDER BY created_at DESC LIMIT 1"
    ).fetchone()
    rows = con.execute("SELECT time, type, data FROM events WHERE job_id = ? ORDER BY id", (job_id,)).fetchall()
    con.close()

    def t(s: str) -> float:
        return datetime.fromisoformat(s).timestamp()

    stages: dict[str, dict] = {}
    vllm_start = None
    for when, typ, data in rows:
        d = json.loads(data)
        if typ == "stage" and d.get("state") in ("started", "done"):
            s = d["stage"] + (f".r{d['round']}" if d.get("round") else "")
            stages.setdefault(s, {})[d["state"]] = t(when)
            if d["state"] == "done":
                stages[s]["counts"] = {k: v for k, v in d.items() if k not in ("stage", "state")}
        elif typ == "message" and (m := re.search(r"vLLM server for .* ready after (\d+) s", d.get("message", ""))):
            vllm_start = int(m.group(1))
    out = {}
    for name, s in stages.items():
        if "started" in s and "done" in s:
            out[name] = {"seconds": round(s["done"] - s["started"], 1), **s.get("counts", {})}
    return {
        "job": job_id,
        "status": status,
        "queued_to_finished_s": round(t(finished) - t(created), 1) if finished else None,
        "running_s": round(t(finished) - t(started), 1) if finished and started else None,
        "vllm_start_s": vllm_start,
        "stages": out,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", help="CHARTER_HOME to use (default: a fresh temporary one)")
    ap.add_argument("--spec", default=str(ROOT / "examples" / "demo.yaml"))
    args = ap.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="charter-demo-bench-"))
    env = {**os.environ, "CHARTER_HOME": str(home), "CHARTER_PORT": str(free_port())}
    cmd = [str(Path(sys.executable).parent / "charter"), "demo", "--spec", args.spec]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    (home / "demo-output.txt").write_text(proc.stdout + proc.stderr)
    result = {
        "command": " ".join(["CHARTER_HOME=" + str(home), *cmd]),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": datetime.now().isoformat(timespec="seconds"),
        **stage_times(home / "charter.db"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo_stages.json").write_text(json.dumps(result, indent=2))
    print(f"$ .venv/bin/python bench/demo_stages.py  (ran: {result['command']})")
    print(f"exit {proc.returncode}; wall {wall:.0f} s ({wall / 60:.1f} min); vLLM start {result['vllm_start_s']} s")
    print(f"{'stage':<14}{'seconds':>9}")
    for name, s in result["stages"].items():
        print(f"{name:<14}{s['seconds']:>9.0f}")
    print(f"job running {result['running_s']} s; written bench/results/demo_stages.json; output {home}/demo-output.txt")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
