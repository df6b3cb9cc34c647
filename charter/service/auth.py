"""Who is calling: the principal (tenant, admin) of a request.

Every route that touches a tenant's data takes `principal: PrincipalDep` and passes
`principal.scope` to the store: None for an admin (sees everything), else the tenant name.
Another tenant's job is then "not found", exactly like a job that does not exist.

With keys required (`Settings.auth_required`), a request carries `Authorization: Bearer
chk_…` (see charter.service.keys); without, on the embedded default bound to 127.0.0.1,
every caller is the local admin of tenant "default".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from charter.errors import CharterError

DEFAULT_TENANT = "default"


class Unauthorized(CharterError):
    """The request carries no valid API key."""

    status_code = 401
    headers = {"WWW-Authenticate": 'Bearer realm="charter"'}


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant filter for store queries: None (all tenants) for an admin."""
        return None if self.admin else self.tenant


LOCAL_ADMIN = Principal(tenant=DEFAULT_TENANT, admin=True)


def current_principal(request: Request) -> Principal:
    if not request.app.state.settings.auth_required:
        return LOCAL_ADMIN
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "this charter service needs an API key: send `Authorization: Bearer <key>` "
            "(the CLI reads CHARTER_API_KEY); an operator makes keys with `charter keys create --name NAME`"
        )
    key = request.app.state.keys.verify(token.strip())
    if key is None:
        raise Unauthorized("the API key is not valid or was revoked; ask an operator for a key (`charter keys list`)")
    principal = Principal(tenant=key.tenant, admin=key.admin, key_id=key.id)
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
