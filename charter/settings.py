"""Process settings, read once from environment variables.

Every variable is documented in README.md ("Configuration"). Nothing here imports torch,
so the API process can read settings and stay small.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from charter.errors import CharterError


class SettingsError(CharterError):
    """An environment variable holds a value charter cannot use; the message names it."""


def _home() -> Path:
    return Path(os.environ.get("CHARTER_HOME", Path.home() / ".cache" / "charter")).expanduser()


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    vllm_kvcache_gib: float = 4.0
    # Seconds a worker's claim on a job lasts without a heartbeat.
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    # API keys: "on", "off" (only on a loopback address), or "auto" (off on loopback, else on).
    auth: str = "auto"
    max_body_bytes: int = 1 << 20  # a request body (job specs); uploads have their own limit
    max_upload_bytes: int = 100 << 20  # a POST /v1/files body
    max_queued_jobs: int = 100  # jobs one tenant may have queued at once
    log_format: str = "text"  # text | json (one JSON object a line, with job_id)
    worker_labels: tuple[str, ...] = ()  # a worker takes only jobs whose resources.labels it all has
    # Folders whose files a job spec may name by path (CHARTER_DATA_ROOTS); models_dir always is one.
    data_roots: tuple[Path, ...] = ()

    @property
    def roots(self) -> tuple[Path, ...]:
        """Every folder a spec's local paths may lie under: the prepared models, then CHARTER_DATA_ROOTS."""
        return (self.models_dir, *self.data_roots)

    @property
    def auth_required(self) -> bool:
        """Whether requests must carry an API key."""
        return self.auth == "on" or (self.auth == "auto" and not is_loopback(self.host))

    def check_auth(self) -> None:
        """Refuse to serve without keys anywhere but on a loopback address."""
        if not self.auth_required and not is_loopback(self.host):
            raise SettingsError(
                f"CHARTER_AUTH=off would let anyone who reaches {self.host} read and cancel every job; "
                "it is allowed only when the API binds to 127.0.0.1 or localhost. Set CHARTER_AUTH=on and "
                "create a key with `charter keys create --name admin --admin`, or bind to 127.0.0.1 (CHARTER_HOST)"
            )

    # -- ops: per-job resource limits (CHARTER_JOB_MEMORY_MB); 0 means none.
    job_memory_mb: int = 0
    # -- ops: times a job whose process was killed by a signal is run again (CHARTER_JOB_RETRIES).
    job_retries: int = 1

    @classmethod
    def from_env(cls) -> Settings:
        home = _home()
        env = os.environ.get
        return cls(
            home=home,
            database_url=env("DATABASE_URL", f"sqlite:///{home / 'charter.db'}"),
            artifact_root=Path(env("ARTIFACT_ROOT", home / "artifacts")).expanduser(),
            models_dir=Path(env("CHARTER_MODELS_DIR", home / "models")).expanduser(),
            host=env("CHARTER_HOST", "127.0.0.1"),
            port=_number("CHARTER_PORT", "8400", int),
            vllm_kvcache_gib=_number("CHARTER_VLLM_KVCACHE_GIB", "4", float),
            lease_seconds=_number("CHARTER_LEASE_SECONDS", "60", float),
            heartbeat_seconds=_number("CHARTER_HEARTBEAT_SECONDS", "5", float),
            auth=_choice("CHARTER_AUTH", "auto", ("auto", "on", "off")),
            max_body_bytes=_number("CHARTER_MAX_BODY_BYTES", str(1 << 20), int),
            max_upload_bytes=_number("CHARTER_MAX_UPLOAD_BYTES", str(100 << 20), int),
            max_queued_jobs=_number("CHARTER_MAX_QUEUED_JOBS", "100", int),
            log_format=_choice("CHARTER_LOG_FORMAT", "text", ("text", "json")),
            worker_labels=parse_labels(env("CHARTER_WORKER_LABELS", ""), "CHARTER_WORKER_LABELS"),
            data_roots=parse_roots(env("CHARTER_DATA_ROOTS", str(home / "data"))),
            job_memory_mb=_number("CHARTER_JOB_MEMORY_MB", "0", int),
            job_retries=_number("CHARTER_JOB_RETRIES", "1", int),
        )


def _number(name: str, default: str, kind: type[int] | type[float]) -> int | float:
    raw = os.environ.get(name, default)
    try:
        return kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a {'whole ' if kind is int else ''}number") from None


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, default).strip().lower()
    if raw not in choices:
        raise SettingsError(f"{name}={raw!r}: use one of {', '.join(choices)}")
    return raw


def parse_roots(raw: str) -> tuple[Path, ...]:
    """'/data/models:/data/shared' → absolute paths; empty entries are skipped, `~` expanded."""
    roots = [Path(part).expanduser() for part in raw.split(os.pathsep) if part.strip()]
    relative = [str(r) for r in roots if not r.is_absolute()]
    if relative:
        raise SettingsError(f"CHARTER_DATA_ROOTS: each root must be an absolute path, not {relative[0]!r}")
    return tuple(roots)


def parse_labels(raw: str, where: str = "labels") -> tuple[str, ...]:
    """'gpu, a100' → ('a100', 'gpu'): lower-case, sorted, unique; at most 8 (claims try every subset)."""
    labels = tuple(sorted({label.strip().lower() for label in raw.split(",") if label.strip()}))
    bad = [label for label in labels if not label.replace("-", "").replace("_", "").isalnum()]
    if bad:
        raise SettingsError(f"{where}: labels are letters, digits, '-' and '_', not {bad[0]!r}")
    if len(labels) > 8:
        raise SettingsError(f"{where}: at most 8 labels, got {len(labels)}")
    return labels
