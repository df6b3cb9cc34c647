"""Logging for the API and the worker: plain text, or one JSON object a line (CHARTER_LOG_FORMAT=json).

A record about a job carries `job_id` (pass `extra={"job_id": …}`, or log through `job_logger`);
JSON lines then have it as a field, so a log system can follow one job across processes.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

# LogRecord attributes that are not "extra" fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send every logger (uvicorn's too) to stderr in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # theirs would print a second time
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def job_logger(logger: logging.Logger, job_id: str) -> logging.LoggerAdapter:
    return logging.LoggerAdapter(logger, {"job_id": job_id})
