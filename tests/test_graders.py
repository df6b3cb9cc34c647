"""OpenAI's graders on known inputs: templates, string_check, text_similarity, multi, score_model parsing."""

from __future__ import annotations

import pytest
from pydantic import TypeAdapter, ValidationError

from charter import graders as G
from charter.pipelines import rewards as R

grader = TypeAdapter(G.Grader).validate_python
ITEM = {"answer": "Paris", "meta": {"city": "Lyon", "n": 3}}


def check(op: str, reference: str = "{{item.answer}}") -> G.StringCheck:
    return grader(
        {
            "type": "string_check",
            "name": "s",
            "input": "{{sample.output_text}}",
            "reference": reference,
            "operation": op,
        }
    )


def test_templates_render_item_fields_and_the_sample() -> None:
    t = "{{ item.answer }} / {{item.meta.city}} / {{item.meta.n}} / {{item.meta}} / {{sample.output_text}}"
    assert G.render(t, ITEM, "out") == 'Paris / Lyon / 3 / {"city": "Lyon", "n": 3} / out'
    assert G.render("{{sample.output_json}}", {}, ' {"a": 1} ') == '{"a": 1}'
    assert G.render("{{sample.output_json}}", {}, "not json") == ""
    with pytest.raises(KeyError, match="no field 'missing'"):
        G.render("{{item.missing}}", ITEM, "x")
    with pytest.raises(ValueError, match="not supported"):
        G.template_fields("{{foo.bar}}")
    with pytest.raises(ValueError, match="not supported"):
        G.template_fields("{{sample.choices}}")


@pytest.mark.parametrize(
    ("op", "sample", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", " Paris\n", 1.0),  # surrounding whitespace of a sample is not an answer
        ("eq", "paris", 0.0),
        ("eq", "It is Paris", 0.0),
        ("ne", "Paris", 0.0),
        ("ne", "Rome", 1.0),
        ("like", "It is Paris.", 1.0),
        ("like", "it is paris.", 0.0),
        ("ilike", "it is PARIS.", 1.0),
        ("ilike", "Rome", 0.0),
    ],
)
def test_string_check(op: str, sample: str, expected: float) -> None:
    assert G.string_check(check(op), ITEM, sample) == expected


def test_text_similarity_scores_are_in_0_1_and_ordered() -> None:
    ref = "the cat sat on the mat"
    close, far = "the cat sat on the mat today", "dogs bark loudly at night"
    for metric in G.METRICS:
        same = G.similarity(metric, ref, ref)
        a, b = G.similarity(metric, close, ref), G.similarity(metric, far, ref)
        assert same == pytest.approx(1.0), metric
        assert 1.0 > a > b >= 0.0, (metric, a, b)
    assert G.similarity("fuzzy_match", "kitten", "sitting") == pytest.approx(2 * 4 / 13)  # difflib's ratio
    assert G.rouge_n("a b c d", "a b x d", 1) == pytest.approx(0.75)  # 3 of 4 unigrams both ways
    assert G.rouge_n("a b c d", "a b x d", 2) == pytest.approx(1 / 3)  # "a b" of 3 bigrams
    assert G.rouge_l("a b c d", "a x c d") == pytest.approx(0.75)  # LCS a c d
    assert G.bleu("", "a b") == 0.0 and G.bleu("x y z", "a b c") == 0.0


def test_unsupported_metrics_and_graders_are_refused_by_name() -> None:
    base = {"type": "text_similarity", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}
    for metric, why in (("meteor", "WordNet"), ("cosine", "embedding"), ("gleu", "NLTK")):
        with pytest.raises(ValidationError, match=f"evaluation_metric '{metric}' is not supported.*{why}"):
            grader({**base, "evaluation_metric": metric})
    with pytest.raises(ValidationError, match="rouge_9' is unknown"):
        grader({**base, "evaluation_metric": "rouge_9"})
    with pytest.raises(ValidationError, match="python"):
        grader({"type": "python", "source": "def grade(s, i): return 1"})
    with pytest.raises(ValidationError, match="operation"):
        grader({**base, "type": "string_check", "operation": "regex"})


def test_multi_combines_its_graders_with_the_formula() -> None:
    g = grader(
        {
            "type": "multi",
            "graders": {
                "exact": {
                    "type": "string_check",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}",
                    "operation": "eq",
                },
                "fuzzy": {
                    "type": "text_similarity",
                    "input": "{{sample.output_text}}",
                    "reference": "{{item.answer}}",
                    "evaluation_metric": "fuzzy_match",
                },
            },
            "calculate_output": "0.5 * exact + 0.5 * fuzzy ^ 2",
        }
    )
    scores = R.grade(g, [ITEM, ITEM], ["Paris", "Pariss"])
    assert scores[0] == pytest.approx(1.0)
    assert scores[1] == pytest.approx(0.5 * (10 / 11) ** 2)
    assert G.item_fields(g) == {"answer"}
    assert G.combine(grader({**g.model_dump(), "calculate_output": "log(exact)"}), {"exact": 0.0, "fuzzy": 1}) is None
    with pytest.raises(ValidationError, match="'nope', which is not one of the graders"):
        grader({**g.model_dump(), "calculate_output": "nope + exact"})
    with pytest.raises(ValidationError, match="not allowed"):
        grader({**g.model_dump(), "calculate_output": "__import__('os')"})


def test_grader_reward_function_reads_the_rows_json_column() -> None:
    """TRL passes extra dataset columns as keywords: charter_item carries each row's fields."""
    fn = R._openai_grader_fn(check("eq"), None, 0)
    items = ['{"answer": "4"}', '{"answer": "5"}']
    assert fn(prompts=["p", "p"], completions=["4", "4"], charter_item=items, trainer_state=None) == [1.0, 0.0]
    assert fn(prompts=["p"], completions=[[{"role": "assistant", "content": "4"}]], charter_item=items[:1]) == [1.0]


class Judge:
    """The Engine's `chat`/`close` for score_model: replies in turn, as a judge server would."""

    def __init__(self, replies: list[str]):
        self.replies, self.asked = list(replies), []

    async def chat(self, messages: list, **kw: object) -> list[str]:
        self.asked.append(messages)
        return [self.replies.pop(0)]

    async def close(self) -> None:
        pass


def test_score_model_renders_its_messages_and_parses_a_number_in_range() -> None:
    g = grader(
        {
            "type": "score_model",
            "model": "tiny",
            "range": [0, 10],
            "input": [
                {"role": "developer", "content": "Grade against {{item.answer}}."},
                {"role": "user", "content": {"type": "input_text", "text": "Answer: {{sample.output_text}}"}},
            ],
        }
    )
    judge = Judge(["7", "Score: 12 points", "no idea", "still none"])
    assert R.grade(g, [ITEM, ITEM, ITEM], ["Paris", "Rome", "?"], lambda: judge, retries=1) == [7.0, 10.0, None]
    first = judge.asked[0]
    assert first[0] == {"role": "system", "content": "Grade against Paris."}
    assert first[1]["content"].startswith("Answer: Paris") and "number from 0 to 10" in first[1]["content"]
    with pytest.raises(ValidationError, match="low < high"):
        grader({**g.model_dump(), "range": [1, 1]})


def test_a_job_whose_rewards_need_the_judge_gets_its_server() -> None:
    from charter.spec import JobSpec

    def spec(rewards: list) -> JobSpec:
        return JobSpec.model_validate(
            {
                "name": "x",
                "policy": {"model": "tiny"},
                "dataset": {"source": "f.jsonl"},
                "train": {"method": "grpo", "rewards": rewards},
            }
        )

    score = {"type": "score_model", "model": "tiny", "input": [{"role": "user", "content": "{{sample.output_text}}"}]}
    multi = {"type": "multi", "graders": {"s": score}, "calculate_output": "s"}
    assert not spec([{"type": "grader", "grader": {**check("eq").model_dump(), "type": "string_check"}}]).needs_servers
    assert spec([{"type": "judge"}]).needs_servers
    assert spec([{"type": "grader", "grader": score}]).needs_servers
    assert spec([{"type": "grader", "grader": multi}]).needs_servers
