"""Two ASGI middlewares: a request body size limit (413), and an access log line per request.

Plain ASGI rather than BaseHTTPMiddleware, so streamed responses (events, artifacts) pass
through untouched.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("charter.api")
JOB_IN_PATH = re.compile(r"^/v1/(?:fine_tuning/)?jobs/([A-Za-z0-9_-]+)")


OPENAI_PATHS = ("/v1/files", "/v1/fine_tuning")


def _too_large_body(path: str, message: str) -> dict:
    """charter's {"detail"} shape, or OpenAI's error shape on the OpenAI-compatible routes."""
    if path.startswith(OPENAI_PATHS):
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "too_large"}}
    return {"detail": message}


class BodyLimit:
    """Refuse a request body larger than its route's limit, before or while it is read."""

    def __init__(self, app: ASGIApp, limit: int, setting: str, overrides: Sequence[tuple[str, int, str]] = ()):
        self.app, self.limit, self.setting = app, limit, setting
        self.overrides = overrides  # (path prefix, limit, setting name)

    def _limit(self, path: str) -> tuple[int, str]:
        for prefix, limit, setting in self.overrides:
            if path.startswith(prefix):
                return limit, setting
        return self.limit, self.setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, setting = self._limit(scope["path"])

        def too_large(size: str) -> HTTPException:
            return HTTPException(
                413,
                f"the request body is {size}; the limit is {limit} bytes ({setting}); send less, or raise {setting}",
            )

        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            response = JSONResponse(
                _too_large_body(scope["path"], too_large(f"{int(length)} bytes").detail), status_code=413
            )
            return await response(scope, receive, send)

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # a body sent without content-length (chunked)
                    raise too_large(f"over {limit} bytes")
            return message

        async def watch_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watch_send)
        except HTTPException as exc:  # raised where the route did not turn it into a response
            if started or exc.status_code != 413:
                raise
            await JSONResponse(_too_large_body(scope["path"], exc.detail), status_code=413)(scope, receive, send)


class AccessLog:
    """One log line per request: method, path, status, milliseconds, and the job id and tenant if any."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            path = scope["path"]
            extra: dict[str, Any] = {
                "method": scope["method"],
                "path": path,
                "status": status or 500,
                "ms": round((time.perf_counter() - start) * 1000, 1),
            }
            if m := JOB_IN_PATH.match(path):
                extra["job_id"] = m.group(1)
            principal = (scope.get("state") or {}).get("principal")
            if principal is not None:
                extra["tenant"] = principal.tenant
            if path not in ("/healthz", "/readyz", "/metrics"):
                access_log.info("%s %s %s", scope["method"], path, extra["status"], extra=extra)
