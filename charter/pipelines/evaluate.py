"""Stage `evaluate`: the trained policy against its base on held-out prompts.

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
from pathlib import Path
from typing import Any

from charter.constitution import DEFAULT_COMPARISON, Constitution
from charter.pipelines.engine import Engine, gather_progress
from charter.pipelines.events import Reporter
from charter.pipelines.label import compare
from charter.spec import EvaluateSpec, JudgeSpec

Messages = list[dict[str, str]]


def load_policy(base_path: str, trained: dict[str, Any] | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trained and trained["kind"] == "model":
        path = trained["path"]
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if trained:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, trained["path"])
    return model, AutoTokenizer.from_pretrained(base_path)


def sample(
    model: Any,
    tok: Any,
    prompts: list[Messages],
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
    on_batch: Any = None,
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
                temperature=0.7,
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


def evaluate(
    judge: Engine,
    c: Constitution,
    prompts: list[Messages],
    base_path: str,
    trained: dict[str, Any],
    ev: EvaluateSpec,
    jspec: JudgeSpec,
    seed: int,
    out_dir: Path,
    report: Reporter,
) -> tuple[list[dict], dict]:
    report.started("evaluate", total=len(prompts), phase="sampling")
    answers: dict[str, tuple[list[str], list[int]]] = {}

    def run_sampling(name: str, model: Any, tok: Any) -> None:
        t0 = time.monotonic()

        def tick(n: int, tokens: int) -> None:
            tps = round(tokens / max(time.monotonic() - t0, 1e-9), 1)
            report.progress(n, len(prompts), force=True, phase=f"sampling {name}", tokens_per_s=tps)

        answers[name] = sample(model, tok, prompts, ev.max_new_tokens, seed, on_batch=tick)
        report.message(f"evaluate: sampled {len(prompts)} answers from the {name} policy")

    if trained["kind"] == "model":
        for name, adapter in (("base", None), ("trained", trained)):
            model, tok = load_policy(base_path, adapter)
            run_sampling(name, model, tok)
            del model
    else:  # one copy of the base weights: the base answers with the adapter switched off
        model, tok = load_policy(base_path, trained)
        with model.disable_adapter():
            run_sampling("base", model, tok)
        run_sampling("trained", model, tok)
        del model

    request = DEFAULT_COMPARISON

    async def run() -> list:
        try:
            return await gather_progress(
                [
                    compare(judge, c, p, t, b, request, jspec.retries)
                    for p, t, b in zip(prompts, answers["trained"][0], answers["base"][0], strict=True)
                ],
                lambda n: report.progress(n, len(prompts), phase="judging"),
            )
        finally:
            await judge.close()

    verdicts = asyncio.run(run())
    rows, outcomes = [], []
    wins = losses = ties = dropped = 0
    for i, (p, v) in enumerate(zip(prompts, verdicts, strict=True)):
        if v is None:
            dropped += 1
            outcome = None
        elif v.agree:
            outcome = 1.0 if v.p_first > 0.5 else 0.0
            wins += outcome == 1.0
            losses += outcome == 0.0
        else:
            outcome, ties = 0.5, ties + 1
        if outcome is not None:
            outcomes.append(outcome)
        rows.append(
            {
                "prompt": p,
                "trained": answers["trained"][0][i],
                "base": answers["base"][0][i],
                "p_trained": None if v is None else round(v.p_first, 4),
                "outcome": outcome,
            }
        )
    rate, ci = win_rate(outcomes)
    judged = len(prompts) - dropped
    summary = {
        "n_prompts": len(prompts),
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "dropped": dropped,
        "win_rate": None if rate is None else round(rate, 4),
        "win_rate_ci95": None if ci is None else [round(x, 4) for x in ci],
        "eval_position_agreement": round((wins + losses) / judged, 4) if judged else None,
        "mean_length": {k: round(sum(v[1]) / max(len(v[1]), 1), 1) for k, v in answers.items()},
        "comparison_request": request,
    }
    return rows, summary
