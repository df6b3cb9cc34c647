"""The worker: claims jobs from the store and runs each in its own process.

    worker = Worker(JobStore.from_settings(settings), settings)
    worker.run_forever(stop_event)        # `charter worker`, or a thread inside `charter serve`

One subprocess per job (`python -m charter.pipelines.run --spec … --workdir …`, in its own
process group, led by charter.service.jobguard, which ends the group if the worker dies), so
an OOM or a CUDA crash takes down that job, never the worker. The job
reports on stdout: a line `@@event {"type": …, "level": …, "data": {…}}` is an event, every
other line goes to `<workdir>/job.log`. While it runs, the worker renews its lease every
≤2 s and acts on what the store says: a requested cancel kills the process group.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from charter.service.db import Job, JobStatus
from charter.service.logs import job_logger
from charter.service.store import JobStore, LeaseLost
from charter.settings import Settings

log = logging.getLogger("charter.worker")

EVENT_PREFIX = "@@event "
EVENT_TYPES = {"stage", "metrics", "message", "artifact"}
LEVELS = {"info", "warning", "error"}
PROGRESS_INTERVAL_S = 0.5  # at most ~2 progress writes a second per job
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long
TAIL_LINES = 20

JobCommand = Callable[[Job, Path, Path], list[str]]


class Worker:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        worker_id: str | None = None,
        job_command: JobCommand | None = None,
        labels: tuple[str, ...] | None = None,
    ):
        self.store = store
        self.settings = settings
        # It takes only jobs whose resources.labels it all has (CHARTER_WORKER_LABELS, --labels).
        self.labels = settings.worker_labels if labels is None else labels
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.job_command = job_command
        self._stop = threading.Event()
        self._pool: Any = None  # charter.pipelines.servers.VLLMServerPool, made on first need

    def run_forever(self, stop_event: threading.Event) -> None:
        """Claim and run jobs until `stop_event` is set; a running job is then put back in the queue."""
        self._stop = stop_event
        log.info("worker %s started (labels: %s)", self.worker_id, ",".join(self.labels) or "none")
        try:
            while not stop_event.is_set():
                try:
                    job = self.store.claim(self.worker_id, self.labels)
                except Exception:
                    log.exception("claiming a job failed; trying again in a second")
                    job = None
                if job is None:
                    stop_event.wait(1.0)
                    continue
                self.run_one(job)
        finally:
            self.close()
            log.info("worker %s stopped", self.worker_id)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def run_one(self, job: Job) -> JobStatus | None:
        """Run one claimed job to its end; returns its final status (None if the lease was lost)."""
        try:
            return _JobRun(self, job).run()
        except Exception as exc:  # a bug here must not take the worker down with the job
            log.exception("worker error while running %s", job.id, extra={"job_id": job.id})
            try:
                self.store.finish(job.id, self.worker_id, job.attempt, JobStatus.FAILED, error=f"worker error: {exc!r}")
            except Exception:
                log.exception("could not record the failure of %s", job.id, extra={"job_id": job.id})
            return JobStatus.FAILED

    def _command(self, job: Job, spec_path: Path, workdir: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", CHARTER_JOB_ID=job.id, CHARTER_ATTEMPT=str(job.attempt))
        env["CHARTER_JOB_MEMORY_MB"] = str(self.settings.job_memory_mb)  # ops: named in an out-of-memory error
        # The job process checks the spec's paths again, against the roots this worker serves.
        env["CHARTER_DATA_ROOTS"] = os.pathsep.join(str(r) for r in self.settings.data_roots)
        if self.job_command is not None:
            return [str(a) for a in self.job_command(job, spec_path, workdir)], env
        # Imported here: the servers module pulls in the ML side, which the API must not load.
        from charter.pipelines.servers import VLLMServerPool, job_endpoints
        from charter.spec import JobSpec

        if self._pool is None:
            self._pool = VLLMServerPool(self.settings)

        def note(text: str) -> None:  # server start-up takes minutes on a CPU: say so
            self.store.append_event(job.id, "message", {"message": text})

        env.update(job_endpoints(JobSpec.model_validate(job.spec), self._pool, note))
        cmd = [sys.executable, "-m", "charter.pipelines.run", "--spec", str(spec_path), "--workdir", str(workdir)]
        return cmd, env


class _JobRun:
    """One attempt at one job: the process, its stdout pump, and the lease it runs under."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.store, self.job = worker, worker.store, job
        self.log = job_logger(log, job.id)
        self.attempt = job.attempt
        self.workdir = worker.settings.artifact_root / job.id
        self.lost = False  # the lease went to another worker: stop writing, stop the process
        self.cancel_requested = False
        self._done = threading.Event()
        self.last_error: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._last_progress = 0.0

    def run(self) -> JobStatus | None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(self.job.spec, indent=2))
        start = {"attempt": self.attempt, "worker": self.worker.worker_id}
        if self.attempt == 1 and self.job.started_at is not None:  # read by /metrics (queue wait)
            start["queued_s"] = round((self.job.started_at - self.job.created_at).total_seconds(), 3)
        self.note(f"attempt {self.attempt} started on worker {self.worker.worker_id}", **start)
        self.log.info("%s attempt %d started", self.job.id, self.attempt)
        # Heartbeats run from the claim on: starting the job's vLLM servers alone can outlast a lease.
        beat = threading.Thread(target=self._heartbeat, name=f"heartbeat-{self.job.id}", daemon=True)
        beat.start()
        try:
            return self._run(spec_path)
        finally:
            self._done.set()
            beat.join()

    def _run(self, spec_path: Path) -> JobStatus | None:
        try:
            cmd, env = self.worker._command(self.job, spec_path, self.workdir)
        except Exception as exc:
            self.log.exception("preparing %s failed", self.job.id)
            return self.finish(JobStatus.FAILED, error=f"could not start the job: {exc}")
        self._beat_now()  # servers can take minutes: read a cancel that came meanwhile, not a beat late
        if (reason := self._stop_reason()) is not None:  # asked to stop while the servers started
            return self._conclude(None, reason)

        with open(self.workdir / "job.log", "a", encoding="utf-8") as logfile:
            logfile.write(f"--- attempt {self.attempt}: {' '.join(cmd)}\n")
            logfile.flush()
            if sys.platform == "linux":  # the guard ends the job's group if this worker dies
                cmd = [sys.executable, "-m", "charter.service.jobguard", str(os.getpid()), *cmd]
            proc = subprocess.Popen(
                cmd,
                start_new_session=True,  # its own process group: a cancel kills everything it started
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",  # a stray byte in a log line must not stop the pump
                env=env,
                preexec_fn=_limits(self.worker.settings),  # ops: per-job memory limit
            )
            assert proc.stdout is not None
            pump = threading.Thread(target=self._pump, args=(proc.stdout, logfile), daemon=True)
            pump.start()
            reason = self._watch(proc)
            _kill_group(proc, grace=0)  # stragglers the job left behind in its group
            pump.join(timeout=KILL_GRACE_S)
        return self._conclude(proc.returncode, reason)

    def _heartbeat(self) -> None:
        """Renew the lease every ≤2 s until the run ends; note a requested cancel or a lost lease."""
        interval = min(self.worker.settings.heartbeat_seconds, 2.0)  # a cancel acts within ~2 s
        while not self._done.wait(interval):
            self._beat_now()

    def _beat_now(self) -> None:
        try:
            if self.store.heartbeat(self.job.id, self.worker.worker_id, self.attempt) == JobStatus.CANCELLING:
                self.cancel_requested = True
        except LeaseLost:
            self.lost = True
        except Exception:  # the database hiccuped; the lease has slack, try again next beat
            self.log.warning("heartbeat for %s failed", self.job.id, exc_info=True)

    def _stop_reason(self) -> str | None:
        if self.lost:
            return "lost"
        if self.cancel_requested:
            return "cancel"
        return "stop" if self.worker._stop.is_set() else None

    def _watch(self, proc: subprocess.Popen[str]) -> str | None:
        """Wait for the process; returns why it was stopped early (cancel, stop, lost) or None."""
        while True:
            try:
                proc.wait(timeout=0.2)
                return None
            except subprocess.TimeoutExpired:
                pass
            if (reason := self._stop_reason()) is not None:
                self.log.info("stopping %s (%s)", self.job.id, reason)
                _kill_group(proc, grace=KILL_GRACE_S)
                return reason

    def _conclude(self, returncode: int | None, outcome: str | None) -> JobStatus | None:
        if outcome == "lost" or self.lost:
            self.log.warning("lease on %s lost; leaving the job to its new worker", self.job.id)
            return None
        if outcome == "cancel":
            self.note("cancelled by request")
            return self.finish(JobStatus.CANCELLED)
        if outcome == "stop":
            self.note("worker stopping; the job goes back to the queue and resumes")
            try:
                return self.store.release(self.job.id, self.worker.worker_id, self.attempt).status
            except LeaseLost:
                return None
        if returncode == 0:
            try:
                result = json.loads((self.workdir / "result.json").read_text())
                if not isinstance(result, dict):
                    raise ValueError("it is not a JSON object")
            except (OSError, ValueError) as exc:
                return self.finish(JobStatus.FAILED, error=f"job process exited 0 but left no valid result.json: {exc}")
            return self.finish(JobStatus.SUCCEEDED, result=result)
        assert returncode is not None
        if returncode < 0 and self.attempt <= self.worker.settings.job_retries:  # ops: killed, not failed
            return self._retry(returncode)
        return self.finish(JobStatus.FAILED, error=self.last_error or self._exit_message(returncode))

    def _retry(self, returncode: int) -> JobStatus | None:
        """ops: a job process killed by a signal goes back to the queue; its next attempt resumes
        after the last stage with a manifest (CHARTER_JOB_RETRIES bounds how often)."""
        self.note(f"{self._exit_message(returncode)}; the job goes back to the queue and resumes", level="warning")
        try:
            return self.store.release(self.job.id, self.worker.worker_id, self.attempt).status
        except LeaseLost:
            return None

    def _exit_message(self, returncode: int) -> str:
        msg = f"job process exited with code {returncode}"
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = str(-returncode)
            hint = ", often the out-of-memory killer" if name == "SIGKILL" else ""
            msg += f" (signal {name}{hint})"
        if self.tail:
            tail = "\n".join(self.tail)[-1500:]
            msg += f"; last lines of {self.workdir / 'job.log'}:\n{tail}"
        return msg

    def _pump(self, stdout: IO[str], logfile: IO[str]) -> None:
        """Read the job's stdout to its end: events to the store, everything else to job.log."""
        for line in stdout:
            line = line.rstrip("\n")
            try:
                if (event := _parse_event(line)) is not None:
                    self._record(*event)
                else:
                    self.tail.append(line)
                    logfile.write(line + "\n")
                    logfile.flush()
            except LeaseLost:
                self.lost = True
            except Exception:  # keep draining the pipe whatever happens, or the job blocks on a full one
                self.log.warning("handling output of %s failed: %r", self.job.id, line[:200], exc_info=True)

    def _record(self, type: str, level: str, data: dict[str, Any]) -> None:
        if level == "error" and data.get("message"):
            self.last_error = str(data["message"])
        if self.lost:
            return
        if type == "stage" and data.get("state") == "progress":
            now = time.monotonic()
            if now - self._last_progress < PROGRESS_INTERVAL_S:
                return
            self._last_progress = now
        self.emit(type, data, level)
        if type == "stage":
            self.store.update_progress(self.job.id, self.worker.worker_id, self.attempt, data.get("stage"), data)

    def emit(self, type: str, data: dict[str, Any], level: str = "info") -> None:
        self.store.append_event(self.job.id, type, data, level, attempt=self.attempt)

    def note(self, message: str, level: str = "info", **extra: Any) -> None:
        """A message event from the worker itself; a lost lease is noted, not raised."""
        try:
            self.emit("message", {"message": message, **extra}, level)
        except LeaseLost:
            self.lost = True

    def finish(
        self, status: JobStatus, error: str | None = None, result: dict[str, Any] | None = None
    ) -> JobStatus | None:
        if error and error != self.last_error:  # the job's own error event is already stored
            self.note(error, level="error")
        try:
            self.store.finish(self.job.id, self.worker.worker_id, self.attempt, status, error=error, result=result)
        except LeaseLost:
            self.log.warning("lease on %s lost before it finished as %s", self.job.id, status.value)
            return None
        self.log.info("%s %s", self.job.id, status.value)
        return status


def _parse_event(line: str) -> tuple[str, str, dict[str, Any]] | None:
    """`@@event {json}` → (type, level, data); anything else, malformed events included, is a log line."""
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        event = json.loads(line[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("type") not in EVENT_TYPES:
        return None
    level = event.get("level", "info")
    data = event.get("data") or {}
    if level not in LEVELS or not isinstance(data, dict):
        return None
    return event["type"], level, data


def _limits(settings: Settings) -> Callable[[], None] | None:
    """ops: the job process's address-space limit (RLIMIT_AS), so a job that outgrows
    CHARTER_JOB_MEMORY_MB fails with MemoryError instead of waking the host's OOM killer."""
    import resource  # here, in the worker: importing after fork could deadlock on a lock another thread held

    if not settings.job_memory_mb:
        return None
    limit = settings.job_memory_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _kill_group(proc: subprocess.Popen[str], grace: float) -> None:
    """SIGTERM the job's process group, SIGKILL it after `grace` seconds, and reap the leader."""
    if grace > 0 and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
