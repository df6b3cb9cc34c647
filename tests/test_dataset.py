"""Datasets users bring: every accepted format, and the first bad line named with its fix."""

from __future__ import annotations

import json

import pytest

from charter import dataset
from charter.dataset import DatasetError


def jsonl(*rows: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}


def test_sft_messages_and_prompt_completion_become_messages():
    kind, rows = dataset.parse(jsonl({"messages": [USER, ASSISTANT]}, "", {"prompt": "Hi", "completion": "Hello!"}))
    assert kind == "sft"
    assert rows == [{"messages": [USER, ASSISTANT]}, {"messages": [USER, ASSISTANT]}]


def test_preference_trl_and_openai_dpo_formats_become_conversational_columns():
    trl = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    openai_dpo = {
        "input": {"messages": [USER]},
        "preferred_output": [ASSISTANT],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    for row in (trl, openai_dpo):
        kind, rows = dataset.parse(jsonl(row))
        assert kind == "preference"
        assert rows == [
            {"prompt": [USER], "chosen": [ASSISTANT], "rejected": [{"role": "assistant", "content": "Go away."}]}
        ]


def test_prompts_keep_their_other_columns_for_graders():
    kind, rows = dataset.parse(jsonl({"prompt": "2+2?", "answer": "4"}, {"messages": [USER], "answer": "x"}))
    assert kind == "prompts"
    assert rows[0] == {"prompt": [{"role": "user", "content": "2+2?"}], "answer": "4"}
    assert rows[1] == {"prompt": [USER], "answer": "x"}


@pytest.mark.parametrize(
    ("data", "line", "fragment"),
    [
        (jsonl({"messages": [USER, ASSISTANT]}, "{not json"), 2, "not valid JSON"),
        (jsonl({"messages": [USER, ASSISTANT]}, "", "[1, 2]"), 3, "expected a JSON object"),
        (jsonl({"messages": [USER, ASSISTANT]}, {"messages": [USER]}), 2, "must end with an assistant turn"),
        (
            jsonl({"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}),
            2,
            "'rejected' is missing",
        ),
        (jsonl({"messages": [USER, {"role": "robot", "content": "x"}]}), 1, "role one of"),
        (jsonl({"text": "hello"}), 1, "unrecognised columns ['text']"),
        (jsonl({"prompt": "a", "completion": ""}), 1, "'completion' is empty"),
    ],
)
def test_first_bad_line_is_named_with_the_reason(data: bytes, line: int, fragment: str):
    with pytest.raises(DatasetError) as e:
        dataset.parse(data)
    assert e.value.line == line
    assert f"line {line}:" in str(e.value) and fragment in str(e.value)


def test_empty_and_non_utf8_files_are_refused():
    with pytest.raises(DatasetError, match="holds no rows"):
        dataset.parse(b"\n\n")
    with pytest.raises(DatasetError, match="not UTF-8"):
        dataset.parse(b"\xff\xfe{}")


def test_limit_stops_reading_early():
    kind, rows = dataset.parse(jsonl(*[{"prompt": f"p{i}"} for i in range(5)], "broken"), limit=2)
    assert len(rows) == 2
