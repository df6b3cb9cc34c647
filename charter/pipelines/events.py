"""How a job process reports: `@@event {json}` lines on stdout, read by the worker.

Everything else the process prints goes to the job's log. Progress lines are throttled here
(the worker throttles again before the database); stage starts and ends never are.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, TextIO

PREFIX = "@@event "


class Reporter:
    def __init__(self, out: TextIO | None = None, min_interval_s: float = 0.5, lock: threading.Lock | None = None):
        self.out = out or sys.stdout
        self.min_interval_s = min_interval_s
        self._last_progress = 0.0
        self._lock = lock or threading.Lock()
        self.stage: str | None = None
        self.alias: str | None = None

    def fork(self) -> Reporter:
        """A reporter for a stage running beside this one (its own stage and throttle, the same
        stream): whole lines, never interleaved."""
        return Reporter(self.out, self.min_interval_s, self._lock)

    def as_stage(self, name: str) -> Reporter:
        """A reporter on which a stage function's own name (`label`, `train`) reads as `name`
        (`rl.k1.label`): the recipe runs the same stage functions once per round."""
        r = self.fork()
        r.alias = name
        return r

    def emit(self, type: str, data: dict[str, Any], level: str = "info") -> None:
        line = PREFIX + json.dumps({"type": type, "level": level, "data": data}, default=str) + "\n"
        with self._lock:
            self.out.write(line)
            self.out.flush()

    def started(self, stage: str, total: int | None = None, **extra: Any) -> None:
        stage = self.stage = self.alias or stage
        self.emit("stage", {"stage": stage, "state": "started", "done": 0, "total": total, **extra})

    def progress(self, done: int, total: int | None = None, force: bool = False, **extra: Any) -> None:
        now = time.monotonic()
        if not force and now - self._last_progress < self.min_interval_s and done != total:
            return
        self._last_progress = now
        self.emit("stage", {"stage": self.stage, "state": "progress", "done": done, "total": total, **extra})

    def done(self, stage: str, **extra: Any) -> None:
        stage = self.alias or stage
        self.emit("stage", {"stage": stage, "state": "done", **extra})

    def skipped(self, stage: str) -> None:
        stage = self.alias or stage
        self.emit("stage", {"stage": stage, "state": "skipped", "reason": "its manifest exists (resumed job)"})

    def metrics(self, data: dict[str, Any]) -> None:
        self.emit("metrics", data)

    def message(self, text: str, level: str = "info", **extra: Any) -> None:
        self.emit("message", {"message": text, **extra}, level=level)

    def artifact(self, name: str, path: str, kind: str) -> None:
        self.emit("artifact", {"name": name, "path": path, "kind": kind})
