"""Process settings, read once from environment variables.

Every variable is documented in README.md ("Configuration"). Nothing here imports torch,
so the API process can read settings and stay small.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _home() -> Path:
    return Path(os.environ.get("CHARTER_HOME", Path.home() / ".cache" / "charter")).expanduser()


@dataclass(frozen=True)
class Settings:
    home: Path = field(default_factory=_home)
    # SQLite in WAL mode is the embedded default; postgresql+psycopg://… for many machines.
    database_url: str = ""
    artifact_root: Path = Path()
    models_dir: Path = Path()
    host: str = "127.0.0.1"
    port: int = 8400
    # GiB of KV cache for each vLLM server the worker starts on a CPU (VLLM_CPU_KVCACHE_SPACE).
    vllm_kvcache_gib: float = 2.0
    # Seconds a worker's claim on a job lasts without a heartbeat.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    # -- ops: per-job resource limits (CHARTER_JOB_MEMORY_MB); 0 means none.
    job_memory_mb: int = 0
    # -- ops: times a job whose process was killed by a signal is run again (CHARTER_JOB_RETRIES).
    job_retries: int = 1

    @classmethod
    def from_env(cls) -> Settings:
        home = _home()
        return cls(
            home=home,
            database_url=os.environ.get("DATABASE_URL", f"sqlite:///{home / 'charter.db'}"),
            artifact_root=Path(os.environ.get("ARTIFACT_ROOT", home / "artifacts")).expanduser(),
            models_dir=Path(os.environ.get("CHARTER_MODELS_DIR", home / "models")).expanduser(),
            host=os.environ.get("CHARTER_HOST", "127.0.0.1"),
            port=int(os.environ.get("CHARTER_PORT", "8400")),
            vllm_kvcache_gib=float(os.environ.get("CHARTER_VLLM_KVCACHE_GIB", "2")),
            lease_seconds=float(os.environ.get("CHARTER_LEASE_SECONDS", "60")),
            heartbeat_seconds=float(os.environ.get("CHARTER_HEARTBEAT_SECONDS", "5")),
            job_memory_mb=int(os.environ.get("CHARTER_JOB_MEMORY_MB", "0")),
            job_retries=int(os.environ.get("CHARTER_JOB_RETRIES", "1")),
        )
