"""Each stage against a real vLLM server on the tiny model (random weights: the text is noise,
but every request, parse and row is real)."""

import io
import json

import pytest

from charter import constitution, prompts
from charter.errors import JudgeError
from charter.pipelines.critique import critique
from charter.pipelines.engine import Engine
from charter.pipelines.events import PREFIX, Reporter
from charter.pipelines.generate import generate
from charter.pipelines.label import label
from charter.pipelines.revise import revise
from charter.spec import DataSpec, JudgeSpec

pytestmark = pytest.mark.integration
C = constitution.load("default")
JUDGE = JudgeSpec(max_tokens=12, retries=1)


def engine(url, **kw):
    return Engine(url, None, max_concurrency=8, retries=1, **kw)


def events(out):
    return [json.loads(line[len(PREFIX) :]) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def revised(tiny_server):
    ps = prompts.load("builtin:red-team", limit=3)
    data = DataSpec(samples_per_prompt=2, max_new_tokens=12)
    out = io.StringIO()
    rows, counts = generate(engine(tiny_server, name="policy"), ps, data, Reporter(out))
    rows, _ = critique(engine(tiny_server), C, rows, JUDGE, 1, 0, Reporter(out))
    rows, _ = revise(engine(tiny_server), C, rows, JUDGE, 1, Reporter(out))
    rows, _ = critique(engine(tiny_server), C, rows, JUDGE, 2, 0, Reporter(out))
    rows, rcounts = revise(engine(tiny_server), C, rows, JUDGE, 2, Reporter(out))
    return ps, rows, counts, rcounts, events(out)


def test_generate_critique_revise_rows(revised):
    ps, rows, counts, rcounts, evs = revised
    assert len(rows) == 6 and counts["samples"] == 6 and counts["completion_tokens"] > 0
    assert {(r["prompt_index"], r["sample"]) for r in rows} == {(i, k) for i in range(3) for k in range(2)}
    assert all(r["prompt"] == ps[r["prompt_index"]] for r in rows)
    ids = {p.id for p in C.principles}
    for r in rows:
        assert len(r["principles"]) == len(r["critiques"]) == len(r["revisions"]) == 2  # two rounds
        assert set(r["principles"]) <= ids
    assert rcounts["round"] == 2
    stages = [(e["data"]["stage"], e["data"]["state"]) for e in evs if e["type"] == "stage"]
    for s in ("generate", "critique", "revise"):
        assert (s, "started") in stages
    assert any(e["data"].get("tokens_per_s") for e in evs if e["type"] == "stage")


def test_ai_labels_score_both_orders(revised, tiny_server):
    _, rows, *_ = revised
    pairs, counts = label(engine(tiny_server), C, rows, DataSpec(labels="ai"), JUDGE, Reporter(io.StringIO()))
    assert counts["candidates"] == 3 and counts["unparsed"] == 0
    assert len(pairs) == 3
    for p in pairs:
        assert set(p) >= {"prompt", "chosen", "rejected", "confidence", "p_orders", "orders_agree"}
        assert p["chosen"][0]["role"] == "assistant" and p["chosen"] != p["rejected"]
        assert 0.5 <= p["p_chosen"] <= 1.0 and all(0.0 < q < 1.0 for q in p["p_orders"])
    assert 0.0 <= counts["position_agreement"] <= 1.0
    dropped, dcounts = label(
        engine(tiny_server), C, rows, DataSpec(labels="ai", disagreement="drop"), JUDGE, Reporter(io.StringIO())
    )
    assert len(dropped) == 3 - dcounts["orders_disagreed"]
    assert all(p["orders_agree"] for p in dropped)


def test_revision_labels(revised):
    _, rows, *_ = revised
    pairs, counts = label(None, C, rows, DataSpec(labels="revision"), JUDGE, Reporter(io.StringIO()))
    assert counts["pairs"] + counts["dropped_unchanged"] == 6
    for p in pairs:
        src = next(r for r in rows if r["id"] == p["source_id"])
        assert p["chosen"][0]["content"] == src["revisions"][-1]
        assert p["rejected"][0]["content"] == src["response"]


def test_unreachable_judge_names_the_url():
    import asyncio

    dead = "http://127.0.0.1:9/v1"
    e = Engine(dead, "m", retries=1, timeout_s=2)
    with pytest.raises(JudgeError, match="127.0.0.1:9"):
        asyncio.run(e.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0))
    assert e.usage.retries == 2


def test_first_token_top_logprobs_from_the_real_server(tiny_server):
    import asyncio

    from charter.pipelines import judge as J

    msgs = J.comparison_messages(
        C, [{"role": "user", "content": "hi"}], "Hello!", "Go away.", C.principles[0].comparison
    )
    top = asyncio.run(engine(tiny_server).first_token_logprobs(msgs))
    assert len(top) == 20 and all(lp <= 0.0 for lp in top.values())


def test_exact_letter_logprobs_match_the_prompt_logprobs_path(tiny_server):
    """One `logprob_token_ids` request gives each letter token the same logprob as the slow
    path (the answer begun with the letter, scored by `prompt_logprobs`), which the tiny judge
    would always need: its letters are never in the first token's top 20."""
    import asyncio

    from charter.pipelines import judge as J
    from charter.pipelines.label import _p_a

    msgs = J.comparison_messages(
        C, [{"role": "user", "content": "hi"}], "Hello!", "Go away.", C.principles[0].comparison
    )

    async def run():
        e = engine(tiny_server)
        ids = await e.letter_token_ids(("A", "B"))
        exact = await e.token_logprobs(msgs, [i for v in ids.values() for i in v])
        plain = {x: (await e.token_ids(x))[0] for x in ("A", "B")}
        slow = {
            x: J.parse_letter_logprob(await e.prompt_logprobs(msgs + [{"role": "assistant", "content": x}]), x)
            for x in ("A", "B")
        }
        before = e.usage.requests
        p = await _p_a(e, msgs, retries=0)
        return ids, exact, plain, slow, p, e.usage.requests - before

    ids, exact, plain, slow, p, requests = asyncio.run(run())
    assert set(ids) == {"A", "B"} and all(plain[x] in ids[x] for x in ids)
    for x in ("A", "B"):
        assert exact[plain[x]] == pytest.approx(slow[x], abs=1e-3)
    assert requests == 1  # one request per order on vLLM
    la, lb = (J.logsumexp([exact[i] for i in ids[x]]) for x in ("A", "B"))
    assert p == pytest.approx(J.preference(la, lb))


def test_scoring_only_requests_report_the_prompt_token_rate(tiny_server):
    """The judge's A/B scoring generates nothing (one logprob position): the live rate that moves
    is the server's prompt tokens/s, read from vLLM's own counter on each tick."""
    import asyncio

    from charter.pipelines.engine import gather_progress, rates
    from charter.pipelines.label import p_first

    judge = engine(tiny_server)
    ticks = []
    prompt = [{"role": "user", "content": "Which is kinder, A or B? " + "Consider both with care. " * 40}]

    async def scored(i):
        await asyncio.sleep(0.05 * i)  # spread over a few ticks, as a stage's requests are
        return await p_first(judge, prompt + [{"role": "user", "content": f"Case {i}."}], ("A", "B"), 1)

    async def go():
        try:
            return await gather_progress(
                [scored(i) for i in range(24)], lambda n: None, judge, lambda n, tps: ticks.append(tps), tick_s=0.2
            )
        finally:
            await judge.close()

    got = asyncio.run(go())
    assert all(p is not None for p in got)
    assert ticks, "no tick in the whole batch"
    assert max(t["prompt"] for t in ticks) > 0
    assert max(t["prompt"] for t in ticks) > max(t["generation"] for t in ticks)
    assert set(rates(ticks[0])) == {"tokens_per_s", "prompt_tokens_per_s"}
