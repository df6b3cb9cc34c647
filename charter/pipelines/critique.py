"""Stage `critique`: the judge critiques each response under a sampled principle."""

from __future__ import annotations

import random

from charter.constitution import Constitution
from charter.pipelines import judge as J
from charter.pipelines.engine import Engine, run_batch
from charter.pipelines.events import Reporter
from charter.spec import JudgeSpec


def current(row: dict) -> str:
    """The response as it stands: the latest revision, or the policy's original."""
    return row["revisions"][-1] if row.get("revisions") else row["response"]


async def ask_text(engine: Engine, messages: list[dict], spec: JudgeSpec) -> str | None:
    """One free-text judge reply, retried while it does not parse; None if it never does."""
    for _ in range(spec.retries + 1):
        (reply,) = await engine.chat(messages, max_tokens=spec.max_tokens, temperature=spec.temperature)
        text = J.parse_text(reply)
        if text:
            return text
    return None


def critique(
    judge: Engine, c: Constitution, rows: list[dict], spec: JudgeSpec, round: int, seed: int, report: Reporter
) -> tuple[list[dict], dict]:
    """Adds principle and critique to each row (round r: `critiques[r-1]`)."""
    rng = random.Random(f"{seed}-critique-{round}")
    principles = [rng.choice(c.principles) for _ in rows]

    report.started("critique", total=len(rows), round=round)
    asks = [
        ask_text(judge, J.critique_messages(c, r["prompt"], current(r), p, spec.few_shot), spec)
        for r, p in zip(rows, principles, strict=True)
    ]
    out = run_batch(judge, asks, report, round=round)
    new_rows = []
    for r, p, text in zip(rows, principles, out, strict=True):
        r = dict(r)
        r.setdefault("principles", []).append(p.id)
        r.setdefault("critiques", []).append(text)
        new_rows.append(r)
    counts = {
        "rows": len(rows),
        "unparsed": sum(t is None for t in out),
        "round": round,
        "completion_tokens": judge.usage.completion_tokens,
        "tokens_per_s": round_(judge.usage.tokens_per_s),
    }
    return new_rows, counts


def round_(x: float) -> float:
    return round(x, 1)
