"""Stage `evaluate`: the trained policy against its base (and, in the recipe, its SFT policy) on held-out prompts.

Both models answer each prompt with the same sampler and seed (HF `generate`, so a LoRA
adapter needs no merging or serving; the base answers come from the same loaded weights with
the adapter switched off); the judge compares the two answers in both orders.
A prompt is a win when both orders prefer the trained answer, a loss when both prefer the
base, a tie when they disagree. Win rate counts a tie as half; its 95% interval is the
normal interval of the per-prompt scores. Prompts whose verdict never parsed are dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from charter.constitution import DEFAULT_COMPARISON, Constitution
from charter.models import SAFE_TOKENIZER, SAFE_WEIGHTS
from charter.pipelines.engine import Engine, gather_progress, rates
from charter.pipelines.events import Reporter
from charter.pipelines.label import compare
from charter.spec import EvaluateSpec, JudgeSpec

Messages = list[dict[str, str]]


def load_policy(base_path: str, trained: dict[str, Any] | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trained and trained["kind"] == "model":
        path = trained["path"]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **SAFE_WEIGHTS)
        return model, AutoTokenizer.from_pretrained(path, **SAFE_TOKENIZER)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, **SAFE_WEIGHTS)
    if trained:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained["path"])
    return model, AutoTokenizer.from_pretrained(base_path, **SAFE_TOKENIZER)


def sample(
    model: Any,
    tok: Any,
    prompts: list[Messages],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    on_batch: Any = None,
    temperature: float = 0.7,
) -> tuple[list[str], list[int]]:
    """Answers and their token counts; left padding so a batch generates together."""
    import torch

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    texts, lengths = [], []
    torch.manual_seed(seed)
    for i in range(0, len(prompts), batch_size):
        chats = [
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i : i + batch_size]
        ]
        enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                temperature=temperature,
                top_p=0.95,
                pad_token_id=tok.pad_token_id,
            )
        for row in out[:, enc["input_ids"].shape[1] :]:
            ids = [t for t in row.tolist() if t != tok.pad_token_id]
            lengths.append(len(ids))
            texts.append(tok.decode(ids, skip_special_tokens=True).strip())
        if on_batch:
            on_batch(len(texts), sum(lengths))
    return texts, lengths


def win_rate(outcomes: list[float]) -> tuple[float | None, list[float] | None]:
    n = len(outcomes)
    if n == 0:
        return None, None
    mean = sum(outcomes) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in outcomes) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return mean, [max(0.0, mean - half), min(1.0, mean + half)]


Policy = tuple[str, dict[str, Any] | None]  # (base model path, a train stage's result; None: the base itself)


def answers(
    policies: dict[str, Policy],
    prompts: list[Messages],
    max_new_tokens: int,
    seed: int,
    report: Reporter,
    temperature: float = 0.7,
) -> dict[str, tuple[list[str], list[int]]]:
    """Each policy's answers and token counts, same sampler and seed. An adapter and its own base
    share one loaded copy: the base answers with the adapter switched off."""
    out: dict[str, tuple[list[str], list[int]]] = {}

    def run_sampling(name: str, model: Any, tok: Any) -> None:
        t0 = time.monotonic()

        def tick(n: int, tokens: int) -> None:
            tps = round(tokens / max(time.monotonic() - t0, 1e-9), 1)
            report.progress(n, len(prompts), force=True, phase=f"sampling {name}", tokens_per_s=tps)

        out[name] = sample(model, tok, prompts, max_new_tokens, seed, on_batch=tick, temperature=temperature)
        report.message(f"{report.stage or 'evaluate'}: sampled {len(prompts)} answers from the {name} policy")

    for name, (base, trained) in policies.items():
        if name in out:
            continue
        model, tok = load_policy(base, trained)
        if trained and trained["kind"] == "adapter":
            for other, (other_base, other_trained) in policies.items():
                if other not in out and other_trained is None and other_base == base:
                    with model.disable_adapter():
                        run_sampling(other, model, tok)
        run_sampling(name, model, tok)
        del model
    return out


def evaluate(
    judge: Engine,
    c: Constitution,
    prompts: list[Messages],
    policy: Policy,
    references: dict[str, Policy],
    ev: EvaluateSpec,
    jspec: JudgeSpec,
    seed: int,
    report: Reporter,
) -> tuple[list[dict], dict]:
    """The trained `policy` against each reference policy, judged per prompt in both orders.

    The summary is the comparison with the first reference (a job's base); with more than one,
    `versus` holds every comparison by name (the recipe's `base` and `sft`).
    """
    report.started("evaluate", total=len(prompts), phase="sampling")
    got = answers({"trained": policy, **references}, prompts, ev.max_new_tokens, seed, report)
    request = DEFAULT_COMPARISON
    names = list(references)

    async def run() -> list:
        n = len(prompts)
        try:
            return await gather_progress(
                [
                    compare(judge, c, p, t, b, request, jspec.retries)
                    for name in names
                    for p, t, b in zip(prompts, got["trained"][0], got[name][0], strict=True)
                ],
                lambda k: report.progress(k, n * len(names), phase="judging"),
                judge,
                lambda k, tps: report.progress(k, n * len(names), force=True, phase="judging", **rates(tps)),
            )
        finally:
            await judge.close()

    verdicts = asyncio.run(run())
    rows = [{"prompt": p, **{name: got[name][0][i] for name in got}} for i, p in enumerate(prompts)]
    versus = {}
    for k, name in enumerate(names):
        outcomes, versus[name] = _judged(verdicts[k * len(prompts) : (k + 1) * len(prompts)])
        for row, (p_trained, outcome) in zip(rows, outcomes, strict=True):
            keys = ("p_trained", "outcome") if k == 0 else (f"p_trained_vs_{name}", f"outcome_vs_{name}")
            row.update(zip(keys, (p_trained, outcome), strict=True))
    mean_length = {k: round(sum(v[1]) / max(len(v[1]), 1), 1) for k, v in got.items()}
    summary = {**versus[names[0]], "mean_length": mean_length, "comparison_request": request}
    if len(names) > 1:
        summary["versus"] = versus
    return rows, summary


def _judged(verdicts: list) -> tuple[list[tuple[float | None, float | None]], dict[str, Any]]:
    """Per prompt (P(trained better), outcome), and the win rate: a win when both orders prefer the
    trained answer, a loss when both prefer the other, a tie when they disagree; unparsed: dropped."""
    per_prompt, outcomes = [], []
    wins = losses = ties = dropped = 0
    for v in verdicts:
        if v is None:
            dropped += 1
            outcome = None
        else:
            outcome = v.outcome
            wins += outcome == 1.0
            losses += outcome == 0.0
            ties += outcome == 0.5
        if outcome is not None:
            outcomes.append(outcome)
        per_prompt.append((None if v is None else round(v.p_first, 4), outcome))
    rate, ci = win_rate(outcomes)
    judged = len(verdicts) - dropped
    return per_prompt, {
        "n_prompts": len(verdicts),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "dropped": dropped,
        "win_rate": None if rate is None else round(rate, 4),
        "win_rate_ci95": None if ci is None else [round(x, 4) for x in ci],
        "eval_position_agreement": round((wins + losses) / judged, 4) if judged else None,
    }
