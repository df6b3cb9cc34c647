"""A stand-in for `python -m charter.pipelines.run` that speaks the same stdout protocol.

    python fake_job.py MODE SPEC_PATH WORKDIR

MODE: ok (stages, metrics, artifact, result.json), fail (error event, exit 3), exit (exit 5,
no error event), crash (SIGKILL itself), sleep (sleeps, with a child that ignores SIGTERM,
pids in WORKDIR/pids.json), flood (hundreds of progress events in a burst), noresult (exit 0
without result.json), files (artifacts on disk: JSONL, an adapter folder, a PNG, and symlinks
that lead out of the job's folder), slow (like ok, after ~4 s of progress lines; its pid in
WORKDIR/pids-<attempt>.json).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def event(type, data, level="info"):
    print("@@event " + json.dumps({"type": type, "level": level, "data": data}), flush=True)


def main():
    mode, spec_path, workdir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = json.loads(spec_path.read_text())
    print(f"fake job {spec['name']} starting in {workdir}", flush=True)
    if mode in ("ok", "flood"):
        n = 400 if mode == "flood" else 4
        event("stage", {"stage": "generate", "state": "started", "total": n})
        for i in range(1, n + 1):
            event("stage", {"stage": "generate", "state": "progress", "done": i, "total": n, "tokens_per_s": 50.0})
        event("stage", {"stage": "generate", "state": "done", "done": n, "total": n})
        event("stage", {"stage": "critique", "state": "skipped"})
        event("metrics", {"step": 1, "loss": 0.693})
        event("artifact", {"name": "dataset", "path": str(workdir / "pairs")})
        print("@@event {not json")  # a malformed event line is kept in the log, not fatal
        result = {
            "report": {"pairs": n, "win_rate": 0.75, "win_rate_ci95": [0.5, 0.9]},
            "artifacts": {"dataset": str(workdir / "pairs")},
        }
        (workdir / "result.json").write_text(json.dumps(result))
    elif mode == "fail":
        event("stage", {"stage": "critique", "state": "started"})
        print("Traceback (most recent call last): ...", flush=True)
        event("message", {"message": "judge at http://127.0.0.1:9/v1 unreachable after 3 retries"}, level="error")
        sys.exit(3)
    elif mode == "exit":
        for i in range(30):
            print(f"log line {i}")
        sys.exit(5)
    elif mode == "crash":
        event("stage", {"stage": "train", "state": "started"})
        os.kill(os.getpid(), signal.SIGKILL)
    elif mode == "sleep":
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)",
            ]
        )
        (workdir / "pids.json").write_text(json.dumps({"pid": os.getpid(), "child": child.pid, "pgid": os.getpgid(0)}))
        event("stage", {"stage": "train", "state": "started"})
        time.sleep(600)
    elif mode == "noresult":
        pass
    elif mode == "files":
        files(workdir)
    elif mode == "slow":
        attempt = os.environ.get("CHARTER_ATTEMPT", "0")
        (workdir / f"pids-{attempt}.json").write_text(json.dumps({"pid": os.getpid()}))
        event("stage", {"stage": "generate", "state": "started", "total": 20})
        for i in range(1, 21):
            time.sleep(0.2)
            event("stage", {"stage": "generate", "state": "progress", "done": i, "total": 20})
        event("stage", {"stage": "generate", "state": "done", "done": 20, "total": 20})
        (workdir / f"done-{attempt}").write_text("")
        (workdir / "result.json").write_text(json.dumps({"report": {"attempt": attempt}, "artifacts": {}}))
    else:
        sys.exit(f"unknown mode {mode}")


def files(workdir):
    (workdir / "dataset").mkdir(exist_ok=True)
    (workdir / "dataset" / "pairs.jsonl").write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n' * 2)
    adapter = workdir / "train" / "adapter"
    (adapter / "sub").mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 12)
    (adapter / "sub" / "note.txt").write_text("x" * 513)
    (workdir / "train" / "curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (workdir / "report.json").write_text('{"win_rate": 0.5}')
    for link, target in ((workdir / "leak", "/etc"), (adapter / "evil", "/etc/hostname")):
        if not link.is_symlink():
            link.symlink_to(target)
    artifacts = {
        "dataset_jsonl": str(workdir / "dataset" / "pairs.jsonl"),
        "adapter": str(adapter),
        "plot": str(workdir / "train" / "curve.png"),
        "report": str(workdir / "report.json"),
        "leak": str(workdir / "leak"),  # a symlink out of the job's folder: never listed or served
        "outside": "/etc/passwd",  # not in the job's folder at all
    }
    event("stage", {"stage": "train", "state": "started"})
    event("stage", {"stage": "train", "state": "done", "steps": 1})
    for name, path in artifacts.items():
        event("artifact", {"name": name, "path": path, "kind": name})
    (workdir / "result.json").write_text(json.dumps({"report": {"win_rate": 0.5}, "artifacts": artifacts}))


if __name__ == "__main__":
    main()
