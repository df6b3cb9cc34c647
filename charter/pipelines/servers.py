"""Local vLLM servers the worker starts and owns, one per model, reused across jobs.

A job whose judge names no `base_url` gets a server for its judge model (and one for its
policy model, the same one when they match). Start-up takes 30–90 s on a CPU, so servers
stay up until the worker stops. The job process receives the URLs as environment variables.
Nothing here imports torch or vllm: the server is a subprocess.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from charter import models
from charter.errors import CharterError
from charter.settings import Settings
from charter.spec import JobSpec

START_TIMEOUT_S = float(os.environ.get("CHARTER_VLLM_START_TIMEOUT", "600"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_name(model_ref: str) -> str:
    return Path(model_ref).name or model_ref


def has_gpu() -> bool:
    """An NVIDIA device node exists; read from /dev so this process need not import torch."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """The CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def default_dtype() -> str:
    """`--dtype` for a local server: vLLM's `auto` runs a float32 checkpoint in bfloat16 on a
    CPU, which without native bf16 decoded 2.5x slower than float32 here; so float32 there."""
    return "auto" if has_gpu() or cpu_has_bf16() else "float32"


def healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url.removesuffix("/v1") + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait_ready(base_url: str, proc: subprocess.Popen | None, timeout_s: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise CharterError(
                f"vLLM server for {base_url} exited with code {proc.returncode} while starting; log {log}:\n{tail}"
            )
        if healthy(base_url):
            return
        time.sleep(1.0)
    raise CharterError(f"vLLM server at {base_url} was not ready within {timeout_s:.0f} s; see {log}")


def start_server(
    model_path: str,
    port: int,
    log: Path,
    kvcache_gib: float,
    max_model_len: int = 2048,
) -> subprocess.Popen:
    env = dict(os.environ)
    # Whole GiB only (vLLM reads an int). All cores: the job process trains while the server idles.
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(kvcache_gib))))
    env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        served_name(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        os.environ.get("CHARTER_VLLM_DTYPE") or default_dtype(),
        "--disable-uvicorn-access-log",
        # Never --trust-remote-code: no Python shipped with a model runs; no pickle weights load.
        "--load-format",
        "safetensors",
    ]
    if has_gpu():  # several servers (a judge, a policy) and training may share one GPU
        cmd.append(f"--gpu-memory-utilization={os.environ.get('CHARTER_VLLM_GPU_MEMORY_UTILIZATION', '0.9')}")
    if (os.environ.get("CHARTER_VLLM_EAGER") or ("0" if has_gpu() else "1")) == "1":
        # On a CPU torch.compile costs ~2.5 min of start-up and gains nothing measurable
        # (bench/vllm_cpu_settings.py: start 181 s → 39 s, decode 45–57 tok/s either way).
        cmd.append("--enforce-eager")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class VLLMServerPool:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._servers: dict[str, tuple[subprocess.Popen, str]] = {}
        self._lock = threading.Lock()

    def ensure(self, model_path: str, notify: Callable[[str], None] | None = None) -> str:
        """The base URL of a ready server for `model_path`, starting one if needed."""
        notify = notify or (lambda _: None)
        with self._lock:
            if model_path in self._servers:
                proc, url = self._servers[model_path]
                if proc.poll() is None and healthy(url):
                    return url
                _stop(proc)  # dead, or its engine died behind a live API process: start afresh
                del self._servers[model_path]
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            log = self.settings.home / "logs" / f"vllm-{served_name(model_path)}-{port}.log"
            notify(
                f"starting a local vLLM server for {served_name(model_path)} at {url} "
                f"(a minute or more on a CPU; later jobs reuse it); log: {log}"
            )
            t0 = time.monotonic()
            proc = start_server(model_path, port, log, self.settings.vllm_kvcache_gib)
            try:
                wait_ready(url, proc, START_TIMEOUT_S, log)
            except Exception:
                _stop(proc)
                raise
            notify(f"vLLM server for {served_name(model_path)} ready after {time.monotonic() - t0:.0f} s")
            self._servers[model_path] = (proc, url)
            return url

    def close(self) -> None:
        with self._lock:
            for proc, _ in self._servers.values():
                _stop(proc)
            self._servers.clear()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def job_endpoints(
    spec: JobSpec,
    pool: VLLMServerPool,
    notify: Callable[[str], None] | None = None,
) -> dict[str, str]:
    """Environment for a job process: where its judge and its policy are served.

    The judge is the spec's `judge.base_url`, else the deployment's judge server
    (CHARTER_JUDGE_URL in the worker's environment, as in docker/compose.yaml), else a local
    server the pool starts for the judge model. A job that only trains on a dataset gets none.
    """
    env = {"CHARTER_FILES_DIR": str(pool.settings.artifact_root / "files")}
    policy_path = models.ensure(spec.policy.model, pool.settings)
    if not spec.needs_servers:
        return env  # it only trains on a dataset: no server to start
    if judge_url := spec.judge.base_url or os.environ.get("CHARTER_JUDGE_URL"):
        env["CHARTER_JUDGE_URL"] = judge_url
        env["CHARTER_POLICY_URL"] = pool.ensure(policy_path, notify)
        return env
    judge_path = models.ensure(spec.judge_model, pool.settings)
    env["CHARTER_JUDGE_URL"] = pool.ensure(judge_path, notify)
    # One server when the policy is the judge's model: no second copy in memory.
    env["CHARTER_POLICY_URL"] = (
        env["CHARTER_JUDGE_URL"] if judge_path == policy_path else pool.ensure(policy_path, notify)
    )
    return env
