"""Errors a user can hit. Each says what was wrong and what to do, and carries its HTTP status."""

from __future__ import annotations

from typing import Any


class CharterError(Exception):
    """Base of the errors charter reports to users."""

    status_code = 500


class SpecError(CharterError):
    """The job spec is invalid; `errors` lists each problem as {loc, msg}."""

    status_code = 422

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))

    @classmethod
    def one(cls, loc: tuple[str | int, ...] | list[str | int], msg: str) -> SpecError:
        return cls([{"loc": list(loc), "msg": msg}])


class ModelNotFound(CharterError):
    """A model name is neither prepared, nor a local folder, nor a known HF model id."""

    status_code = 422


class ConstitutionError(CharterError):
    """A constitution failed to load or validate; `errors` lists each problem by field."""

    status_code = 422

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("; ".join(errors))


class JudgeError(CharterError):
    """The judge server could not be reached or kept failing; the message names the URL."""

    status_code = 502
