"""How vLLM's CPU server settings change charter's throughput on this machine.

    .venv/bin/python bench/vllm_cpu_settings.py [--model smollm2-135m] [--configs default,reserve1,eager]

For each configuration: start a server on the prepared model, time start-up, then send the
demo's request mix (32 prompts x 2 samples, 64 new tokens; then 64 judge-style prompts of
~450 tokens with 64 new tokens) and read prompt and generation tokens from the server's own
Prometheus counters. Prints a table and writes bench/results/vllm_cpu_settings.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from charter import constitution, models, prompts
from charter.pipelines import judge as J
from charter.pipelines import servers
from charter.pipelines.engine import Engine

# Environment for charter's own server start-up (servers.start_server), one set per run.
CONFIGS = {
    "default": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "CHARTER_VLLM_EAGER": "0"},
    "reserve1": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "CHARTER_VLLM_EAGER": "0"},
    "eager": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "CHARTER_VLLM_EAGER": "1"},
    "eager-reserve1": {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "CHARTER_VLLM_EAGER": "1"},
}


def counters(url: str) -> dict[str, float]:
    import urllib.request

    out = {}
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics") as r:
        for line in r.read().decode().splitlines():
            for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                if line.startswith(name):
                    out[name.split(":")[1]] = out.get(name.split(":")[1], 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def phase(url: str, batch: list[list[dict]], n: int, max_tokens: int) -> dict[str, float]:
    e = Engine(url, None, max_concurrency=64, retries=0)
    before, t = counters(url), time.monotonic()
    await asyncio.gather(*(e.chat(m, max_tokens=max_tokens, temperature=0.8, n=n) for m in batch))
    dt, after = time.monotonic() - t, counters(url)
    await e.close()
    p = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    g = after["generation_tokens_total"] - before["generation_tokens_total"]
    return {
        "seconds": round(dt, 1),
        "prompt_tokens": p,
        "gen_tokens": g,
        "gen_tok_s": round(g / dt, 1),
        "all_tok_s": round((p + g) / dt, 1),
    }


def run(name: str, model_path: str, log_dir: Path) -> dict:
    os.environ.update(CONFIGS[name])
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log = log_dir / f"vllm-{name}.log"
    t = time.monotonic()
    proc = servers.start_server(model_path, port, log, kvcache_gib=2)
    try:
        servers.wait_ready(url, proc, 900, log)
        start_s = time.monotonic() - t
        c = constitution.load("default")
        ps = prompts.load("builtin:red-team", limit=32)
        gen = asyncio.run(phase(url, ps, 2, 64))
        text = "I can't help with that, but here is some general safety information. " * 4
        judge = [
            J.critique_messages(c, ps[i % 32], text + str(i), c.principles[i % len(c.principles)]) for i in range(64)
        ]
        crit = asyncio.run(phase(url, judge, 1, 64))
        return {"config": name, "start_s": round(start_s, 1), "generate": gen, "judge": crit}
    finally:
        servers._stop(proc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default="default,reserve1,eager")
    ns = ap.parse_args()
    model_path = str(models.prepare(ns.model))
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    results = []
    for name in ns.configs.split(","):  # written after each config: a long run keeps what it measured
        results.append(run(name, model_path, out_dir))
        print(json.dumps(results[-1]), flush=True)
    print(f"command: {' '.join(sys.argv)}  (model {ns.model}, {os.cpu_count()} CPUs)")
    print(f"{'config':<16}{'start s':>9}{'gen tok/s':>11}{'judge s':>9}{'judge gen tok/s':>17}{'judge all tok/s':>17}")
    for r in results:
        print(
            f"{r['config']:<16}{r['start_s']:>9}{r['generate']['gen_tok_s']:>11}{r['judge']['seconds']:>9}"
            f"{r['judge']['gen_tok_s']:>17}{r['judge']['all_tok_s']:>17}"
        )
    (out_dir / "vllm_cpu_settings.json").write_text(
        json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
