"""API keys: made by `charter keys create`, sent as `Authorization: Bearer chk_<id>_<secret>`.

Only the sha256 of a token is stored. The id inside the token finds the row; the hashes
are then compared with `hmac.compare_digest`, so the time a check takes says nothing
about how much of a guessed token was right. A token is shown once, when it is made.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from charter.errors import CharterError
from charter.service.db import ApiKey, utcnow

PREFIX = "chk_"
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,99}$")
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class KeyNotFound(CharterError):
    """No API key has this id or name."""

    status_code = 404

    def __init__(self, ref: str):
        super().__init__(f"no API key {ref!r}; list them with `charter keys list`")


class InvalidKeyRequest(CharterError):
    """A key cannot be made as asked; the message says why."""

    status_code = 422


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class KeyStore:
    """The api_keys table: create, list, revoke, and verify a presented token."""

    def __init__(self, engine: Engine):
        self.engine = engine

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            if write:
                session.connection(execution_options={"sqlite_immediate": True})
            yield session

    def create(self, name: str, tenant: str = "default", admin: bool = False) -> tuple[ApiKey, str]:
        """A new key and its token (shown once; only its hash is kept)."""
        if not name.strip():
            raise InvalidKeyRequest("a key needs a name (--name), e.g. the person or service that uses it")
        if not TENANT_RE.match(tenant):
            raise InvalidKeyRequest(
                f"tenant {tenant!r}: use lower-case letters, digits, '.', '_' and '-' (at most 100), e.g. team-a"
            )
        key_id = secrets.token_hex(6)
        token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        with self._session(write=True) as s:
            key = ApiKey(id=key_id, name=name.strip(), tenant=tenant, admin=admin, hash=hash_token(token))
            s.add(key)
        return key, token

    def list(self) -> list[ApiKey]:
        with self._session() as s:
            return list(s.scalars(sa.select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))

    def revoke(self, ref: str) -> list[ApiKey]:
        """Revoke the key with this id, or every live key with this name."""
        with self._session(write=True) as s:
            keys = list(
                s.scalars(
                    sa.select(ApiKey).where(sa.or_(ApiKey.id == ref, ApiKey.name == ref), ApiKey.revoked_at.is_(None))
                )
            )
            if not keys:
                raise KeyNotFound(ref)
            for key in keys:
                key.revoked_at = utcnow()
            return keys

    def verify(self, token: str) -> ApiKey | None:
        """The live key this token belongs to, or None."""
        key_id = token[len(PREFIX) :].split("_", 1)[0] if token.startswith(PREFIX) else ""
        with self._session() as s:
            key = s.get(ApiKey, key_id) if key_id else None
        # Compared even without a row, so a missing id costs the same time as a wrong secret.
        matches = hmac.compare_digest(hash_token(token), key.hash if key else _DUMMY_HASH)
        if key is None or not matches or key.revoked_at is not None:
            return None
        return key
