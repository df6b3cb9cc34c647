"""Stage `revise`: the judge rewrites each response under its principle's revision request."""

from __future__ import annotations

from charter.constitution import Constitution
from charter.pipelines import judge as J
from charter.pipelines.critique import ask_text, current, round_
from charter.pipelines.engine import Engine, run_batch
from charter.pipelines.events import Reporter
from charter.spec import JudgeSpec


def revise(
    judge: Engine, c: Constitution, rows: list[dict], spec: JudgeSpec, round: int, report: Reporter
) -> tuple[list[dict], dict]:
    """Appends this round's revision to `revisions`; a row whose critique failed keeps its text."""
    by_id = {p.id: p for p in c.principles}

    async def one(r: dict) -> str | None:
        crit = r["critiques"][-1]
        if crit is None:
            return None
        msgs = J.revision_messages(c, r["prompt"], current(r), crit, by_id[r["principles"][-1]], spec.few_shot)
        return await ask_text(judge, msgs, spec)

    report.started("revise", total=len(rows), round=round)
    out = run_batch(judge, [one(r) for r in rows], report, round=round)
    new_rows, failed = [], 0
    for r, text in zip(rows, out, strict=True):
        r = dict(r)
        failed += text is None
        r.setdefault("revisions", []).append(text if text is not None else current(r))
        new_rows.append(r)
    counts = {
        "rows": len(rows),
        "unparsed": failed,
        "round": round,
        "completion_tokens": judge.usage.completion_tokens,
        "tokens_per_s": round_(judge.usage.tokens_per_s),
    }
    return new_rows, counts


def sft_rows(revised: list[dict]) -> list[dict]:
    """SL-CAI's data: each prompt with its final revision as the answer (`messages`), empty ones left out."""
    return [
        {"messages": r["prompt"] + [{"role": "assistant", "content": r["revisions"][-1]}], "source_id": r["id"]}
        for r in revised
        if r["revisions"][-1]
    ]
