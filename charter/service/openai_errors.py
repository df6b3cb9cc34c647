"""Errors in OpenAI's shape on the OpenAI-compatible routes (/v1/files, /v1/fine_tuning).

    {"error": {"message": "...", "type": "invalid_request_error", "param": "training_file", "code": null}}

The official `openai` SDK reads this shape into its exceptions (`BadRequestError`, …). Routers
made with `route_class=OpenAIRoute` answer every error this way; charter's own routes keep
their `{"detail": …}`. OpenAI reports an invalid request as 400, so charter's 422s become 400 here.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from charter.errors import CharterError, ConstitutionError, SpecError

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(CharterError):
    """An error raised by an OpenAI-compatible route, naming the request parameter at fault."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        self.status_code, self.param, self.code = status_code, param, code
        super().__init__(message)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    status = 400 if status == 422 else status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _from_exception(exc: Exception) -> JSONResponse | None:
    if isinstance(exc, OpenAIError):
        return error_response(exc.status_code, str(exc), exc.param, exc.code)
    if isinstance(exc, SpecError):
        first = exc.errors[0]["loc"] if exc.errors else []
        return error_response(exc.status_code, str(exc), ".".join(map(str, first)) or None)
    if isinstance(exc, ConstitutionError):
        return error_response(exc.status_code, str(exc), "constitution", "invalid_constitution")
    if isinstance(exc, CharterError):
        return error_response(exc.status_code, str(exc))
    if isinstance(exc, RequestValidationError):
        errors = exc.errors()
        msgs = [f"{_param(e['loc']) or 'body'}: {e.get('msg')}" for e in errors]
        return error_response(
            400, "; ".join(dict.fromkeys(msgs)) or "invalid request", _param(errors[0]["loc"]) if errors else None
        )
    if isinstance(exc, HTTPException):
        return error_response(exc.status_code, str(exc.detail))
    return None


def _param(loc: Any) -> str | None:
    """A request error's location as the parameter a user wrote: `method.dpo.hyperparameters.beta`.

    pydantic also names union branches (`constrained-float`, `literal['auto']`) and the
    request part (`body`); neither is a parameter.
    """
    parts = [str(p) for p in loc[1:] if isinstance(p, int) or str(p).isidentifier()]
    return ".".join(parts) or None


class OpenAIRoute(APIRoute):
    """A route whose errors (request validation included) come back in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                if (response := _from_exception(exc)) is None:
                    raise
                return response

        return route
