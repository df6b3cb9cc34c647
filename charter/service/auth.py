"""Who is calling: the principal (tenant, admin) of a request.

Every route that touches a tenant's data takes `principal: PrincipalDep` and passes
`principal.scope` to the store: None for an admin (sees everything), else the tenant name.

This first version has no keys: every caller is the local admin of tenant "default"
(the embedded default, bound to 127.0.0.1). API keys (`charter keys create`, Bearer,
hashed, constant-time compare) replace `current_principal`'s body; its signature stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

DEFAULT_TENANT = "default"


@dataclass(frozen=True)
class Principal:
    tenant: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant filter for store queries: None (all tenants) for an admin."""
        return None if self.admin else self.tenant


def current_principal(request: Request) -> Principal:
    return Principal(tenant=DEFAULT_TENANT, admin=True)


PrincipalDep = Annotated[Principal, Depends(current_principal)]
