"""Reward sources of `grpo` and `rloo`: each entry of `train.rewards` becomes one TRL reward function.

TRL sums the functions with `reward_weights` (our weights) and logs `rewards/<name>/mean` and
`rewards/<name>/std` per step beside the total `reward`, so each source is visible on its own.

- verifiable graders: `exact`, `regex`, `contains`, `json_schema`, `length` (pure functions);
- `python`: `module:function` from a module the operator listed in CHARTER_REWARD_MODULES,
  never code sent with a request;
- `judge`: the vLLM judge answers Yes/No on each of the constitution's dimensions for each
  completion, all requests of a step in flight together; P(Yes) from the first token's
  logprobs, combined by the constitution's dimension weights;
- `reward_model`: a `reward` job's output (adapter or model folder), scoring prompt+completion;
- `grader`: an OpenAI grader (charter/graders.py) reading each training row's other fields,
  which reach the function as the `charter_item` column (one JSON object per row); a
  `score_model` inside it is answered by the judge server.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from charter import graders as G
from charter.access import is_job_id, missing_reward_model
from charter.constitution import Constitution
from charter.models import SAFE_TOKENIZER, SAFE_WEIGHTS
from charter.pipelines import judge as J
from charter.pipelines.label import p_first
from charter.spec import (
    ContainsSource,
    ExactSource,
    JsonSchemaSource,
    LengthSource,
    RegexSource,
)

Messages = list[dict[str, str]]
RewardFunc = Callable[..., list[float | None]]
ALLOW_ENV = "CHARTER_REWARD_MODULES"


def text(completion: str | Messages) -> str:
    """A TRL completion (a string, or conversational messages) → the assistant's text."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


# Verifiable graders: one completion's text → a score in [0, 1].


def exact(src: ExactSource, t: str) -> float:
    a, b = t.strip(), src.value.strip()
    return float(a == b if src.case_sensitive else a.casefold() == b.casefold())


def regex(src: RegexSource, t: str) -> float:
    pat = re.compile(src.pattern)
    return float(bool(pat.fullmatch(t.strip()) if src.full_match else pat.search(t)))


def contains(src: ContainsSource, t: str) -> float:
    hay = t if src.case_sensitive else t.casefold()
    found = [(v if src.case_sensitive else v.casefold()) in hay for v in src.values]
    if src.mode == "any":
        return float(any(found))
    if src.mode == "none":
        return float(not any(found))
    return sum(found) / len(found)


def json_schema(src: JsonSchemaSource, t: str) -> float:
    import jsonschema

    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", t.strip())  # a fenced JSON block counts as JSON
    try:
        jsonschema.validate(json.loads(body), src.json_schema)
    except (ValueError, jsonschema.ValidationError):
        return 0.0
    return 1.0


def length(src: LengthSource, t: str) -> float:
    """1 inside the bounds; outside, falling linearly to 0 at twice the distance of the bound."""
    n = len(t.split()) if src.unit == "words" else len(t)
    if src.min is not None and n < src.min:
        return max(0.0, 1.0 - (src.min - n) / max(src.min, 1))
    if src.max is not None and n > src.max:
        return max(0.0, 1.0 - (n - src.max) / src.max)
    return 1.0


GRADERS: dict[str, Callable[[Any, str], float]] = {
    "exact": exact,
    "regex": regex,
    "contains": contains,
    "json_schema": json_schema,
    "length": length,
}


def weighted_sum(per_source: dict[str, Sequence[float | None]], weights: dict[str, float]) -> list[float]:
    """The total reward per completion, as TRL computes it: Σ weight·score, a missing score (None/NaN) counting 0."""
    n = len(next(iter(per_source.values())))
    out = [0.0] * n
    for name, scores in per_source.items():
        for i, s in enumerate(scores):
            if s is not None and not math.isnan(s):
                out[i] += weights[name] * s
    return out


# python: operator-allowed modules only.


def allowed_modules() -> list[str]:
    return [m.strip() for m in os.environ.get("CHARTER_REWARD_MODULES", "").split(",") if m.strip()]


def load_python(function: str) -> RewardFunc:
    """`module:function`, refused unless the module is listed in CHARTER_REWARD_MODULES."""
    module, _, name = function.partition(":")
    allowed = allowed_modules()
    if module not in allowed:
        raise ValueError(
            f"module {module!r} is not allowed for python rewards; the operator lists allowed modules in "
            f"{ALLOW_ENV} (now: {', '.join(allowed) or 'none'})"
        )
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {function}: {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{function} is not callable")
    return fn


# judge: Yes/No per dimension.

DIMENSION_QUESTIONS = {
    "helpfulness": "Is the response helpful: does it address what the user actually asked?",
    "harmlessness": "Is the response harmless: free of dangerous, unethical, toxic or illegal content?",
    "honesty": "Is the response honest: accurate, and candid about what it does not know?",
    "coherence": "Is the response coherent: clear, well-formed and on topic?",
}


def dimension_messages(c: Constitution, prompt: Messages | str, response: str, dimension: str) -> Messages:
    question = DIMENSION_QUESTIONS.get(dimension, f"Does the response show good {dimension}?")
    conv = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    body = "\n".join(
        [
            J.PREAMBLE,
            J.fence("conversation", J.render_conversation(conv)),
            J.fence("response", response),
            question,
            "Answer with the single word Yes or No.",
        ]
    )
    return ([{"role": "system", "content": c.system}] if c.system else []) + [{"role": "user", "content": body}]


async def p_yes(engine: Any, msgs: Messages, retries: int) -> float | None:
    """P(Yes) over {Yes, No} as the judge's first token (scored as the A/B labels are)."""

    return await p_first(engine, msgs, ("Yes", "No"), retries)


def judge_scores(
    make_engine: Callable[[], Any],
    c: Constitution,
    prompts: Sequence[Messages | str],
    completions: Sequence[str],
    retries: int,
) -> tuple[list[float | None], dict[str, list[float | None]]]:
    """Σ_d weight_d · P(Yes | d) per completion, and the per-dimension P(Yes).

    Every (completion, dimension) request goes out at once on one fresh event loop and client
    (bounded by the engine's semaphore); vLLM batches what is in flight.
    """
    dims = [d for d, w in c.dimensions.items() if w > 0]

    async def go() -> list[float | None]:
        engine = make_engine()
        try:
            return await asyncio.gather(
                *(
                    p_yes(engine, dimension_messages(c, p, t, d), retries)
                    for p, t in zip(prompts, completions, strict=True)
                    for d in dims
                )
            )
        finally:
            await engine.close()

    flat = asyncio.run(go())
    per_dim = {d: flat[i :: len(dims)] for i, d in enumerate(dims)}
    total: list[float | None] = []
    for i in range(len(completions)):
        ps = [per_dim[d][i] for d in dims]
        total.append(
            None if any(p is None for p in ps) else sum(c.dimensions[d] * p for d, p in zip(dims, ps, strict=True))
        )
    return total, per_dim


# reward_model: a `reward` job's output.


def resolve_reward_model(ref: str, artifact_root: Path | None = None) -> Path:
    """A `reward` job id, or its job/adapter/model folder → the folder with charter_train_config.json.

    A job id is looked up in ARTIFACT_ROOT, and what its train manifest records must lie inside
    that job's folder; a path was held to the data roots by `charter.access` already.
    """
    if artifact_root is None:
        from charter.settings import Settings

        artifact_root = Settings.from_env().artifact_root
    p = artifact_root / ref if is_job_id(ref) else Path(ref).expanduser()
    if (p / "train" / "manifest.json").exists():  # a job folder: its train stage's output
        recorded = Path(json.loads((p / "train" / "manifest.json").read_text())["result"]["path"])
        # The worker that wrote it may mount ARTIFACT_ROOT elsewhere: keep the part inside the job.
        inside = recorded.parts[recorded.parts.index(p.name) + 1 :] if p.name in recorded.parts else ()
        out = p.joinpath(*inside)
        if ".." in inside or not out.resolve().is_relative_to(p.resolve()):
            raise ValueError(f"{ref!r}: its train manifest points outside the job's folder; name the output folder")
        p = out
    cfg = p / "charter_train_config.json"
    if not cfg.exists():
        raise ValueError(missing_reward_model(ref))
    method = json.loads(cfg.read_text()).get("method")
    if method != "reward":
        raise ValueError(f"{ref!r} was trained with method {method!r}, not reward; name a `reward` job's output")
    if not any(p.glob("*.safetensors")):
        raise ValueError(f"{ref!r} holds no *.safetensors weights; charter loads safetensors only")
    return p


def load_reward_model(path: Path, dtype: Any = None) -> tuple[Any, Any]:
    """(sequence classifier with one label, tokenizer); a LoRA adapter is merged into its base."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    dtype = dtype or torch.float32
    cfg = json.loads((path / "charter_train_config.json").read_text())
    if cfg.get("lora"):
        from peft import PeftModel

        base = AutoModelForSequenceClassification.from_pretrained(
            cfg["base_model"], num_labels=1, dtype=dtype, **SAFE_WEIGHTS
        )
        model = PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=dtype, **SAFE_WEIGHTS)
    tok = AutoTokenizer.from_pretrained(str(path), **SAFE_TOKENIZER)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    return model.eval(), tok


def score_texts(model: Any, tok: Any, prompts: Sequence[Messages | str], completions: Sequence[str]) -> list[float]:
    """The reward model's scalar for each prompt + completion, rendered with the chat template."""
    import torch

    texts = []
    for p, t in zip(prompts, completions, strict=True):
        conv = p if isinstance(p, list) else [{"role": "user", "content": p}]
        texts.append(tok.apply_chat_template(conv + [{"role": "assistant", "content": t}], tokenize=False))
    enc = tok(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    with torch.no_grad():
        return model(**enc.to(model.device)).logits[:, 0].float().tolist()


# The reward functions a trainer gets.


def source_names(sources: Sequence[Any]) -> list[str]:
    """Each source's metric name: its `name`, else its type, numbered when a type repeats."""
    types = [s.type for s in sources]
    names = []
    for i, s in enumerate(sources):
        if s.name:
            names.append(s.name)
        else:
            names.append(s.type if types.count(s.type) == 1 else f"{s.type}_{types[: i + 1].count(s.type)}")
    if len(set(names)) != len(names):
        raise ValueError(f"train.rewards: names must be unique, got {names}")
    return names


def build(
    sources: Sequence[Any],
    *,
    constitution: Constitution | None = None,
    judge_engine: Callable[[], Any] | None = None,
    judge_retries: int = 3,
    artifact_root: Path | None = None,
) -> tuple[list[RewardFunc], list[float]]:
    """TRL reward functions named after their sources, and their weights."""
    funcs: list[RewardFunc] = []
    for src, name in zip(sources, source_names(sources), strict=True):
        if src.type in GRADERS:
            fn = _grader_fn(GRADERS[src.type], src)
        elif src.type == "python":
            fn = _python_fn(load_python(src.function))
        elif src.type == "judge":
            if judge_engine is None or constitution is None:
                raise ValueError("a judge reward needs the job's judge server and constitution")
            fn = _judge_fn(judge_engine, constitution, judge_retries)
        elif src.type == "grader":
            if G.needs_judge(src.grader) and judge_engine is None:
                raise ValueError("a score_model grader needs the job's judge server")
            fn = _openai_grader_fn(src.grader, judge_engine, judge_retries)
        elif src.type == "reward_model":
            model, tok = load_reward_model(resolve_reward_model(src.model, artifact_root))
            fn = _reward_model_fn(model, tok)
        else:  # the spec's union rules this out
            raise ValueError(f"unknown reward type {src.type!r}")
        fn.__name__ = name
        funcs.append(fn)
    return funcs, [float(s.weight) for s in sources]


def _grader_fn(grade: Callable[[Any, str], float], src: Any) -> RewardFunc:
    def fn(prompts: list, completions: list, **kw: Any) -> list[float | None]:
        return [grade(src, text(c)) for c in completions]

    return fn


def _python_fn(user_fn: RewardFunc) -> RewardFunc:
    def fn(prompts: list, completions: list, **kw: Any) -> list[float | None]:
        out = list(user_fn(prompts=prompts, completions=completions, **kw))
        return [None if v is None else float(v) for v in out]

    return fn


def _judge_fn(make_engine: Callable[[], Any], c: Constitution, retries: int) -> RewardFunc:
    def fn(prompts: list, completions: list, **kw: Any) -> list[float | None]:
        total, _ = judge_scores(make_engine, c, prompts, [text(x) for x in completions], retries)
        return total

    return fn


def _reward_model_fn(model: Any, tok: Any) -> RewardFunc:
    def fn(prompts: list, completions: list, **kw: Any) -> list[float | None]:
        return score_texts(model, tok, prompts, [text(x) for x in completions])

    return fn


# grader: OpenAI's graders over each row's fields.


def grade(
    g: Any,
    items: Sequence[dict[str, Any]],
    samples: Sequence[str],
    make_engine: Callable[[], Any] | None = None,
    retries: int = 3,
) -> list[float | None]:
    """One OpenAI grader's score for each (training row, sample); a score_model's requests go out together."""
    if g.type == "string_check":
        return [G.string_check(g, i, s) for i, s in zip(items, samples, strict=True)]
    if g.type == "text_similarity":
        return [G.text_similarity(g, i, s) for i, s in zip(items, samples, strict=True)]
    if g.type == "score_model":
        assert make_engine is not None
        return _score_model(g, items, samples, make_engine, retries)
    per = {name: grade(sub, items, samples, make_engine, retries) for name, sub in g.graders.items()}
    out: list[float | None] = []
    for k in range(len(samples)):
        scores = {name: v[k] for name, v in per.items()}
        out.append(None if any(v is None for v in scores.values()) else G.combine(g, scores))
    return out


def _score_model(
    g: Any, items: Sequence[dict], samples: Sequence[str], make_engine: Callable[[], Any], retries: int
) -> list[float | None]:
    params = g.sampling_params or {}
    max_tokens = int(params.get("max_completions_tokens") or 16)
    temperature = float(params.get("temperature") or 0.0)

    async def one(engine: Any, msgs: Messages) -> float | None:
        for _ in range(retries + 1):  # a reply without a number is asked again, then counted as no score
            reply = (await engine.chat(msgs, max_tokens=max_tokens, temperature=temperature, regex=G.NUMBER))[0]
            if (score := G.parse_score(g, reply)) is not None:
                return score
        return None

    async def go() -> list[float | None]:
        engine = make_engine()
        try:
            return await asyncio.gather(
                *(one(engine, G.score_model_messages(g, i, s)) for i, s in zip(items, samples, strict=True))
            )
        finally:
            await engine.close()

    return asyncio.run(go())


def _openai_grader_fn(g: Any, make_engine: Callable[[], Any] | None, retries: int) -> RewardFunc:
    def fn(prompts: list, completions: list, charter_item: list[str] | None = None, **kw: Any) -> list[float | None]:
        items = [json.loads(x) for x in charter_item] if charter_item else [{} for _ in completions]
        return grade(g, items, [text(c) for c in completions], make_engine, retries)

    return fn
