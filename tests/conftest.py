"""Session fixtures shared by the suite: prepared models, and one real vLLM server.

Models are prepared once into `.charter/test-models` (kept between local runs; CI builds it
fresh in about a minute). The tiny vLLM server takes about a minute to start on a CPU, so
every test that needs a judge shares it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / ".charter" / "test-models"
os.environ.setdefault("CHARTER_MODELS_DIR", str(MODELS))


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from charter import models

    return str(models.prepare("tiny"))


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    from charter import models

    return str(models.prepare("smollm2-135m"))


@pytest.fixture(scope="session")
def tiny_server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real vLLM OpenAI server on the tiny model; yields its base URL."""
    from charter.pipelines import servers

    port = servers.free_port()
    log = tmp_path_factory.mktemp("vllm") / "tiny.log"
    proc = servers.start_server(tiny_model, port, log, kvcache_gib=1)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        servers.wait_ready(url, proc, 600, log)
        yield url
    finally:
        servers._stop(proc)
