"""An OpenAI-compatible engine (a vLLM server, or several replicas), spoken to with `openai`.

Requests go out concurrently, bounded by a semaphore, round-robin over the replicas, and are
retried with backoff on transport errors, timeouts, 5xx and replies that are not the
protocol's shape (a proxy's HTML page, a truncated body); vLLM batches what is in flight.
After the last retry the error names the URL and the cause. Generated tokens are counted so stages can
report tokens/s.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

# At module level, not lazily: a job's label stage runs in a thread beside critique/revise, and
# two threads importing httpx at once can see it half-initialised (a circular-import error).
import httpx
import openai
from openai import AsyncOpenAI

from charter.errors import JudgeError

T = TypeVar("T")
Messages = list[dict[str, str]]


@dataclass
class Usage:
    completion_tokens: int = 0
    prompt_tokens: int = 0
    requests: int = 0
    retries: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / max(time.monotonic() - self.started, 1e-9)


class GarbageReply(Exception):
    """The server answered 200 with something that is not an OpenAI-protocol reply."""


def _has_choices(r: Any) -> bool:
    return isinstance(getattr(r, "choices", None), list) and len(r.choices) > 0


class Engine:
    def __init__(
        self,
        base_urls: str | Sequence[str],
        model: str | None = None,
        *,
        name: str = "judge",
        max_concurrency: int = 32,
        timeout_s: float = 300.0,
        retries: int = 3,
        api_key: str = "EMPTY",
    ):
        urls = [u.strip() for u in base_urls.split(",")] if isinstance(base_urls, str) else list(base_urls)
        self.urls = urls
        self.name = name
        self.retries = retries
        self.max_concurrency = max_concurrency
        # The SDK's own retries are off: ours are visible in Usage and name the URL at the end.
        self._clients = [AsyncOpenAI(base_url=u, api_key=api_key, timeout=timeout_s, max_retries=0) for u in urls]
        self._next = itertools.cycle(range(len(urls)))
        self._model = model
        self.usage = Usage()
        self._sem: asyncio.Semaphore | None = None
        self._letter_ids: dict[tuple[str, ...], dict[str, list[int]] | None] = {}
        self._letter_pending: dict[tuple[str, ...], asyncio.Future] = {}

    async def model(self) -> str:
        if self._model is None:
            models = await self._call(
                lambda c: c.models.list(), lambda r: isinstance(getattr(r, "data", None), list) and len(r.data) > 0
            )
            self._model = models.data[0].id
        return self._model

    async def _call(self, fn: Callable[[Any], Awaitable[T]], valid: Callable[[Any], bool] = _has_choices) -> T:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.max_concurrency)
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            i = next(self._next)
            try:
                async with self._sem:
                    r = await fn(self._clients[i])
                if not valid(r):
                    raise GarbageReply(f"the reply is not an OpenAI-protocol response: {str(r)[:200]!r}")
                return r
            except (
                openai.APIConnectionError,
                openai.APITimeoutError,
                openai.InternalServerError,
                openai.RateLimitError,
                openai.APIResponseValidationError,
                ValueError,  # a body that is not JSON, or not text (JSONDecodeError, UnicodeDecodeError)
                GarbageReply,
            ) as e:
                last = e
                self.usage.retries += 1
                if attempt < self.retries:
                    await asyncio.sleep(min(0.5 * 2**attempt, 8.0))
            except openai.APIStatusError as e:  # 4xx: our request is wrong; retrying won't help
                raise JudgeError(f"{self.name} at {self.urls[i]} refused a request: {e.status_code} {e.message}") from e
        cause = f"{type(last).__name__}: {last}"
        if isinstance(last, ValueError):
            cause = f"its reply is not JSON ({cause})"
        raise JudgeError(f"{self.name} at {self.urls[i]} failed after {self.retries + 1} attempts: {cause}") from last

    async def chat(
        self,
        messages: Messages,
        *,
        max_tokens: int,
        temperature: float,
        n: int = 1,
        seed: int | None = None,
        regex: str | None = None,
    ) -> list[str | None]:
        """Sampled replies; `regex` constrains them with vLLM's structured outputs."""
        model = await self.model()
        extra = {"extra_body": {"structured_outputs": {"regex": regex}}} if regex else {}

        async def go(c: Any) -> Any:
            return await c.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed, **extra
            )

        r = await self._call(go)
        self.usage.requests += 1
        if r.usage:
            self.usage.completion_tokens += r.usage.completion_tokens
            self.usage.prompt_tokens += r.usage.prompt_tokens
        return [c.message.content for c in r.choices]

    async def _one_token(self, messages: Messages, **kw: Any) -> Any:
        """A greedy one-token request (the judge's first answer token); prompt tokens counted."""
        model = await self.model()

        async def go(c: Any) -> Any:
            return await c.chat.completions.create(model=model, messages=messages, max_tokens=1, temperature=0.0, **kw)

        r = await self._call(go)
        self.usage.requests += 1
        if r.usage:
            self.usage.prompt_tokens += r.usage.prompt_tokens
        return r

    async def first_token_logprobs(self, messages: Messages, k: int = 20) -> dict[str, float] | None:
        """The top-k {token: logprob} of the judge's first answer token (one token generated)."""
        r = await self._one_token(messages, logprobs=True, top_logprobs=k)
        lp = r.choices[0].logprobs if r.choices else None
        if not lp or not lp.content:
            return None
        return {t.token: t.logprob for t in lp.content[0].top_logprobs}

    async def token_ids(self, text: str) -> list[int] | None:
        """`text` as the served model's token ids, from vLLM's `/tokenize`; None if the server has none."""
        model = await self.model()
        root = self.urls[0].removesuffix("/").removesuffix("/v1")
        try:
            async with httpx.AsyncClient(timeout=30) as h:
                r = await h.post(f"{root}/tokenize", json={"model": model, "prompt": text, "add_special_tokens": False})
            return list(r.json()["tokens"]) if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    async def letter_token_ids(self, letters: Sequence[str]) -> dict[str, list[int]] | None:
        """For each letter, the single tokens that spell it as a first answer token ("A", " A").

        Cached per engine; None when the server cannot tokenize (not vLLM) or a letter has no
        single-token spelling, and the caller falls back to top-k logprobs.
        """
        key = tuple(letters)
        if key in self._letter_ids:
            return self._letter_ids[key]
        # One look-up per key: the requests that arrive while it runs wait for it instead of
        # tokenizing again (and, done at different times, would not go out together).
        pending = self._letter_pending.get(key)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = self._letter_pending[key] = asyncio.ensure_future(self._lookup_letters(letters))
        out = await asyncio.shield(pending)
        self._letter_ids[key] = out
        return out

    async def _lookup_letters(self, letters: Sequence[str]) -> dict[str, list[int]] | None:
        out: dict[str, list[int]] = {}
        for letter in letters:
            spellings = await asyncio.gather(*(self.token_ids(s) for s in (letter, " " + letter)))
            ids = sorted({t[0] for t in spellings if t is not None and len(t) == 1})
            if not ids:
                return None
            out[letter] = ids
        return out or None

    async def token_logprobs(self, messages: Messages, token_ids: Sequence[int]) -> dict[int, float] | None:
        """The exact logprobs of `token_ids` as the judge's first answer token, in one request.

        vLLM's `logprob_token_ids` gathers just those entries of the first position's
        log-softmax: no top-k cut-off, no `prompt_logprobs` pass (which computes logits at
        every prompt position and bypasses the prefix cache). None if the server ignored it.
        """
        r = await self._one_token(
            messages,
            logprobs=True,
            extra_body={"logprob_token_ids": list(token_ids), "return_tokens_as_token_ids": True},
        )
        lp = r.choices[0].logprobs if r.choices else None
        if not lp or not lp.content:
            return None
        out: dict[int, float] = {}
        for t in [lp.content[0], *(lp.content[0].top_logprobs or [])]:
            if t.token.startswith("token_id:"):
                out[int(t.token.removeprefix("token_id:"))] = t.logprob
        return out if all(i in out for i in token_ids) else None

    async def prompt_logprobs(self, messages: Messages) -> list | None:
        """vLLM's logprobs of the prompt tokens, the last message continued (not closed)."""
        r = await self._one_token(
            messages,
            extra_body={"continue_final_message": True, "add_generation_prompt": False, "prompt_logprobs": 0},
        )
        return (r.model_extra or {}).get("prompt_logprobs")

    async def close(self) -> None:
        for c in self._clients:
            await c.close()


COUNTERS = {"generation": "vllm:generation_tokens_total", "prompt": "vllm:prompt_tokens_total"}


def server_tokens(base_urls: Sequence[str]) -> dict[str, float] | None:
    """{generation, prompt}: tokens the servers have generated and read so far, from vLLM's
    Prometheus counters; None if unknown."""
    import urllib.request

    total = dict.fromkeys(COUNTERS, 0.0)
    seen = False
    for url in base_urls:
        try:
            with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    for kind, name in COUNTERS.items():
                        if line.startswith(name):
                            total[kind] += float(line.rsplit(" ", 1)[1])
                            seen = True
        except (OSError, ValueError):
            return None
    return total if seen else None


async def gather_progress(
    coros: Sequence[Awaitable[T]],
    on_done: Callable[[int], None],
    engine: Engine | None = None,
    on_tick: Callable[[int, dict[str, float]], None] | None = None,
    tick_s: float = 3.0,
) -> list[T]:
    """Like asyncio.gather (order kept), calling on_done(n_done) as each finishes.

    A batch's requests tend to finish together, so with `engine` and `on_tick` it also reports
    every `tick_s` the live rates read from the server's own counters: on_tick(n_done,
    {"generation": tok/s, "prompt": tok/s}). The prompt rate is the one that moves when the
    requests are prefill only (label, the judge's A/B and Yes/No scoring).
    """
    done = 0

    async def wrap(c: Awaitable[T]) -> T:
        nonlocal done
        out = await c
        done += 1
        on_done(done)
        return out

    async def ticker() -> None:
        last_t, last_n = time.monotonic(), await asyncio.to_thread(server_tokens, engine.urls)
        while last_n is not None:
            await asyncio.sleep(tick_s)
            n = await asyncio.to_thread(server_tokens, engine.urls)
            if n is None:
                return
            now = time.monotonic()
            on_tick(done, {k: (n[k] - last_n[k]) / max(now - last_t, 1e-9) for k in n})
            last_t, last_n = now, n

    tick = asyncio.create_task(ticker()) if engine is not None and on_tick is not None else None
    try:
        return await asyncio.gather(*(wrap(c) for c in coros))
    finally:
        if tick:
            tick.cancel()


def rates(tps: dict[str, float]) -> dict[str, float]:
    """A tick's rates as progress fields: tokens_per_s (generated) and prompt_tokens_per_s."""
    return {"tokens_per_s": round(tps["generation"], 1), "prompt_tokens_per_s": round(tps["prompt"], 1)}


def run_batch(engine: Engine, coros: Sequence[Awaitable[T]], report: Any, **extra: Any) -> list[T]:
    """One stage's requests on a fresh event loop: rows done and live tokens/s go to `report`
    (an events.Reporter); the engine is closed at the end."""
    total = len(coros)

    async def go() -> list[T]:
        try:
            return await gather_progress(
                coros,
                lambda n: report.progress(n, total, tokens_per_s=round(engine.usage.tokens_per_s, 1), **extra),
                engine,
                lambda n, tps: report.progress(n, total, force=True, **rates(tps), **extra),
            )
        finally:
            await engine.close()

    return asyncio.run(go())
