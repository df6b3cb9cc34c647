"""charter: a constitutional post-training service.

A job runs Anthropic's Constitutional AI loop — a policy answers prompts, a vLLM-hosted
judge critiques, revises and labels them against a constitution — and trains the policy
with TRL. See README.md for the two commands to start with (`make demo`, `make test`).

    import charter
    client = charter.Client("http://127.0.0.1:8400")     # the light client: no torch

`import charter` loads nothing heavy; `charter.Client` loads only the client (httpx).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "ClientError", "Job"]

if TYPE_CHECKING:
    from charter.client import Client, ClientError, Job


def __getattr__(name: str) -> Any:
    if name in __all__:
        from charter import client

        return getattr(client, name)
    raise AttributeError(f"module 'charter' has no attribute {name!r}")
