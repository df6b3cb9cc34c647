"""OpenAI's graders (reinforcement fine-tuning) as charter reward sources: `{type: grader, grader: {...}}`.

    {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
     "reference": "{{item.answer}}", "operation": "eq"}

Templates name a field of the training row (`{{item.answer}}`, dotted for nesting) or the
policy's sample (`{{sample.output_text}}`, `{{sample.output_json}}`: the text parsed as JSON).

- `string_check` — eq / ne (the sample's surrounding whitespace ignored), like (reference is a
  substring of the input), ilike (the same, case-insensitive): 1 or 0.
- `text_similarity` — `fuzzy_match` (difflib's ratio: 2·matches / total length), `bleu` (sentence
  BLEU-4 with add-one smoothing for n > 1), `rouge_1`…`rouge_5` (n-gram F1), `rouge_l` (longest
  common subsequence F1), all on lower-cased word tokens, in [0, 1]. `cosine` (needs an
  embedding model), `gleu` and `meteor` (need NLTK and WordNet) are refused.
- `score_model` — the job's judge (a vLLM server) answers the rendered `input` messages, asked for
  a number in `range` and held to one by structured outputs (NUMBER); the number, clamped to the
  range, is the score; a reply without one is asked again, then counted as no score.
- `multi` — `graders` by name, combined by `calculate_output` (+ - * / ^, min, max, abs, floor,
  ceil, exp, sqrt, log over the graders' names and numbers).

Everything is checked when the job is submitted; this module needs no torch.
"""

from __future__ import annotations

import ast
import difflib
import json
import math
import operator
import re
from collections import Counter
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A score_model's reply: the judge decodes under this regex (vLLM structured outputs), as
# OpenAI's score_model answers in a structured output, so even a weak judge gives a number.
NUMBER = r"-?[0-9]{1,6}(\.[0-9]{1,4})?"
TEMPLATE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json")
METRICS = ("fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
REFUSED_METRICS = {
    "cosine": "it needs an embedding model",
    "gleu": "it needs NLTK",
    "meteor": "it needs NLTK and WordNet",
}
FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}


def template_fields(template: str) -> list[str]:
    """The `{{…}}` references of a template; ValueError for a namespace other than item/sample."""
    out = []
    for ref in TEMPLATE.findall(template):
        ns, _, path = ref.partition(".")
        if ns == "item" and path:
            out.append(ref)
        elif ns == "sample" and path in SAMPLE_FIELDS:
            out.append(ref)
        else:
            raise ValueError(
                f"template {{{{{ref}}}}} is not supported; use {{{{item.<field>}}}} (a field of the training row) "
                "or {{sample.output_text}} / {{sample.output_json}}"
            )
    return out


def render(template: str, item: dict[str, Any], sample: str) -> str:
    """Fill a template from one training row (`item`) and one sampled completion's text."""

    def value(m: re.Match) -> str:
        ns, _, path = m.group(1).partition(".")
        if ns == "sample":
            if path == "output_text":
                return sample
            try:
                return json.dumps(json.loads(sample))
            except ValueError:
                return ""
        v: Any = item
        for key in path.split("."):
            if not isinstance(v, dict) or key not in v:
                raise KeyError(f"the training row has no field {path!r}, which a grader reads as {{{{item.{path}}}}}")
            v = v[key]
        return v if isinstance(v, str) else json.dumps(v)

    return TEMPLATE.sub(value, template)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Grader(_Strict):
    name: str | None = None
    pass_threshold: float | None = Field(None, description="Accepted and not used: the reward is the score itself.")

    def templates(self) -> list[str]:
        return []

    @model_validator(mode="after")
    def _check_templates(self) -> _Grader:
        for t in self.templates():
            template_fields(t)
        return self


class StringCheck(_Grader):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]

    def templates(self) -> list[str]:
        return [self.input, self.reference]


class TextSimilarity(_Grader):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: str

    def templates(self) -> list[str]:
        return [self.input, self.reference]

    @field_validator("evaluation_metric")
    @classmethod
    def _known(cls, v: str) -> str:
        if v in REFUSED_METRICS:
            raise ValueError(
                f"evaluation_metric {v!r} is not supported by charter ({REFUSED_METRICS[v]}); "
                f"use one of {', '.join(METRICS)}"
            )
        if v not in METRICS:
            raise ValueError(f"evaluation_metric {v!r} is unknown; use one of {', '.join(METRICS)}")
        return v


class ScoreModelMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | dict[str, Any]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content.get("type") in ("input_text", "output_text") and isinstance(self.content.get("text"), str):
            return self.content["text"]
        raise ValueError("content must be text, or {type: input_text, text}; images and audio are not supported")

    @model_validator(mode="after")
    def _is_text(self) -> ScoreModelMessage:
        self.text()
        return self


class ScoreModel(_Grader):
    type: Literal["score_model"]
    model: str = Field(description="The judge model (charter's judge.model unless extra_body charter.judge is set).")
    input: list[ScoreModelMessage] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    sampling_params: dict[str, Any] | None = Field(None, description="temperature and max_completions_tokens apply.")

    def templates(self) -> list[str]:
        return [m.text() for m in self.input]

    @model_validator(mode="after")
    def _range(self) -> ScoreModel:
        if not self.range[0] < self.range[1]:
            raise ValueError(f"range must be [low, high] with low < high, got {list(self.range)}")
        return self


Simple = Annotated[StringCheck | TextSimilarity | ScoreModel, Field(discriminator="type")]


class Multi(_Grader):
    type: Literal["multi"]
    graders: dict[str, Simple] = Field(min_length=1)
    calculate_output: str = Field(max_length=512)

    @model_validator(mode="after")
    def _formula(self) -> Multi:
        try:
            tree = _parse(self.calculate_output)
        except SyntaxError as e:
            raise ValueError(f"calculate_output is not a formula: {e.msg}") from None
        try:
            _evaluate(tree.body, {k: 1.0 for k in self.graders})  # names and operators checked once
        except ArithmeticError:
            pass  # e.g. x / (a - b) at a = b = 1: the formula is well-formed
        return self


Grader = Annotated[StringCheck | TextSimilarity | ScoreModel | Multi, Field(discriminator="type")]


def needs_judge(g: Any) -> bool:
    return g.type == "score_model" or (g.type == "multi" and any(needs_judge(x) for x in g.graders.values()))


def item_fields(g: Any) -> set[str]:
    """The training-row fields a grader reads (`item.answer` → `answer`; nested → its top key)."""
    subs = list(g.graders.values()) if g.type == "multi" else [g]
    return {
        ref.split(".")[1] for s in subs for t in s.templates() for ref in template_fields(t) if ref.startswith("item.")
    }


# -- scores ---------------------------------------------------------------------------


def string_check(g: StringCheck, item: dict[str, Any], sample: str) -> float:
    a, b = render(g.input, item, sample), render(g.reference, item, sample)
    if g.operation in ("eq", "ne"):
        return float((a.strip() == b.strip()) == (g.operation == "eq"))
    if g.operation == "ilike":
        a, b = a.casefold(), b.casefold()
    return float(b in a)


def _words(t: str) -> list[str]:
    return re.findall(r"\w+", t.lower())


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(candidate: str, reference: str) -> float:
    """Sentence BLEU-4: geometric mean of clipped n-gram precisions (add-one for n > 1) × brevity penalty."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return float(c == r)
    logs = []
    for n in range(1, 5):
        cand, ref = _ngrams(c, n), _ngrams(r, n)
        hits, total = sum((cand & ref).values()), max(sum(cand.values()), 0)
        if n == 1 and hits == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        logs.append(math.log((hits + smooth) / (total + smooth)))
    brevity = 1.0 if len(c) > len(r) else math.exp(1 - len(r) / len(c))
    return brevity * math.exp(sum(logs) / 4)


def _f1(hits: int, n_cand: int, n_ref: int) -> float:
    if hits == 0:
        return 0.0
    p, r = hits / n_cand, hits / n_ref
    return 2 * p * r / (p + r)


def rouge_n(candidate: str, reference: str, n: int) -> float:
    cand, ref = _ngrams(_words(candidate), n), _ngrams(_words(reference), n)
    return _f1(sum((cand & ref).values()), sum(cand.values()), sum(ref.values()))


def rouge_l(candidate: str, reference: str) -> float:
    c, r = _words(candidate), _words(reference)
    prev = [0] * (len(r) + 1)
    for a in c:  # longest common subsequence, one row at a time
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f1(prev[-1], len(c), len(r))


def similarity(metric: str, candidate: str, reference: str) -> float:
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, candidate, reference, autojunk=False).ratio()
    if metric == "bleu":
        return bleu(candidate, reference)
    if metric == "rouge_l":
        return rouge_l(candidate, reference)
    return rouge_n(candidate, reference, int(metric.removeprefix("rouge_")))


def text_similarity(g: TextSimilarity, item: dict[str, Any], sample: str) -> float:
    return similarity(g.evaluation_metric, render(g.input, item, sample), render(g.reference, item, sample))


def score_model_messages(g: ScoreModel, item: dict[str, Any], sample: str) -> list[dict[str, str]]:
    """The grader's messages, rendered, and an instruction to answer with one number in its range."""
    lo, hi = g.range
    msgs = [
        {"role": "system" if m.role == "developer" else m.role, "content": render(m.text(), item, sample)}
        for m in g.input
    ]
    ask = f"Reply with only a number from {lo:g} to {hi:g}."
    return (
        msgs + [{"role": "user", "content": ask}]
        if msgs[-1]["role"] != "user"
        else [
            *msgs[:-1],
            {"role": "user", "content": msgs[-1]["content"] + "\n\n" + ask},
        ]
    )


def parse_score(g: ScoreModel, reply: str | None) -> float | None:
    """The first number in the judge's reply, clamped to the grader's range; None when there is none."""
    m = re.search(r"-?\d+(?:\.\d+)?", reply or "")
    if not m:
        return None
    lo, hi = g.range
    return min(max(float(m.group()), lo), hi)


def combine(g: Multi, scores: dict[str, float]) -> float | None:
    """calculate_output over one sample's scores; None where the formula is undefined (log 0, x / 0)."""
    try:
        return _evaluate(_parse(g.calculate_output).body, scores)
    except (ArithmeticError, ValueError):
        return None


def _parse(formula: str) -> ast.Expression:
    # OpenAI writes powers as ^; as Python's ** it also binds tighter than * and +, as a power should.
    return ast.parse(formula.replace("^", "**"), mode="eval")


def _evaluate(node: ast.AST, names: dict[str, float]) -> float:
    """calculate_output over the graders' scores: numbers, names, + - * / ^ and FUNCTIONS only."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(
                f"calculate_output names {node.id!r}, which is not one of the graders ({', '.join(names)})"
            )
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        return float(BINARY[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _evaluate(node.operand, names)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and node.args:
        if node.keywords:
            raise ValueError("calculate_output: functions take positional arguments only")
        return float(FUNCTIONS[node.func.id](*(_evaluate(a, names) for a in node.args)))
    raise ValueError(
        f"calculate_output: {ast.unparse(node)!r} is not allowed; use numbers, the graders' names, "
        f"+ - * / ^ and {', '.join(FUNCTIONS)}"
    )
