"""Stage `label`: preference pairs, from revisions (SL-CAI) or from the judge's A/B choice (RL-CAI).

`revision`: each final revision is chosen over its original response.
`ai`: two policy samples of a prompt are shown to the judge under a sampled comparison
principle in both orders (A,B) and (B,A). The soft label is P(letter) from the logprobs of
the tokens "A" and "B", averaged over the orders to cancel position bias; the orders agree
when both prefer the same response. Pairs are in TRL's conversational columns.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from charter.constitution import Constitution
from charter.pipelines import judge as J
from charter.pipelines.engine import Engine, gather_progress, rates
from charter.pipelines.events import Reporter
from charter.spec import DataSpec, JudgeSpec

Messages = list[dict[str, str]]


@dataclass
class Verdict:
    p_first: float  # P(first candidate is better), both orders averaged
    agree: bool  # both orders preferred the same candidate
    p_orders: tuple[float, float]  # P(A) as shown in order 1 and in order 2

    @property
    def outcome(self) -> float:
        """The first candidate's score: 1 a win, 0 a loss (both orders agree), 0.5 a tie (they disagree)."""
        if not self.agree:
            return 0.5
        return 1.0 if self.p_first > 0.5 else 0.0


async def p_first(judge: Engine, msgs: Messages, words: tuple[str, str], retries: int) -> float | None:
    """P(words[0]) over the two words as the judge's first answer token (A/B, Yes/No).

    On vLLM, one request reads the exact logprobs of the words' tokens ("A", " A", "B",
    " B"; `logprob_token_ids`). Elsewhere they are read from the first token's top-20
    logprobs, and a word outside the top 20 is scored exactly by sending the answer already
    begun with it and reading its prompt logprob.
    """
    first, second = words
    ids = await judge.letter_token_ids(words)
    for _ in range(retries + 1):
        if ids is not None:
            got = await judge.token_logprobs(msgs, [i for v in ids.values() for i in v])
            if got is not None:
                lp = {x: J.logsumexp([got[i] for i in v]) for x, v in ids.items()}
                if all(v is not None for v in lp.values()):
                    return J.preference(lp[first], lp[second])
                continue
        top = await judge.first_token_logprobs(msgs)
        lp = {x: J.letter_logprob(top, x) for x in words}
        missing = [x for x, v in lp.items() if v is None]
        if missing:
            exact = await asyncio.gather(
                *(judge.prompt_logprobs(msgs + [{"role": "assistant", "content": x}]) for x in missing)
            )
            lp.update({x: J.parse_letter_logprob(e, x) for x, e in zip(missing, exact, strict=True)})
        if lp[first] is not None and lp[second] is not None:
            return J.preference(lp[first], lp[second])
    return None


async def _p_a(judge: Engine, msgs: Messages, retries: int) -> float | None:
    """P(A) over {A, B}."""
    return await p_first(judge, msgs, ("A", "B"), retries)


async def compare(
    judge: Engine, c: Constitution, prompt: Messages, x: str, y: str, request: str, retries: int
) -> Verdict | None:
    """Is x better than y? Both orders; None if the judge's answer never parsed."""
    p1, p2 = await asyncio.gather(
        _p_a(judge, J.comparison_messages(c, prompt, x, y, request), retries),
        _p_a(judge, J.comparison_messages(c, prompt, y, x, request), retries),
    )
    if p1 is None or p2 is None:
        return None
    p, agree = J.combine_orders(p1, p2)
    return Verdict(p, agree, (p1, p2))


def _row(prompt: Messages, chosen: str, rejected: str, **extra: object) -> dict:
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        **extra,
    }


def label(
    judge: Engine | None, c: Constitution, rows: list[dict], data: DataSpec, spec: JudgeSpec, report: Reporter
) -> tuple[list[dict], dict]:
    if data.labels == "revision":
        return _label_revisions(rows, report)
    return _label_ai(judge, c, rows, data, spec, report)


def _label_revisions(rows: list[dict], report: Reporter) -> tuple[list[dict], dict]:
    report.started("label", total=len(rows), labels="revision")
    pairs, same = [], 0
    for r in rows:
        final = r["revisions"][-1]
        if not r["response"] or final.strip() == r["response"].strip():
            same += 1  # nothing to prefer: the revision failed or changed nothing
            continue
        pairs.append(
            _row(r["prompt"], final, r["response"], source_id=r["id"], confidence=1.0, principle=r["principles"][-1])
        )
    report.progress(len(rows), len(rows), force=True)
    return pairs, {"candidates": len(rows), "pairs": len(pairs), "dropped_unchanged": same}


def _label_ai(
    judge: Engine, c: Constitution, rows: list[dict], data: DataSpec, spec: JudgeSpec, report: Reporter
) -> tuple[list[dict], dict]:
    by_prompt: dict[int, list[dict]] = {}
    for r in rows:
        if r["response"]:
            by_prompt.setdefault(r["prompt_index"], []).append(r)
    # Consecutive samples of a prompt form pairs: (s0, s1), (s2, s3), …
    candidates = [(g[k], g[k + 1]) for g in by_prompt.values() for k in range(0, len(g) - 1, 2)]
    rng = random.Random(f"{data.seed}-label")
    principles = [rng.choice(c.principles) for _ in candidates]

    async def run() -> list[Verdict | None]:
        try:
            return await gather_progress(
                [
                    compare(judge, c, x["prompt"], x["response"], y["response"], p.comparison, spec.retries)
                    for (x, y), p in zip(candidates, principles, strict=True)
                ],
                lambda n: report.progress(n, len(candidates)),
                judge,
                lambda n, tps: report.progress(n, len(candidates), force=True, **rates(tps)),
            )
        finally:
            await judge.close()

    report.started("label", total=len(candidates), labels="ai")
    verdicts = asyncio.run(run())
    pairs, unparsed, disagreed, low = [], 0, 0, 0
    for (x, y), p, v in zip(candidates, principles, verdicts, strict=True):
        if v is None:
            unparsed += 1
            continue
        disagreed += not v.agree
        if not v.agree and data.disagreement == "drop":
            continue
        confidence = abs(2 * v.p_first - 1)
        if confidence < data.min_confidence:
            low += 1
            continue
        chosen, rejected = (x, y) if v.p_first >= 0.5 else (y, x)
        pairs.append(
            _row(
                x["prompt"],
                chosen["response"],
                rejected["response"],
                confidence=round(confidence, 4),
                p_chosen=round(max(v.p_first, 1 - v.p_first), 4),
                orders_agree=v.agree,
                p_orders=[round(q, 4) for q in v.p_orders],
                principle=p.id,
                source_ids=[chosen["id"], rejected["id"]],
            )
        )
    judged = len(candidates) - unparsed
    counts = {
        "candidates": len(candidates),
        "pairs": len(pairs),
        "unparsed": unparsed,
        "orders_disagreed": disagreed,
        "dropped_low_confidence": low,
        "dropped_disagreement": disagreed if data.disagreement == "drop" else 0,
        "position_agreement": round((judged - disagreed) / judged, 4) if judged else None,
    }
    return pairs, counts
