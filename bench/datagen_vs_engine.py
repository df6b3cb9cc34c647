"""Data generation against the raw engine: charter's stages ÷ the same requests sent directly.

    .venv/bin/python bench/datagen_vs_engine.py [--model smollm2-135m] [--prompts 32]

One vLLM server (charter's own start-up settings, dev mode on for `/reset_prefix_cache`).
1. charter: the demo's generate → critique → revise → label stages run in-process, exactly
   as a job runs them; every request body the openai SDK sends is recorded, per stage.
2. raw: the recorded requests replayed straight to the server with the bare `openai` client,
   stage by stage (the same barriers: a critique needs its response), all of a stage in
   flight at once.
3. raw, one burst: every recorded request in flight at once — the server's ceiling, ignoring
   that the stages depend on each other.
The prefix cache is reset before each run. Tokens come from the server's own Prometheus
counters. Figure of merit: charter's tokens/s ÷ raw stage-by-stage tokens/s (target ≥ 0.9),
for generated tokens and for all tokens (prompt + generated; the judge stages are
prefill-bound). Prints a table and writes bench/results/datagen_vs_engine.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from charter import constitution, models, prompts
from charter.pipelines import servers
from charter.pipelines.critique import critique
from charter.pipelines.engine import Engine
from charter.pipelines.events import Reporter
from charter.pipelines.generate import generate
from charter.pipelines.label import label
from charter.pipelines.revise import revise
from charter.spec import DataSpec, JudgeSpec

RESULTS = Path(__file__).resolve().parent / "results"


def counters(url: str) -> dict[str, float]:
    out = {"prompt": 0.0, "generation": 0.0}
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics") as r:
        for line in r.read().decode().splitlines():
            for k in out:
                if line.startswith(f"vllm:{k}_tokens_total"):
                    out[k] += float(line.rsplit(" ", 1)[1])
    return out


def reset_cache(url: str) -> None:
    req = urllib.request.Request(url.removesuffix("/v1") + "/reset_prefix_cache", method="POST")
    urllib.request.urlopen(req).read()


class Recorder:
    """Records every chat.completions.create call's keyword arguments, by stage."""

    def __init__(self) -> None:
        from openai.resources.chat.completions import AsyncCompletions

        self.stage = ""
        self.calls: dict[str, list[dict]] = {}
        self._original = original = AsyncCompletions.create
        rec = self

        async def create(self_: AsyncCompletions, **kw: object) -> object:
            rec.calls.setdefault(rec.stage, []).append(kw)
            return await original(self_, **kw)

        AsyncCompletions.create = create  # type: ignore[method-assign]

    def stop(self) -> None:
        from openai.resources.chat.completions import AsyncCompletions

        AsyncCompletions.create = self._original  # type: ignore[method-assign]


def measure(url: str, fn) -> dict:
    reset_cache(url)
    before, t = counters(url), time.monotonic()
    fn()
    dt, after = time.monotonic() - t, counters(url)
    p, g = after["prompt"] - before["prompt"], after["generation"] - before["generation"]
    return {
        "seconds": round(dt, 1),
        "prompt_tokens": p,
        "gen_tokens": g,
        "gen_tok_s": g / dt,
        "all_tok_s": (p + g) / dt,
    }


async def replay(url: str, batches: list[list[dict]]) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=3600)
    for batch in batches:
        await asyncio.gather(*(client.chat.completions.create(**kw) for kw in batch))
    await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ns = ap.parse_args()
    path = str(models.prepare(ns.model))
    RESULTS.mkdir(exist_ok=True)
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = RESULTS / "datagen_vs_engine-vllm.log"
    proc = servers.start_server(path, port, log, kvcache_gib=2)
    try:
        servers.wait_ready(url, proc, 900, log)
        c = constitution.load("default")
        ps = prompts.load("builtin:red-team", limit=ns.prompts)
        data, jspec = DataSpec(samples_per_prompt=2, revision_rounds=1, labels="ai"), JudgeSpec()
        rep = Reporter(io.StringIO())
        rec = Recorder()

        def eng(name: str) -> Engine:
            return Engine(url, None, name=name, max_concurrency=jspec.max_concurrency, retries=jspec.retries)

        def charter_stages() -> None:
            rec.stage = "generate"
            rows, _ = generate(eng("policy"), ps, data, rep)
            rec.stage = "critique"
            rows, _ = critique(eng("judge"), c, rows, jspec, 1, data.seed, rep)
            rec.stage = "revise"
            rows, _ = revise(eng("judge"), c, rows, jspec, 1, rep)
            rec.stage = "label"
            label(eng("judge"), c, rows, data, jspec, rep)

        ours = measure(url, charter_stages)
        rec.stop()
        batches = [rec.calls[s] for s in ("generate", "critique", "revise", "label") if s in rec.calls]
        staged = measure(url, lambda: asyncio.run(replay(url, batches)))
        burst = measure(url, lambda: asyncio.run(replay(url, [[kw for b in batches for kw in b]])))
    finally:
        servers._stop(proc)

    result = {
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "model": ns.model,
        "requests": {s: len(v) for s, v in rec.calls.items()},
        "charter": ours,
        "raw_stage_by_stage": staged,
        "raw_one_burst": burst,
        "ratio_gen_tok_s": round(ours["gen_tok_s"] / staged["gen_tok_s"], 3),
        "ratio_all_tok_s": round(ours["all_tok_s"] / staged["all_tok_s"], 3),
        "ratio_all_tok_s_vs_burst": round(ours["all_tok_s"] / burst["all_tok_s"], 3),
        "cpus": os.cpu_count(),
    }
    (RESULTS / "datagen_vs_engine.json").write_text(json.dumps(result, indent=2))
    print(f"$ {result['command']}")
    print(f"requests per stage: {result['requests']}")
    print(f"{'run':<22}{'seconds':>9}{'prompt tok':>12}{'gen tok':>9}{'gen tok/s':>11}{'all tok/s':>11}")
    for name, r in (("charter stages", ours), ("raw, stage by stage", staged), ("raw, one burst", burst)):
        print(
            f"{name:<22}{r['seconds']:>9}{r['prompt_tokens']:>12.0f}{r['gen_tokens']:>9.0f}"
            f"{r['gen_tok_s']:>11.1f}{r['all_tok_s']:>11.1f}"
        )
    print(
        f"charter ÷ raw (stage by stage): generated tokens/s {result['ratio_gen_tok_s']}, "
        f"all tokens/s {result['ratio_all_tok_s']} (target ≥ 0.9); ÷ one burst {result['ratio_all_tok_s_vs_burst']}"
    )


if __name__ == "__main__":
    main()
